"""The JAX RVSA encoder against its PyTorch twin; checkpoint export/import and their errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mtp_jax.checkpoints import torch_convert as tc
from mtp_jax.errors import CheckpointError
from mtp_jax.models import build_encoder
from mtp_jax.torch_twin.vit_rvsa import build_twin

SMALL = dict(depth=6, embed_dim=96, num_heads=3, out_indices=(1, 2, 4, 5))  # globals at 2 and 5


def params_of(enc):
  return nnx.to_pure_dict(nnx.state(enc, nnx.Param))


def set_params(enc, params):
  state = nnx.state(enc, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(enc, state)


def random_encoder(size, seed=0, **kw):
  """A small RVSA encoder with every parameter perturbed (rel-pos tables included, not zero)."""
  enc = build_encoder("vit_t_rvsa", size, rngs=nnx.Rngs(seed), **{**SMALL, **kw})
  rng = np.random.default_rng(seed)
  set_params(enc, jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                               params_of(enc)))
  return enc


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, images):
  return nnx.merge(graphdef, state)(images)


def forward(enc, images):
  """enc(images), jitted with the parameters as arguments: one compiled program per encoder
  structure and image shape, whatever the weights (the 224 px tests share one)."""
  graphdef, state = nnx.split(enc)
  return _apply(graphdef, state, images)


def twin_outputs(twin, images):
  with torch.no_grad():
    outs = twin(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  return [o.numpy().transpose(0, 2, 3, 1) for o in outs]


def max_rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


_SHAPES = {}


def abstract_params(name):
  """The parameter tree (shapes only, nothing allocated) of the 448 px `name` encoder, traced once."""
  if name not in _SHAPES:
    _SHAPES[name] = params_of(nnx.eval_shape(lambda: build_encoder(name, 448, rngs=nnx.Rngs(0))))
  return _SHAPES[name]


def test_vit_b_and_vit_l_keys_shapes_and_counts_match_the_spec():
  for name, no_fpn, with_fpn in (("vit_b_rvsa", 86.7e6, 93.8e6), ("vit_l_rvsa", 305.7e6, 318.2e6)):
    shapes = tc.state_dict_shapes(abstract_params(name))
    with torch.device("meta"):   # the twin's shapes without allocating and initialising its weights
      twin = build_twin(name, 448)
    assert shapes == {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    count = lambda keep: sum(math.prod(s) for k, s in shapes.items() if "index" not in k and keep(k))
    assert round(count(lambda k: not k.startswith("fpn")) / 1e5) == round(no_fpn / 1e5)
    assert round(count(lambda k: True) / 1e5) == round(with_fpn / 1e5)
  b = tc.state_dict_shapes(abstract_params("vit_b_rvsa"))
  assert b["blocks.0.attn.sampling_offsets.2.weight"] == (24, 768, 1, 1)
  assert b["blocks.0.attn.sampling_angles.2.weight"] == (12, 768, 1, 1)
  assert b["blocks.0.attn.relative_position_bias_table"] == (169, 12)
  assert b["blocks.0.attn.relative_position_index"] == (49, 49)
  assert b["blocks.2.attn.full_attn_rel_pos_h"] == (55, 64) and "blocks.3.attn.full_attn_rel_pos_h" not in b
  assert b["fpn1.0.weight"] == (768, 768, 2, 2) and b["fpn1.1.ln.weight"] == (768,)
  assert b["pos_embed"] == (1, 784, 768) and b["norm.weight"] == (768,)


@pytest.mark.parametrize("size", [224, 448, 512])  # 512: 32 tokens padded to 35, offsets / 4
def test_forward_parity_with_the_twin(size, record_property):
  enc = random_encoder(size, seed=size)
  twin = build_twin("vit_t_rvsa", size, **SMALL)
  twin.load_state_dict({k: torch.from_numpy(v) for k, v in tc.encoder_to_state_dict(params_of(enc)).items()},
                       strict=True)
  images = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
  ours = [np.asarray(o) for o in forward(enc, images)]
  errs = [max_rel_err(a, b) for a, b in zip(ours, twin_outputs(twin, images))]
  record_property("max_rel_err", max(errs))
  print(f"size {size}: max relative error per map {errs}")
  assert max(errs) <= 1e-4, errs


def test_twin_weights_import_into_jax_and_round_trip_exactly():
  size = 224
  twin = build_twin("vit_t_rvsa", size, **SMALL)
  with torch.no_grad():
    for p in twin.parameters():
      p.add_(0.05 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in twin.state_dict().items()}
  enc = build_encoder("vit_t_rvsa", size, rngs=nnx.Rngs(5), **SMALL)
  params, report = tc.state_dict_to_encoder(sd, params_of(enc))
  assert report["missing"] == [] and report["unexpected"] == []
  set_params(enc, params)
  images = np.random.default_rng(2).normal(size=(2, size, size, 3)).astype(np.float32)
  errs = [max_rel_err(np.asarray(a), b) for a, b in zip(forward(enc, images), twin_outputs(twin, images))]
  assert max(errs) <= 1e-4, errs
  # JAX -> PyTorch -> JAX is exact, and PyTorch -> JAX -> PyTorch too.
  back, _ = tc.state_dict_to_encoder(tc.encoder_to_state_dict(params_of(enc)), params_of(enc))
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params_of(enc)))
  again = tc.encoder_to_state_dict(params)
  assert set(again) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(again[k], sd[k])


def test_files_round_trip_through_pth_and_safetensors(tmp_path):
  enc = random_encoder(224, seed=3)
  sd = tc.encoder_to_state_dict(params_of(enc))
  for name in ("enc.pth", "enc.safetensors"):
    tc.write_state_dict(sd, str(tmp_path / name))
    read = tc.read_encoder_state_dict(str(tmp_path / name))
    assert set(read) == set(sd) and all(np.array_equal(read[k], sd[k]) for k in sd)
  # Official containers: 'state_dict' wrapper, 'module.' and 'encoder.' prefixes.
  torch.save({"state_dict": {f"module.encoder.{k}": torch.from_numpy(v) for k, v in sd.items()},
              "iteration": 7}, str(tmp_path / "full.pth"))
  read = tc.read_encoder_state_dict(str(tmp_path / "full.pth"))
  assert set(read) == set(sd)


def test_bad_checkpoints_name_the_offending_keys(tmp_path):
  enc = build_encoder("vit_t_rvsa", 224, rngs=nnx.Rngs(0), **SMALL)
  template = params_of(enc)
  sd = tc.encoder_to_state_dict(template)
  wider = tc.encoder_to_state_dict(params_of(build_encoder("vit_t_rvsa", 224, rngs=nnx.Rngs(0),
                                                           **{**SMALL, "embed_dim": 192})))
  with pytest.raises(CheckpointError, match=r"shape mismatch: blocks.0.attn.proj.bias: checkpoint \(192,\), model expects \(96,\)"):
    tc.state_dict_to_encoder(wider, template)  # a larger model's file for this model
  partial = {k: v for k, v in sd.items() if not k.startswith("blocks.5.")}
  with pytest.raises(CheckpointError, match=r"missing keys: \['blocks.5.attn.full_attn_rel_pos_h'"):
    tc.state_dict_to_encoder(partial, template)
  params, report = tc.state_dict_to_encoder(partial, template, strict=False)
  assert "blocks.5.mlp.fc1.weight" in report["missing"]
  with pytest.raises(CheckpointError, match=r"unexpected keys: \['decoder_embed.weight'\]"):
    tc.state_dict_to_encoder({**sd, "decoder_embed.weight": np.zeros((2, 2), np.float32)}, template)
  bad_index = dict(sd, **{"blocks.0.attn.relative_position_index": np.zeros((49, 49), np.int64)})
  with pytest.raises(CheckpointError, match="relative_position_index differs"):
    tc.state_dict_to_encoder(bad_index, template)
  (tmp_path / "notes.pth").write_text("not a checkpoint")
  with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint"):
    tc.read_encoder_state_dict(str(tmp_path / "notes.pth"))
  with pytest.raises(CheckpointError, match="does not exist"):
    tc.read_encoder_state_dict(str(tmp_path / "missing.pth"))


def test_mae_checkpoint_adapts_to_a_new_image_size():
  enc = random_encoder(224, seed=4)
  sd = tc.encoder_to_state_dict(params_of(enc))
  grid_pe = sd["pos_embed"]
  mae = dict(sd, pos_embed=np.concatenate([np.ones((1, 1, 96), np.float32), grid_pe], 1),
             cls_token=np.zeros((1, 1, 96), np.float32))
  assert tc.infer_image_size(mae) == 224 and tc.infer_image_size(sd) == 224
  adapted = tc.adapt_to_image_size(mae, 448)
  assert "cls_token" not in adapted and adapted["pos_embed"].shape == (1, 28 * 28, 96)
  assert adapted["blocks.2.attn.full_attn_rel_pos_h"].shape == (55, 32)
  want = torch.nn.functional.interpolate(torch.from_numpy(grid_pe).reshape(1, 14, 14, 96).permute(0, 3, 1, 2),
                                         size=(28, 28), mode="bicubic", align_corners=False)
  # The numpy bicubic (float64) equals PyTorch's (float32 arithmetic) to float32 rounding.
  np.testing.assert_allclose(adapted["pos_embed"], want.permute(0, 2, 3, 1).reshape(1, 784, 96).numpy(),
                             rtol=1e-5, atol=1e-6)
  table = sd["blocks.2.attn.full_attn_rel_pos_h"] + np.random.RandomState(1).randn(27, 32).astype(np.float32)
  for size, out in ((448, 55), (128, 15)):   # up and down, as finetuning at 448 or 128 px
    want = torch.nn.functional.interpolate(torch.from_numpy(table)[None, None], size=(out, 32),
                                           mode="bicubic", align_corners=False)[0, 0].numpy()
    got = tc.adapt_to_image_size(dict(sd, **{"blocks.2.attn.full_attn_rel_pos_h": table}), size)
    np.testing.assert_allclose(got["blocks.2.attn.full_attn_rel_pos_h"], want, rtol=1e-5, atol=2e-5)
  target = build_encoder("vit_t_rvsa", 448, rngs=nnx.Rngs(0), **SMALL)
  params, report = tc.state_dict_to_encoder(adapted, params_of(target))
  assert report["loaded"] == len([k for k in sd if "index" not in k])
  same = tc.adapt_to_image_size(sd, 224)
  np.testing.assert_array_equal(same["pos_embed"], sd["pos_embed"])


def test_import_command_writes_an_orbax_encoder_that_matches_the_twin(tmp_path, capsys):
  from mtp_jax import import_torch
  from mtp_jax.checkpoints.manager import read_checkpoint
  twin = build_twin("vit_t_rvsa", 224, **SMALL)
  torch.save({"model": {f"module.{k}": v for k, v in twin.state_dict().items()}}, str(tmp_path / "t.pth"))
  base = ["--ckpt", str(tmp_path / "t.pth"), "--encoder", "vit_t_rvsa", "--img-size", "224"]
  with pytest.raises(SystemExit) as e:  # the 12-block, 192-wide preset does not fit this twin
    import_torch.main(base + ["--out", str(tmp_path / "wrong")])
  assert e.value.code == 2 and "shape mismatch" in capsys.readouterr().err
  small = [f"--override={k}={v!r}" for k, v in SMALL.items()]
  import_torch.main(base + small + ["--out", str(tmp_path / "imported")])
  assert "missing 0, unexpected 0" in capsys.readouterr().out
  enc = build_encoder("vit_t_rvsa", 224, rngs=nnx.Rngs(0), **SMALL)
  set_params(enc, read_checkpoint(str(tmp_path / "imported"))[0]["encoder"])
  images = np.random.default_rng(3).normal(size=(2, 224, 224, 3)).astype(np.float32)
  errs = [max_rel_err(np.asarray(a), b) for a, b in zip(forward(enc, images), twin_outputs(twin, images))]
  assert max(errs) <= 1e-4


def test_bfloat16_compute_stays_close_to_float32():
  enc32 = random_encoder(224, seed=6)
  enc16 = build_encoder("vit_t_rvsa", 224, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **SMALL)
  set_params(enc16, params_of(enc32))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params_of(enc16)))  # params stay fp32
  images = np.random.default_rng(7).normal(size=(1, 224, 224, 3)).astype(np.float32)
  a = jax.jit(lambda x: enc32(x))(images)
  b = jax.jit(lambda x: enc16(x))(images)
  assert all(o.dtype == jnp.bfloat16 for o in b)
  errs = [max_rel_err(np.asarray(y, np.float32), np.asarray(x)) for x, y in zip(a, b)]
  assert max(errs) < 0.05, errs


def test_rvsa_refuses_a_token_grid_smaller_than_a_window():
  with pytest.raises(ValueError, match="RVSA needs a token grid of at least 7x7"):
    build_encoder("vit_t_rvsa", 96, rngs=nnx.Rngs(0))   # 6x6 tokens


def test_a_vit_l_file_for_a_vit_b_model_is_refused_by_name():
  zeros = lambda tree: jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), tree)  # no memory
  shapes_of = abstract_params
  large = tc.encoder_to_state_dict(zeros(shapes_of("vit_l_rvsa")), copy=False)
  with pytest.raises(CheckpointError) as e:
    tc.state_dict_to_encoder(large, zeros(shapes_of("vit_b_rvsa")))
  message = str(e.value)
  assert "blocks.0.attn.proj.bias: checkpoint (1024,), model expects (768,)" in message
  b_shapes, l_shapes = (tc.state_dict_shapes(shapes_of(n)) for n in ("vit_b_rvsa", "vit_l_rvsa"))
  differing = [k for k in b_shapes if k in l_shapes and b_shapes[k] != l_shapes[k]]
  assert f"({len(differing)} keys in all)" in message and len(differing) > 200
  assert "unexpected keys: ['blocks.12.attn.proj.bias'" in message


def test_detection_backbone_without_global_rel_pos_matches_the_twin_and_loads_a_checkpoint_with_them(tmp_path, capsys):
  """The original's detection backbones (vit_rvsa_mtp_branches.py) have no full_attn_rel_pos_{h,w}
  in their global blocks: ours with global_rel_pos=False has the twin's keys, computes its
  outputs, and an encoder checkpoint that has the tables (a pretraining run's) loads into it
  with every other tensor taken and the dropped tables named in the log."""
  from mtp_jax.checkpoints import sources
  enc = random_encoder(224, seed=3, global_rel_pos=False)
  sd = tc.encoder_to_state_dict(params_of(enc))
  assert not [k for k in sd if "full_attn_rel_pos" in k] and "blocks.2.attn.qkv.weight" in sd
  twin = build_twin("vit_t_rvsa", 224, global_rel_pos=False, **SMALL)
  twin.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  images = np.random.default_rng(2).normal(size=(2, 224, 224, 3)).astype(np.float32)
  errs = [max_rel_err(np.asarray(a), b) for a, b in zip(forward(enc, images), twin_outputs(twin, images))]
  assert max(errs) <= 1e-4, errs

  pretrained = tc.encoder_to_state_dict(params_of(random_encoder(224, seed=4)))   # with the tables
  tables = sorted(k for k in pretrained if "full_attn_rel_pos" in k)
  assert tables == ["blocks.2.attn.full_attn_rel_pos_h", "blocks.2.attn.full_attn_rel_pos_w",
                    "blocks.5.attn.full_attn_rel_pos_h", "blocks.5.attn.full_attn_rel_pos_w"]
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in pretrained.items()}, tmp_path / "mtp.pth")

  class Holder(nnx.Module):
    def __init__(self, encoder):
      self.encoder = encoder

  holder = Holder(enc)
  state = nnx.state(holder, nnx.Param)
  state, report = sources.initialize_encoder(state, str(tmp_path / "mtp.pth"), 224)
  assert sorted(report["unexpected"]) == tables and not report["missing"]
  assert report["loaded"] == len([k for k in pretrained if k not in tables and "index" not in k])   # no buffers
  log = capsys.readouterr().out
  assert "4 checkpoint keys unused" in log and "blocks.2.attn.full_attn_rel_pos_h" in log
  loaded = tc.encoder_to_state_dict(nnx.to_pure_dict(state)["encoder"])
  for k, v in loaded.items():
    np.testing.assert_array_equal(v, pretrained[k], err_msg=k)
