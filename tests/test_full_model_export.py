"""The whole pretraining model <-> the official MTP full-model state_dict (MTP_SPEC §3.6):
key set and shapes at ViT-B 448, bitwise round trip, strict errors, the PyTorch twin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mtp_jax.checkpoints import full_model as fm
from mtp_jax.checkpoints import torch_convert as tc
from mtp_jax.errors import CheckpointError
from mtp_jax.models import build_encoder
from mtp_jax.models.detection.mask_head import MaskConfig
from mtp_jax.models.heads.mask_rcnn import MaskRCNN
from mtp_jax.models.heads.oriented_rcnn import OrientedRCNN
from mtp_jax.models.heads.upernet import UperNetHead
from mtp_jax.models.multitask import MultiTaskModel
from mtp_jax.torch_twin.mtp_decoders import MTPFramework
from mtp_jax.torch_twin.vit_rvsa import build_twin

OFFICIAL = {"sota": 18, "sior": 20, "fast": 37}
TINY_ENC = dict(depth=3, embed_dim=32, num_heads=2, out_indices=(0, 1, 2, 2))
TINY = dict(channels=16, fc_channels=32)
TINY_CLASSES = {"sota": 3, "sior": 2, "fast": 4}   # distinct, so a wrong k cannot fit


class _Task:
  multi_scale = True   # the heads read the fpn outputs (Task.multi_scale)

  def __init__(self, build):
    self.build_head = build


def _tasks(classes, names=("ss", "is", "rd"), channels=256, fc_channels=1024):
  make = {
      "ss": lambda d, rngs, dtype=None: UperNetHead(d, {s: n + 1 for s, n in classes.items()},
                                                    channels=channels, rngs=rngs, dtype=dtype),
      "is": lambda d, rngs, dtype=None: MaskRCNN(d, classes, channels=channels, fc_channels=fc_channels,
                                                 mask=MaskConfig(conv_channels=channels), rngs=rngs,
                                                 dtype=dtype),
      "rd": lambda d, rngs, dtype=None: OrientedRCNN(d, classes, channels=channels,
                                                     fc_channels=fc_channels, rngs=rngs, dtype=dtype)}
  return {n: _Task(make[n]) for n in names}


def _abstract(encoder, size, classes, names=("ss", "is", "rd"), enc_kw=None, **head_kw):
  return nnx.eval_shape(lambda: MultiTaskModel(
      build_encoder(encoder, size, rngs=nnx.Rngs(0), **(enc_kw or {})),
      _tasks(classes, names, **head_kw), rngs=nnx.Rngs(0)))


def _tree(model):
  return fm.model_state_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                             nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


def _random(tree, seed=0):
  """Every leaf random (variances positive), so no value can pass by being a default."""
  rng = np.random.default_rng(seed)
  flat = {p: (np.abs(rng.standard_normal(v.shape)) + 0.5 if p[-1] == "var"
              else 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
          for p, v in tc.flatten_params(tree)}
  return tc.nest_params(flat)


@pytest.fixture(scope="module")
def tiny():
  """(model with random values, its tree, subsets) of a tiny 3-task model at 112 px."""
  model = _abstract("vit_t_rvsa", 112, TINY_CLASSES, enc_kw=TINY_ENC, **TINY)
  tree = _random(_tree(model))
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  flat_tree = dict(tc.flatten_params(tree))
  pure = tc.nest_params({p: flat_tree.get(p, v) for p, v in tc.flatten_params(pure)})
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state), tree, tuple(TINY_CLASSES)


def _tiny_twin(tasks=("ss", "is", "rd")):
  enc = build_twin("vit_t_rvsa", 112, **TINY_ENC)
  return MTPFramework(enc, [32] * 4, [n + 1 for n in TINY_CLASSES.values()],
                      list(TINY_CLASSES.values()), tasks=tasks, **TINY).eval()


# ----------------------------------------------------------------------------------------------
def test_vit_b_export_has_the_official_full_model_keys_and_shapes(monkeypatch):
  # Speed only (about 3x on this trace): flax's Variable.set_value probes `.sharding` of every
  # traced value, and JAX builds the discarded AttributeError's text by walking the whole trace.
  from jax._src import core
  monkeypatch.setattr(core.Tracer, "_origin_msg", lambda self: "", raising=False)
  shapes = fm.state_dict_shapes(_tree(_abstract("vit_b_rvsa", 448, OFFICIAL)), tuple(OFFICIAL))
  with torch.device("meta"):
    official = {k: tuple(v.shape) for k, v in MTPFramework.official("vit_b_rvsa", 448).state_dict().items()}
  assert set(shapes) == set(official), (sorted(set(shapes) ^ set(official)))[:10]
  assert shapes == official
  # Spot checks against the official module structure (MTP_SPEC §3.2, §3.3).
  assert shapes["semsegdecoder.decode_head.psp_modules.3.1.conv.weight"] == (256, 768, 1, 1)
  assert shapes["semsegdecoder.decode_head.bottleneck.conv.weight"] == (256, 768 + 4 * 256, 3, 3)
  assert shapes["semsegdecoder.decode_head.fpn_bottleneck.bn.num_batches_tracked"] == ()
  assert shapes["semsegdecoder.decode_head.conv_seg.weight"] == (1, 256, 1, 1)
  assert [shapes[f"semseghead_{k}.1.weight"][0] for k in (1, 2, 3)] == [19, 21, 38]
  assert shapes["inssegdecoder.rpn_head.rpn_reg.weight"] == (12, 256, 1, 1)
  assert shapes["rotdetdecoder.rpn_head.rpn_reg.weight"] == (18, 256, 1, 1)
  assert shapes["inssegdecoder.roi_head.bbox_head.shared_fcs.0.weight"] == (1024, 256 * 49)
  assert shapes["inssegdecoder.roi_head.mask_head.upsample.weight"] == (256, 256, 2, 2)
  assert [shapes[f"inssegroiboxhead_fc_reg{k}.weight"][0] for k in (1, 2, 3)] == [72, 80, 148]
  assert [shapes[f"inssegroimaskhead_conv{k}.weight"][0] for k in (1, 2, 3)] == [18, 20, 37]
  assert [shapes[f"rotdetroiboxhead_fc_cls{k}.weight"][0] for k in (1, 2, 3)] == [19, 21, 38]
  assert shapes["rotdetroiboxhead_fc_reg3.weight"] == (5, 1024)
  assert not any(".fc_cls." in k or "conv_logits" in k for k in shapes)   # commented out in MTP


def test_round_trip_is_bitwise_and_files_keep_every_tensor(tiny, tmp_path):
  _, tree, subsets = tiny
  sd = fm.model_to_state_dict(tree, subsets, num_batches_tracked=42)
  assert sd["semsegdecoder.decode_head.lateral_convs.0.bn.num_batches_tracked"].dtype == np.int64
  assert int(sd["semsegdecoder.decode_head.psp_modules.0.1.bn.num_batches_tracked"]) == 42
  assert not np.any(sd["semsegdecoder.decode_head.conv_seg.weight"])
  # BN statistics land in running_mean / running_var (not swapped).
  bn = tree["heads"]["ss"]["semsegdecoder"]["fpn_bottleneck"]["bn"]
  np.testing.assert_array_equal(sd["semsegdecoder.decode_head.fpn_bottleneck.bn.running_var"], bn["var"])
  zeros = jax.tree.map(np.zeros_like, tree)
  for path in (tmp_path / "m.pth", tmp_path / "m.safetensors"):
    fm.write_full_checkpoint(sd, str(path))
    back = fm.read_full_checkpoint(str(path))
    assert set(back) == set(sd)
    loaded, report = fm.state_dict_to_model(back, zeros, subsets)
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    got, want = dict(tc.flatten_params(loaded)), dict(tc.flatten_params(tree))
    assert set(got) == set(want)
    for p, b in want.items():
      assert got[p].dtype == b.dtype and np.array_equal(got[p].view(np.uint32), b.view(np.uint32)), p
    assert report["loaded"] == len(list(tc.flatten_params(tree)))
    assert not report["missing"] and not report["unexpected"] and not report["shape_mismatch"]
    n_bn = sum(k.endswith("running_mean") for k in sd)
    assert len(report["dropped_unused"]) == n_bn + 2   # num_batches_tracked + UPerHead conv_seg


def test_strict_import_names_every_problem_and_tasks_select_heads(tiny):
  _, tree, subsets = tiny
  sd = fm.model_to_state_dict(tree, subsets)
  zeros = jax.tree.map(np.zeros_like, tree)
  bad = dict(sd)
  del bad["rotdetdecoder.neck.fpn_convs.2.conv.bias"]
  del bad["encoder.blocks.1.mlp.fc2.weight"]
  bad["inssegdecoder.roi_head.bbox_head.fc_cls.weight"] = np.zeros((4, 32), np.float32)
  bad["semseghead_2.1.weight"] = np.zeros((5, 16, 1, 1), np.float32)
  bad["semsegdecoder.decode_head.conv_seg.bias"] = np.zeros((2,), np.float32)
  with pytest.raises(CheckpointError) as err:
    fm.state_dict_to_model(bad, zeros, subsets)
  msg = str(err.value)
  for name in ("rotdetdecoder.neck.fpn_convs.2.conv.bias", "encoder.blocks.1.mlp.fc2.weight",
               "inssegdecoder.roi_head.bbox_head.fc_cls.weight", "semseghead_2.1.weight: checkpoint (5, 16, 1, 1), model expects (3, 16, 1, 1)",
               "semsegdecoder.decode_head.conv_seg.bias"):
    assert name in msg, name
  # strict=False loads what fits and keeps the template elsewhere.
  loaded, report = fm.state_dict_to_model(bad, zeros, subsets, strict=False)
  assert sorted(report["missing"]) == ["encoder.blocks.1.mlp.fc2.weight",
                                       "rotdetdecoder.neck.fpn_convs.2.conv.bias"]
  assert len(report["shape_mismatch"]) == 2   # semseghead_2 and UPerHead's unused conv_seg
  assert report["unexpected"] == ["inssegdecoder.roi_head.bbox_head.fc_cls.weight"]
  assert not np.any(loaded["heads"]["ss"]["semseghead"]["sior"]["conv_seg"]["kernel"])
  np.testing.assert_array_equal(loaded["heads"]["ss"]["semseghead"]["fast"]["conv_seg"]["kernel"],
                                tree["heads"]["ss"]["semseghead"]["fast"]["conv_seg"]["kernel"])
  # A 3-task checkpoint into a ss-only model: strict needs tasks= (or strict=False).
  ss_only = {"encoder": zeros["encoder"], "heads": {"ss": zeros["heads"]["ss"]}}
  with pytest.raises(CheckpointError, match="pass tasks="):
    fm.state_dict_to_model(sd, ss_only, subsets)
  loaded, report = fm.state_dict_to_model(sd, ss_only, subsets, tasks=("ss",))
  assert report["ignored_other_tasks"] and all(k.startswith(("insseg", "rotdet")) for k in report["ignored_other_tasks"])
  np.testing.assert_array_equal(loaded["heads"]["ss"]["semsegdecoder"]["bottleneck"]["bn"]["mean"],
                                tree["heads"]["ss"]["semsegdecoder"]["bottleneck"]["bn"]["mean"])
  # Heads outside tasks= keep the template's values (a fresh head to finetune).
  loaded, report = fm.state_dict_to_model(sd, zeros, subsets, tasks=("ss", "is"))
  assert report["kept"] and all(k.startswith("rotdet") for k in report["kept"])
  assert not np.any(loaded["heads"]["rd"]["rpn_head"]["rpn_reg"]["kernel"])


def test_twin_strict_loads_our_export_and_computes_what_we_compute(tiny):
  model, tree, subsets = tiny
  sd = fm.model_to_state_dict(tree, subsets, num_batches_tracked=3)
  twin = _tiny_twin()
  twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  assert int(twin.semsegdecoder.decode_head.bottleneck.bn.num_batches_tracked) == 3
  # A fresh twin's own state_dict comes back through import with the same key set.
  back, _ = fm.state_dict_to_model({k: v.numpy() for k, v in twin.state_dict().items()},
                                   jax.tree.map(np.zeros_like, tree), subsets)
  assert np.array_equal(back["heads"]["is"]["mask_head"]["upsample"]["kernel"],
                        tree["heads"]["is"]["mask_head"]["upsample"]["kernel"])

  rng = np.random.default_rng(1)
  feats = [rng.standard_normal((2, s, s, 32)).astype(np.float32) for s in (16, 8, 4, 2)]
  rois = rng.standard_normal((5, 7, 7, 16)).astype(np.float32)
  crops = rng.standard_normal((3, 14, 14, 16)).astype(np.float32)

  @nnx.jit
  def ours_fn(model, feats, rois, crops):   # one compile instead of hundreds of eager ops
    ss = model.heads["ss"]
    out = {"ss": ss.semsegdecoder(feats, groups=1, train=False)}
    out["ss_pred"] = ss.semseghead["sior"](out["ss"], train=False)
    for task, k in (("is", 3), ("rd", 1)):
      head = model.heads[task]
      levels = head.neck(feats)
      x = head.roi_head(rois)
      out[task] = (levels, head.rpn_head(levels[:1]), x, head.predictors[subsets[k - 1]](x))
    masks = model.heads["is"].mask_head(crops)
    out["masks"] = (masks, model.heads["is"].mask_predictors["sior"](masks))
    return out

  ours = jax.tree.map(np.asarray, ours_fn(model, feats, rois, crops))
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  with torch.no_grad():
    # UperNet trunk in eval mode (running statistics) + a per-subset predictor.
    theirs = twin.semsegdecoder.decode_head._forward_feature([nchw(f) for f in feats])
    close(ours["ss"], nhwc(theirs))
    close(ours["ss_pred"], nhwc(twin.semseghead_2(theirs)))
    for task, dec, fc_cls, fc_reg, reg_dim in (
        ("is", twin.inssegdecoder, twin.inssegroiboxhead_fc_cls3, twin.inssegroiboxhead_fc_reg3, 4),
        ("rd", twin.rotdetdecoder, twin.rotdetroiboxhead_fc_cls1, twin.rotdetroiboxhead_fc_reg1, 6)):
      levels, (cls, reg), x, (scores, deltas) = ours[task]
      t_levels = dec.neck([nchw(f) for f in feats])
      assert len(levels) == len(t_levels) == 5
      for a, b in zip(levels, t_levels):
        close(a, nhwc(b))
      t_cls, t_reg = dec.rpn_head.forward_single(t_levels[0])
      close(cls, nhwc(t_cls).reshape(2, -1))
      close(reg, nhwc(t_reg).reshape(2, -1, reg_dim))
      t_x, _ = dec.roi_head.bbox_head(nchw(rois))
      close(x, t_x.numpy())
      close(scores, fc_cls(t_x).numpy())
      close(deltas, fc_reg(t_x).numpy())
    t_masks = twin.inssegdecoder.roi_head.mask_head(nchw(crops))
    close(ours["masks"][0], nhwc(t_masks))
    close(ours["masks"][1], nhwc(twin.inssegroimaskhead_conv2(t_masks)))


def test_head_keys_follow_the_subset_order_and_unknown_paths_fail():
  assert fm.head_key(("heads", "is", "predictors", "fast", "fc_reg", "kernel"), ("fast", "sota")) == \
      "inssegroiboxhead_fc_reg1.weight"
  assert fm.head_key(("heads", "ss", "semsegdecoder", "psp_modules", 2, "bn", "var"), ("sota",)) == \
      "semsegdecoder.decode_head.psp_modules.2.1.bn.running_var"
  with pytest.raises(CheckpointError, match="no official name"):
    fm.head_key(("heads", "rd", "mask_head", "convs", 0, "conv", "kernel"), ("sota",))
  with pytest.raises(CheckpointError, match="not one of"):
    fm.head_key(("heads", "ss", "semseghead", "dior", "conv_seg", "bias"), ("sota",))


def test_cli_exports_a_run_and_initialize_model_reads_it_back(tiny, tmp_path, capsys):
  import optax
  from mtp_jax import export
  from mtp_jax.checkpoints import sources
  from mtp_jax.checkpoints.manager import Checkpointer
  from mtp_jax.train.state import TrainState
  model, tree, subsets = tiny
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, stats = jax.device_put((params, stats))
  state = TrainState(step=jnp.int32(7), nonfinite_steps=jnp.int32(0), params=params,
                     batch_stats=stats, opt_state=optax.identity().init(params))
  ckpt = Checkpointer(str(tmp_path / "run"), keep=1, config_json="{}",
                      signature={"subsets": list(subsets), "tasks": ["ss", "is", "rd"]})
  ckpt.save(7, state, {}, force=True)
  ckpt.close()
  out = str(tmp_path / "model.safetensors")
  export.main(["--workdir", str(tmp_path / "run"), "--out", out, "--full"])
  assert "model tensors of step 7" in capsys.readouterr().out
  sd = fm.read_full_checkpoint(out)
  assert int(sd["semsegdecoder.decode_head.bottleneck.bn.num_batches_tracked"]) == 7 * 3
  twin = _tiny_twin()
  twin.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  # Back into a fresh (zero) train state, as a finetune / resume from the official file would.
  zero = lambda s: jax.device_put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), s))
  new_p, new_s, report = sources.initialize_model(zero(params), zero(stats), out, subsets)
  assert not report["missing"] and not report["unexpected"]
  got = fm.model_state_tree(nnx.to_pure_dict(new_p), nnx.to_pure_dict(new_s))
  for p, v in tc.flatten_params(tree):
    np.testing.assert_array_equal(np.asarray(dict(tc.flatten_params(got))[p]), v, err_msg=str(p))


def test_a_fresh_run_with_model_full_init_starts_from_the_exported_model(mtp_run, tfrecord_dir, tmp_path):
  """The shared three-task run exported with --full, then `model.full_init` of a fresh run of
  the same configuration: the run's first state holds exactly the exported parameters and
  BatchNorm statistics (the step `loop.train_and_evaluate` starts from without a checkpoint)."""
  from conftest import MTP_RUN, tiny_config
  from mtp_jax import export
  from mtp_jax.checkpoints.manager import read_checkpoint
  from mtp_jax.parallel import sharding
  from mtp_jax import experiment
  from mtp_jax.train import loop
  workdir, _ = mtp_run
  out = str(tmp_path / "mtp_full.pth")
  export.main(["--workdir", workdir, "--out", out, "--full"])
  config = tiny_config(tfrecord_dir, **MTP_RUN, **{"model.full_init": out})
  tasks = experiment.tasks(config)
  trainer = loop.Trainer(config, tasks, sharding.config_mesh(config.mesh))
  state = loop.fresh_state(config, trainer)
  params, stats, _, _ = read_checkpoint(workdir)
  as_str = lambda flat: {tuple(map(str, p)): v for p, v in flat}   # list indices: 0 vs '0'
  want = as_str(tc.flatten_params(fm.model_state_tree(params, stats)))
  got = as_str(tc.flatten_params(fm.model_state_tree(nnx.to_pure_dict(state.params),
                                                     nnx.to_pure_dict(state.batch_stats))))
  assert set(got) == set(want) and any(p[0] == "heads" and p[1] == "is" for p in got)
  for p, v in want.items():
    np.testing.assert_array_equal(np.asarray(got[p]), v, err_msg=str(p))
