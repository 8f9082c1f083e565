"""Optimizer settings of §3.5: layer-wise lr decay that really applies (and 1.0, the paper's
effective setting, leaves it out), weight-decay exclusions, and the paper configs' values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtp_jax import config as config_lib, tasks as tasks_lib
from mtp_jax.errors import ConfigError
from mtp_jax.train import optimizer

from conftest import ROOT


def toy_params(depth=3):
  """A tree shaped like the model's params (names as in nnx.State)."""
  blocks = {i: {"attn": {"qkv": {"kernel": jnp.ones((4, 12))}}, "norm1": {"scale": jnp.ones(4)}} for i in range(depth)}
  return {"encoder": {"patch_embed": {"proj": {"kernel": jnp.ones((2, 2, 3, 4))}}, "pos_embed": jnp.ones((1, 4, 4)),
                      "blocks": blocks, "fpn1": {"0": {"kernel": jnp.ones((2, 2, 4, 4))}}},
          "semsegdecoder": {"bottleneck": {"conv": {"kernel": jnp.ones((3, 3, 4, 4))}}}}


def test_layer_decay_scales_follow_mmcv_and_really_scale_the_update():
  params = toy_params()
  scales = optimizer.layer_decay_scales(params, 0.9)   # L = 3: ids 0, 1..3, 4
  assert scales["encoder"]["patch_embed"]["proj"]["kernel"] == pytest.approx(0.9 ** 4)
  assert scales["encoder"]["pos_embed"] == pytest.approx(0.9 ** 4)
  assert [scales["encoder"]["blocks"][i]["attn"]["qkv"]["kernel"] for i in range(3)] == pytest.approx([0.9 ** 3, 0.9 ** 2, 0.9])
  assert scales["encoder"]["fpn1"]["0"]["kernel"] == 1.0 and scales["semsegdecoder"]["bottleneck"]["conv"]["kernel"] == 1.0

  c = config_lib.pretrain_defaults()
  c.train.num_steps = 10
  grads = jax.tree.map(lambda p: jnp.linspace(-1, 1, p.size).reshape(p.shape), params)
  def first_update(rate):
    c.optimizer.layer_decay = rate
    tx = optimizer.make_optimizer(c)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates
  flat, decayed = first_update(1.0), first_update(0.9)
  for path, u in jax.tree_util.tree_leaves_with_path(decayed):
    want = jax.tree_util.tree_flatten_with_path(flat)[0]
    ref = dict((jax.tree_util.keystr(p), v) for p, v in want)[jax.tree_util.keystr(path)]
    scale = optimizer.vit_layer_id([str(getattr(k, "key", k)) for k in path], 3)
    np.testing.assert_allclose(u, ref * 0.9 ** (4 - scale), rtol=1e-6)   # weight decay scaled alike
  assert len(optimizer.make_optimizer(c).init(params)) == 3
  c.optimizer.layer_decay = 1.0
  assert len(optimizer.make_optimizer(c).init(params)) == 2   # the paper's effective setting: no transform at all


def test_weight_decay_skips_vectors_and_pos_embed():
  mask = optimizer.weight_decay_mask(toy_params())
  assert mask["encoder"]["pos_embed"] is False and mask["encoder"]["blocks"][0]["norm1"]["scale"] is False
  assert mask["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"] is True
  assert optimizer.encoder_depth(toy_params(5)) == 5


def test_paper_configs_hold_the_paper_settings():
  for name, encoder in [("mtp_vit_b_rvsa", "vit_b_rvsa"), ("mtp_vit_l_rvsa", "vit_l_rvsa")]:
    c = config_lib.load_config(f"{ROOT}/configs/pretrain/{name}.py")
    assert (c.model.encoder, c.data.image_size, c.train.num_steps, c.optimizer.lr, c.optimizer.weight_decay,
            c.optimizer.grad_clip_norm, c.model.drop_path_rate, c.data.batch_per_subset, c.optimizer.warmup_steps,
            c.optimizer.layer_decay) == (encoder, 448, 80_000, 6e-5, 0.05, 5.0, 0.1, 32, 0, 1.0)
    assert tasks_lib.enabled(c) == ("ss", "is", "rd") and not c.tasks.cls.enabled
  fsdp = config_lib.load_config(f"{ROOT}/configs/pretrain/mtp_vit_l_rvsa.py:fsdp+bf16")
  assert tuple(fsdp.mesh.shape) == (1, -1, 1) and fsdp.model.compute_dtype == "bfloat16"
  with pytest.raises(ConfigError, match="tasks.is.init"):
    config_lib.apply_overrides(config_lib.load_config(f"{ROOT}/configs/pretrain/mtp_vit_b_rvsa.py"), ["tasks.is.init='torch'"])
  with pytest.raises(ConfigError, match="layer_decay"):
    config_lib.apply_overrides(config_lib.load_config(f"{ROOT}/configs/pretrain/mtp_vit_b_rvsa.py"), ["optimizer.layer_decay=1.5"])


def mmcv_layer_id_for_vit(name: str, num_layers: int) -> int:
  """mmcv/MTP's get_num_layer_for_vit on an official finetune parameter name (MTP_SPEC §5.1)."""
  if name.startswith(("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed",
                      "backbone.patch_embed")):
    return 0
  if name.startswith("backbone.blocks"):
    return int(name.split(".")[2]) + 1
  return num_layers + 1


def test_every_vit_b_parameter_of_a_finetune_gets_the_official_layer_decay():
  """ViT-B + RVSA with the classification head, layer decay 0.9: each parameter's multiplier is
  0.9^(13 - id) with mmcv's ids on its official name (0.9^13 = 0.254 for patch_embed, 0.9 for
  block 11, 1 for the fpn and the head), §5.1."""
  from flax import nnx
  from mtp_jax.checkpoints import torch_convert
  from mtp_jax import experiment
  c = config_lib.load_config(f"{ROOT}/configs/finetune/eurosat.py")
  assert (c.model.encoder, c.optimizer.layer_decay, c.model.drop_path_rate, c.optimizer.lr,
          c.data.image_size, c.data.batch_per_subset) == ("vit_b_rvsa", 0.9, 0.3, 6e-5, 224, 64)
  tasks = experiment.tasks(c, {"eurosat": [f"c{i}" for i in range(10)]})
  params = nnx.state(nnx.eval_shape(lambda: experiment.model(c, tasks, nnx.Rngs(0))), nnx.Param)
  pure = nnx.to_pure_dict(params)
  scales = optimizer.layer_decay_scales(pure, c.optimizer.layer_decay)
  seen = set()
  for path, scale in jax.tree_util.tree_leaves_with_path(scales):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    if keys[0] == "encoder":
      name = "backbone." + torch_convert.torch_key(keys[1:])
    else:
      name = "head." + ".".join(keys[1:])
    layer = mmcv_layer_id_for_vit(name, 12)
    assert scale == pytest.approx(0.9 ** (13 - layer)), name
    seen.add(layer)
  assert seen == set(range(14))
  assert scales["encoder"]["patch_embed"]["proj"]["kernel"] == pytest.approx(0.2541865828)


def finetune_configs():
  """Every finetune config, as a user loads it, with each option that changes the recipe."""
  import glob
  for path in sorted(glob.glob(f"{ROOT}/configs/finetune/*.py")):
    for arg in ("", ":internimage", ":frozen"):
      yield path.rsplit("/", 1)[1] + arg, config_lib.load_config(path + arg)


def test_no_finetune_config_clips_gradients_and_no_clipping_is_plain_adamw():
  """The original's mmengine finetune configs set no clip_grad: 0 = no clipping.
  Two steps whose gradients differ 100x in scale: with no clipping the updates are optax's AdamW
  alone; clipping at 5 (pretraining) changes the second update."""
  for name, c in finetune_configs():
    assert c.optimizer.grad_clip_norm == 0, name
  c = config_lib.load_config(f"{ROOT}/configs/finetune/eurosat.py")
  c.optimizer.layer_decay, c.optimizer.warmup_steps = 1.0, 0
  params = toy_params()
  grads = jax.tree.map(lambda p: jnp.linspace(-1, 1, p.size).reshape(p.shape), params)
  def two_updates(tx):
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(lambda g: 100 * g, grads), state, params)
    return tx.update(grads, state, params)[0]
  plain = optax.adamw(optimizer.learning_rate_schedule(c), b1=0.9, b2=0.999, weight_decay=0.05,
                      mask=optimizer.weight_decay_mask)
  unclipped = two_updates(optimizer.make_optimizer(c))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), unclipped, two_updates(plain))
  c.optimizer.grad_clip_norm = 5.0
  clipped = two_updates(optimizer.make_optimizer(c))
  change = max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(unclipped)))
  assert change > 0.01, change
  with pytest.raises(ConfigError, match="grad_clip_norm"):
    config_lib.apply_overrides(c, ["optimizer.grad_clip_norm=-1.0"])


def mmengine_lr(step: int, lr: float, epoch_steps: int, warmup_epochs: int, epochs: int) -> float:
  """The original's classification / change-detection schedule, transcribed from its configs:
  LinearLR(start_factor=1e-6, by_epoch=True, begin=0, end=warmup_epochs, convert_to_iter_based=True)
  then CosineAnnealingLR(T_max=epochs - warmup_epochs, by_epoch=True, begin=warmup_epochs,
  end=epochs), mmengine's closed forms."""
  warmup = warmup_epochs * epoch_steps
  if step < warmup:
    return lr * (1e-6 + (1 - 1e-6) * step / warmup)
  epoch = step // epoch_steps
  return lr * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_classification_and_change_detection_step_the_cosine_once_per_epoch():
  """The original's by_epoch=True, so the lr is a staircase of one value per epoch after the
  per-iteration warmup; every classification and change-detection config sets it up with whole
  epochs, the others keep a per-step schedule."""
  for name, c in finetune_configs():
    family = tasks_lib.enabled(c)[0]
    if family in ("cls", "cd"):
      e = c.optimizer.epoch_steps
      assert e > 0 and c.train.num_steps % e == 0 and c.optimizer.warmup_steps == 5 * e, name
    else:
      assert c.optimizer.epoch_steps == 0, name
  c = config_lib.load_config(f"{ROOT}/configs/finetune/eurosat.py")
  e, epochs = c.optimizer.epoch_steps, c.train.num_steps // c.optimizer.epoch_steps
  steps = np.arange(c.train.num_steps)
  ours = np.asarray(jax.jit(jax.vmap(optimizer.learning_rate_schedule(c)))(steps))
  want = np.array([mmengine_lr(int(t), c.optimizer.lr, e, 5, epochs) for t in steps])
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-10)
  after = ours[5 * e:].reshape(epochs - 5, e)
  assert (after == after[:, :1]).all() and (np.diff(after[:, 0]) < 0).all()   # one value per epoch, falling
  assert (np.diff(ours[:5 * e]) > 0).all()                                     # the warmup rises every step
  per_step = config_lib.apply_overrides(c, ["optimizer.epoch_steps=0"])
  smooth = np.asarray(jax.vmap(optimizer.learning_rate_schedule(per_step))(steps[5 * e:]))
  assert (np.diff(smooth) <= 0).all() and np.ptp(smooth[45 * e:46 * e]) > 0   # falls within an epoch
  with pytest.raises(ConfigError, match="epoch_steps"):
    config_lib.apply_overrides(c, ["optimizer.epoch_steps=-3"])
