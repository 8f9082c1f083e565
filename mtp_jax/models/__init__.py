"""Encoders and task models, picked by name.

    encoder = build_encoder("vit_b", img_size=448)                     # paper width and depth
    encoder = build_encoder("vit_t", img_size=128, depth=4, out_indices=(0, 1, 2, 3))

`vit_b_rvsa` and `vit_l_rvsa` are the paper's encoders; `vit_t_rvsa` / `vit_s_rvsa` are small
variants for tests and quickstarts; `vit_t` ... `vit_l` are the plain-ViT counterparts.
"""

from flax import nnx

from mtp_jax.models.vit import ViTEncoder

_PLAIN = {
    "vit_t": dict(embed_dim=192, depth=12, num_heads=3, out_indices=(3, 5, 7, 11)),
    "vit_s": dict(embed_dim=384, depth=12, num_heads=6, out_indices=(3, 5, 7, 11)),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, out_indices=(3, 5, 7, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, out_indices=(7, 11, 15, 23)),
}
# The paper's models (MTP_SPEC §1.1): every `interval`-th block global, the others RVSA.
ENCODER_PRESETS = {
    **_PLAIN,
    **{f"{name}_rvsa": dict(kw, rvsa=True, interval=6 if name == "vit_l" else 3)
       for name, kw in _PLAIN.items()},
}


def build_encoder(name: str, img_size: int, *, rngs: nnx.Rngs | None = None, **overrides) -> ViTEncoder:
  """Builds encoder `name` for img_size x img_size inputs; `overrides` replace preset fields."""
  if name not in ENCODER_PRESETS:
    raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODER_PRESETS)}")
  kwargs = {**ENCODER_PRESETS[name], **overrides}
  return ViTEncoder(img_size=img_size, rngs=rngs or nnx.Rngs(0), **kwargs)
