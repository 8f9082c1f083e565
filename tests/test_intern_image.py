"""InternImage (MTP_SPEC §2): the encoder against its PyTorch twin on random weights, export and
import with the official key names (the ImageNet checkpoint's classification head refused
strictly, dropped otherwise), InternImage's layer-decay ids against a transcription of the
original's rule, and the toy variant training in the three-task pretraining and, from that
pretraining, in a finetune smoke config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mtp_jax import config as config_lib, models, tasks as tasks_lib
from mtp_jax.checkpoints import torch_convert
from mtp_jax.checkpoints.manager import read_checkpoint
from mtp_jax.errors import CheckpointError
from mtp_jax.torch_twin import intern_image as twin_lib

from conftest import ROOT, SAMPLE_SIZE, TINY_IS, TINY_RD, tiny_overrides

TOY = config_lib.load_module(f"{ROOT}/configs/recipes.py").INTERN_IMAGE_SMOKE
# The toy with XL's block form (post-norm, layer scale, offset scale 2), and one with the other
# form (pre-norm, no layer scale, a stage norm) and DCNv3's H/G options.
XL_FORM = {**models.INTERN_IMAGE_PRESETS["intern_image_xl"], **TOY}
PRE_NORM_FORM = {**XL_FORM, "post_norm": False, "layer_scale": None, "offset_scale": 1.0,
                 "center_feature_scale": True, "dw_kernel_size": 5}


def randomised_encoder(kwargs, seed=0, size=SAMPLE_SIZE):
  """The JAX encoder with every parameter moved off its init (offsets and masks non-zero, so the
  deformable sampling leaves the grid), and its official state dict."""
  encoder = models.build_encoder("intern_image_xl", size, rngs=nnx.Rngs(seed), drop_path_rate=0.0, **kwargs)
  state = nnx.state(encoder, nnx.Param)
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(state)
  leaves = [l + jnp.asarray(rng.normal(0, 0.2, l.shape), l.dtype) for l in leaves]
  nnx.update(encoder, jax.tree.unflatten(treedef, leaves))
  sd = torch_convert.encoder_to_state_dict(nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))
  return encoder, sd


def twin_from(kwargs, sd):
  twin = twin_lib.build_twin(**kwargs, drop_path_rate=0.0).double().eval()
  twin.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in sd.items()}, strict=True)
  return twin


def images():
  return np.random.default_rng(1).normal(size=(2, SAMPLE_SIZE, SAMPLE_SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize("form", ["xl", "pre_norm"])
def test_encoder_matches_the_torch_twin_on_random_weights(form):
  kwargs = XL_FORM if form == "xl" else PRE_NORM_FORM
  encoder, sd = randomised_encoder(kwargs)
  x = images()
  ours = jax.jit(lambda m, x: m(x))(encoder, jnp.asarray(x))
  with torch.no_grad():
    theirs = twin_from(kwargs, sd)(torch.from_numpy(x.transpose(0, 3, 1, 2)).double())
  assert encoder.out_channels == (16, 32, 64, 128)
  for level, (a, b) in enumerate(zip(ours, theirs)):
    b = b.numpy().transpose(0, 2, 3, 1)
    assert a.shape == b.shape == (2, SAMPLE_SIZE // 4 >> level, SAMPLE_SIZE // 4 >> level, 16 << level)
    rel = np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()
    assert rel < 1e-4, (level, rel)
  # The deformable sampling really moved: zeroing the offsets changes the output.
  moved = twin_from(kwargs, {k: (np.zeros_like(v) if ".dcn.offset." in k else v) for k, v in sd.items()})
  with torch.no_grad():
    still = moved(torch.from_numpy(x.transpose(0, 3, 1, 2)).double())[-1].numpy().transpose(0, 2, 3, 1)
  assert np.abs(still - np.asarray(ours[-1])).max() > 1e-2


def test_official_names_and_the_xl_parameter_count():
  """XL's official keys and shapes (the twin loads both toy forms strictly, above)."""
  xl = nnx.eval_shape(lambda: models.build_encoder("intern_image_xl", 224, rngs=nnx.Rngs(0)))
  shapes = torch_convert.state_dict_shapes(nnx.to_pure_dict(nnx.state(xl, nnx.Param)))
  # 329.0M parameters; with the ImageNet classifier's conv_head (1536 -> 2304) and head the
  # InternImage paper's ~335M.
  assert sum(int(np.prod(s)) for s in shapes.values()) == 328_971_228
  assert xl.out_channels == (192, 384, 768, 1536)
  expected = {"patch_embed.conv1.weight": (96, 3, 3, 3), "patch_embed.norm1.1.weight": (96,),
              "patch_embed.norm2.1.bias": (192,), "levels.0.downsample.conv.weight": (384, 192, 3, 3),
              "levels.2.downsample.norm.1.weight": (1536,), "levels.2.blocks.23.gamma2": (768,),
              "levels.3.blocks.4.dcn.offset.weight": (96 * 18, 1536), "levels.3.blocks.4.dcn.mask.weight": (96 * 9, 1536),
              "levels.1.blocks.0.dcn.dw_conv.0.weight": (384, 1, 3, 3), "levels.1.blocks.0.dcn.dw_conv.1.1.weight": (384,),
              "levels.0.blocks.0.norm1.0.weight": (192,), "levels.0.blocks.0.mlp.fc1.weight": (768, 192)}
  assert {k: shapes[k] for k in expected} == expected
  assert not [k for k in shapes if k.startswith("levels.3.downsample") or ".norm.0." in k]   # post-norm: no stage norm


def test_export_and_import_round_trip_and_the_imagenet_head_is_refused_strictly(tmp_path):
  from mtp_jax.import_torch import import_checkpoint
  encoder, sd = randomised_encoder(XL_FORM, seed=3)
  params = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
  path = str(tmp_path / "encoder.safetensors")
  torch_convert.write_state_dict(sd, path)
  info = import_checkpoint(path, "intern_image_xl", SAMPLE_SIZE, str(tmp_path / "imported"), overrides=TOY)
  assert info["loaded"] == len(sd) and not info["missing"] and not info["unexpected"]
  back = torch_convert.encoder_to_state_dict(read_checkpoint(str(tmp_path / "imported"))[0]["encoder"])
  assert set(back) == set(sd)
  for key, value in torch_convert.encoder_to_state_dict(params).items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  # The ImageNet-22K->1K release (MTP's "IMP" start): the backbone under `model`, with the
  # classifier's conv_head and head, which the backbone lacks.
  head = {"conv_head.0.weight": np.ones((192, 128, 1, 1), np.float32), "head.weight": np.ones((5, 192), np.float32)}
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in {**sd, **head}.items()}, "epoch": 3},
             str(tmp_path / "imp.pth"))
  with pytest.raises(CheckpointError, match="unexpected keys: \\['conv_head.0.weight', 'head.weight'\\]"):
    import_checkpoint(str(tmp_path / "imp.pth"), "intern_image_xl", SAMPLE_SIZE, str(tmp_path / "strict"),
                      overrides=TOY, trust_pickle=True)
  info = import_checkpoint(str(tmp_path / "imp.pth"), "intern_image_xl", SAMPLE_SIZE, str(tmp_path / "loose"),
                           strict=False, overrides=TOY, trust_pickle=True)
  assert info["unexpected"] == ["conv_head.0.weight", "head.weight"] and info["loaded"] == len(sd)


def test_a_multiband_internimage_takes_the_rgb_stem_kernels_on_the_named_bands():
  w = np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32)
  sd, rule = torch_convert.adapt_input_bands({"patch_embed.conv1.weight": w}, 5, (3, 1, 0))
  out = sd["patch_embed.conv1.weight"]
  assert out.shape == (8, 5, 3, 3) and "input bands (3, 1, 0)" in rule
  np.testing.assert_array_equal(out[:, [3, 1, 0]], w)
  assert not out[:, [2, 4]].any()


def swin_layer_id(var_name: str, num_max_layer: int, depths) -> int:
  """InternImage's get_num_layer_for_swin (its layer-decay optimizer constructor), transcribed."""
  if var_name.startswith("backbone.patch_embed"):
    return 0
  if "level_embeds" in var_name:
    return 0
  if var_name.startswith("backbone.layers") or var_name.startswith("backbone.levels"):
    if var_name.split(".")[3] not in ["downsample", "norm"]:
      stage_id, layer_id = int(var_name.split(".")[2]), int(var_name.split(".")[4])
      if stage_id == 0:
        return layer_id + 1
      if stage_id == 1:
        return layer_id + 1 + depths[0]
      if stage_id == 2:
        return layer_id + 1 + depths[0] + depths[1]
      return layer_id + 1 + depths[0] + depths[1] + depths[2]
    stage_id = int(var_name.split(".")[2])
    if stage_id == 0:
      return 1 + depths[0]
    if stage_id == 1:
      return 1 + depths[0] + depths[1]
    if stage_id == 2:
      return 1 + depths[0] + depths[1] + depths[2]
    return 1 + depths[0] + depths[1] + depths[2]
  return num_max_layer - 1


def mtp_finetune_layer_id(var_name: str, num_max_layer: int, depths) -> int:
  """The id MTP's InternImage finetuning really assigns: its finetune constructors are copies of
  pretraining's, whose rule (swin_layer_id on `backbone.` names) was rewritten for the
  pretraining model's `encoder.patch_embed` / `encoder.levels` names (its finetune `mmcv_custom/custom_layer_decay_optimizer_constructor.py`). A finetune
  model's names start with `backbone.`, so they reach its last branch."""
  if var_name.startswith("encoder."):
    return swin_layer_id("backbone." + var_name[len("encoder."):], num_max_layer, depths)
  return num_max_layer - 1


def test_every_xl_parameter_of_a_finetune_gets_internimages_layer_decay():
  """EuroSAT with InternImage-XL (`:internimage`): lr 2e-5, drop path 0.2, and lr scale 1 on every
  parameter, as the original's constructor gives its finetune names (docs/fidelity.md). With the
  switch (`optimizer.layer_decay=0.94`) the decay its configs ask for: each parameter's
  multiplier is 0.94^(41 - id - 1) with InternImage's id of its official name (0.94^40 for the
  stem, 1 for the head), MTP_SPEC §2, §5.2. A pre-norm toy checks the stage norms' ids (stage 3's
  as stage 2's, as the original)."""
  from mtp_jax import experiment
  from mtp_jax.train import optimizer
  c = config_lib.load_config(f"{ROOT}/configs/finetune/eurosat.py:internimage")
  assert (c.model.encoder, c.optimizer.layer_decay, c.model.drop_path_rate, c.optimizer.lr) == (
      "intern_image_xl", 1.0, 0.2, 2e-5)
  tasks = experiment.tasks(c, {"eurosat": [f"c{i}" for i in range(10)]})
  pure = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: experiment.model(c, tasks, nnx.Rngs(0))), nnx.Param))
  names = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(pure):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    names[keys] = ("backbone." + torch_convert.torch_key(keys[1:])) if keys[0] == "encoder" else "head." + ".".join(keys[1:])
  default = optimizer.layer_decay_scales(pure, c.optimizer.layer_decay)
  for path, scale in jax.tree_util.tree_leaves_with_path(default):
    name = names[tuple(str(getattr(k, "key", k)) for k in path)]
    assert scale == 1.0 == 0.94 ** (41 - mtp_finetune_layer_id(name, 41, (5, 5, 24, 5)) - 1), name
  assert len(jax.eval_shape(optimizer.make_optimizer(c).init, pure)) == 2   # no layer-decay transform at all
  switched = config_lib.apply_overrides(c, ["optimizer.layer_decay=0.94"])
  assert len(jax.eval_shape(optimizer.make_optimizer(switched).init, pure)) == 3
  toy = nnx.eval_shape(lambda: models.build_encoder("intern_image_xl", 64, rngs=nnx.Rngs(0), **PRE_NORM_FORM))
  toy = {"encoder": nnx.to_pure_dict(nnx.state(toy, nnx.Param)), "heads": {"fc": np.zeros((4, 2))}}
  for params, depths, seen_all in ((pure, (5, 5, 24, 5), True), (toy, TOY["depths"], False)):
    scales = optimizer.layer_decay_scales(params, switched.optimizer.layer_decay)
    num_layers = sum(depths) + 2
    seen = set()
    for path, scale in jax.tree_util.tree_leaves_with_path(scales):
      keys = tuple(str(getattr(k, "key", k)) for k in path)
      name = ("backbone." + torch_convert.torch_key(keys[1:])) if keys[0] == "encoder" else "head." + ".".join(keys[1:])
      layer = swin_layer_id(name, num_layers, depths)
      assert scale == pytest.approx(0.94 ** (num_layers - layer - 1)), name
      seen.add(layer)
    assert seen == set(range(num_layers)) or not seen_all
  toy_scales = optimizer.layer_decay_scales(toy, 0.94)["encoder"]["levels"]
  assert toy_scales[3]["norm"][0]["scale"] == toy_scales[2]["norm"][0]["scale"] == pytest.approx(0.94)   # id 5 of 7


def test_recipes_hold_internimages_settings():
  c = config_lib.load_config(f"{ROOT}/configs/pretrain/mtp_internimage_xl.py:fsdp")
  assert (c.model.encoder, c.data.image_size, c.train.num_steps, c.optimizer.lr, c.optimizer.layer_decay,
          c.model.drop_path_rate, c.model.remat, c.optimizer.warmup_steps, tuple(c.mesh.shape)) == (
      "intern_image_xl", 448, 80_000, 2e-5, 0.94, 0.2, True, 0, (1, -1, 1))
  assert tasks_lib.enabled(c) == ("ss", "is", "rd")
  dior_r = config_lib.load_config(f"{ROOT}/configs/finetune/dior_r.py:internimage")
  assert (dior_r.model.encoder, dior_r.optimizer.lr, dior_r.optimizer.layer_decay) == ("intern_image_xl", 1e-4, 1.0)
  smoke = config_lib.load_config(f"{ROOT}/configs/finetune/levir_cd.py:smoke+internimage")
  assert smoke.model.encoder == "intern_image_xl" and dict(smoke.model.encoder_overrides) == TOY
  with pytest.raises(ValueError, match="embed_dim"):
    models.build_encoder("intern_image_xl", 64, embed_dim=8)
  with pytest.raises(ValueError, match="multiples of 32"):
    models.build_encoder("intern_image_xl", 64, **TOY)(jnp.zeros((1, 48, 64, 3)))


# ---- training ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def internimage_pretraining(tfrecord_dir, tmp_path_factory):
  """configs/pretrain/mtp_internimage_xl.py with the toy InternImage and the tests' toy heads on
  the 64 px sample: 3 steps of the three-task step on the 8-device mesh, then evaluation. Without
  the recipe's activation checkpointing: it changes memory, not results (test_layers), and adds
  the recomputed forward to the step this test compiles."""
  from mtp_jax.train import loop
  sets = [s for s in tiny_overrides(tfrecord_dir, **TINY_IS, **TINY_RD) if not s.startswith("model.encoder_overrides.")]
  sets += [f"model.encoder_overrides.{k}={v!r}" for k, v in TOY.items()]
  # One device: the sharded step has its own tests; here only the encoder is new.
  sets += ["train.num_steps=3", "eval.every_steps=0", "train.keep_every=0", "optimizer.lr=1e-3", "model.remat=False",
           "mesh.num_devices=1"]
  config = config_lib.apply_overrides(config_lib.load_config(f"{ROOT}/configs/pretrain/mtp_internimage_xl.py"), sets)
  workdir = str(tmp_path_factory.mktemp("internimage_pretrain"))
  return config, workdir, loop.train_and_evaluate(config, workdir)


def test_the_toy_internimage_trains_in_the_three_task_pretraining(internimage_pretraining):
  from mtp_jax import experiment
  config, workdir, results = internimage_pretraining
  history = results["train"]["history"]
  assert len(history) == 3 and all(np.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history)
  components = {k.split("/")[0] for k in history[-1] if "/" in k}
  assert {"ss", "is", "rd"} <= components, sorted(history[-1])
  for subset in ("sota", "sior", "fast"):
    assert set(results["eval"][subset]) == {"ss", "is", "rd"}
  # Every stage moved from its initialisation (layer decay scales, never zeroes, the updates).
  params, batch_stats, _, step = read_checkpoint(workdir)
  assert step == 3
  tasks = experiment.tasks(config)
  init = nnx.to_pure_dict(nnx.state(experiment.model(config, tasks, nnx.Rngs(config.seed)), nnx.Param))
  trained, start = (torch_convert.encoder_to_state_dict(p["encoder"]) for p in (params, init))
  assert set(trained) == set(start)
  for prefix in ("patch_embed.", "levels.0.", "levels.1.", "levels.2.", "levels.3."):
    moved = max(np.abs(trained[k] - start[k]).max() for k in trained if k.startswith(prefix))
    assert moved > 1e-5, prefix
  # The whole model exports in the official layout (`encoder.levels.*` beside the decoders) and
  # reads back strictly into the same tree.
  from mtp_jax.checkpoints import full_model
  from mtp_jax.checkpoints.sources import model_state_dict
  sd, _ = model_state_dict(workdir)
  assert "encoder.levels.2.blocks.1.dcn.offset.weight" in sd and "rotdetdecoder.neck.lateral_convs.3.conv.weight" in sd
  assert sd["rotdetdecoder.neck.lateral_convs.3.conv.weight"].shape[1] == 128   # stage 4's width
  tree = full_model.model_state_tree(params, batch_stats)
  back, report = full_model.state_dict_to_model(sd, tree, ("sota", "sior", "fast"))
  assert not report["missing"] and not report["unexpected"]
  back, tree = dict(torch_convert.flatten_params(back)), dict(torch_convert.flatten_params(tree))
  assert set(back) == set(tree)
  for path, value in tree.items():
    np.testing.assert_array_equal(np.asarray(back[path]), np.asarray(value), err_msg=str(path))


def test_a_finetune_smoke_starts_from_the_internimage_pretraining(internimage_pretraining, tmp_path, capsys):
  """eurosat.py:smoke+internimage from the pretraining workdir: every encoder tensor loaded, and the
  classifier on the 1536-d (here 128-d) last map learns."""
  from data_pipelines import convert as convert_cli
  from data_pipelines.downstream import synthetic
  from mtp_jax.train import loop
  _, pretrain_dir, _ = internimage_pretraining
  raw, data = str(tmp_path / "raw"), str(tmp_path / "data")
  synthetic.write_scene_release("eurosat", raw, per_class=10, seed=1)
  convert_cli.convert_release(convert_cli.RELEASES["eurosat"], raw, data, seed=0, log=lambda *_: None)
  c = config_lib.load_config(f"{ROOT}/configs/finetune/eurosat.py:smoke+internimage")
  c = config_lib.apply_overrides(c, [f"data.dir={data!r}", "mesh.num_devices=1", f"model.encoder_init={pretrain_dir!r}",
                                     "train.num_steps=20"])
  results = loop.train_and_evaluate(c, str(tmp_path / "work"))
  printed = capsys.readouterr().out
  n_encoder = len(list(torch_convert.flatten_params(read_checkpoint(pretrain_dir)[0]["encoder"])))
  assert f"{n_encoder} tensors loaded; 0 encoder parameters kept their initialisation" in printed
  losses = [h["loss"] for h in results["train"]["history"]]
  assert losses[-1] < losses[0] - 0.2, losses
  r = results["eval"]["eurosat"]["cls"]
  assert r["images"] == 20 and r["overall_accuracy"] > 0.2
