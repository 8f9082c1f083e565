"""Encoders and task models, picked by name.

    encoder = build_encoder("vit_b", img_size=448)                     # paper width and depth
    encoder = build_encoder("vit_t", img_size=128, depth=4, out_indices=(0, 1, 2, 3))

    encoder = build_encoder("intern_image_xl", img_size=448)           # the CNN (MTP_SPEC §2)
    encoder = build_encoder("intern_image_xl", img_size=64, channels=16, depths=(1, 1, 2, 1),
                            groups=(1, 2, 4, 8))                        # a toy for tests

`vit_b_rvsa` and `vit_l_rvsa` are the paper's encoders; `vit_t_rvsa` / `vit_s_rvsa` are small
variants for tests and quickstarts; `vit_t` ... `vit_l` are the plain-ViT counterparts;
`intern_image_xl` is the paper's InternImage-XL (mtp_jax/models/intern_image.py). Every encoder
returns four NHWC maps and says their widths in `out_channels`.
"""

from flax import nnx

from mtp_jax.models.intern_image import InternImageEncoder
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


# InternImage-XL as MTP pretrains and finetunes it (MTP_SPEC §2; the ImageNet-22K checkpoint's
# settings): drop path is the config's (model.drop_path_rate: 0.2 in MTP's recipes).
INTERN_IMAGE_PRESETS = {
    "intern_image_xl": dict(channels=192, depths=(5, 5, 24, 5), groups=(12, 24, 48, 96), mlp_ratio=4.0,
                            layer_scale=1e-5, offset_scale=2.0, post_norm=True),
}
ENCODERS = sorted(ENCODER_PRESETS) + sorted(INTERN_IMAGE_PRESETS)


def build_encoder(name: str, img_size: int, *, rngs: nnx.Rngs | None = None, **overrides):
  """Builds encoder `name` for img_size x img_size inputs; `overrides` replace preset fields
  (keywords of ViTEncoder or InternImageEncoder)."""
  for presets, encoder_class in ((ENCODER_PRESETS, ViTEncoder), (INTERN_IMAGE_PRESETS, InternImageEncoder)):
    if name in presets:
      try:
        return encoder_class(img_size=img_size, rngs=rngs or nnx.Rngs(0), **{**presets[name], **overrides})
      except TypeError as e:   # a misspelt or foreign override: name the encoder's keywords
        if "unexpected keyword" not in str(e):
          raise
        raise ValueError(f"encoder {name!r} ({encoder_class.__name__}): {e}") from None
  raise ValueError(f"unknown encoder {name!r}; known: {ENCODERS}")
