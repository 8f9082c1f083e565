"""AdamW with a cosine schedule, gradient clipping and layer-wise lr decay (MTP_SPEC §3.5, §5.1).

lr_t = lr * 0.5 * (1 + cos(pi * t / num_steps)) down to 0, after an optional linear warmup from 0
(the original's pretraining has none); with `optimizer.epoch_steps` the cosine moves once per
epoch (mmengine's by_epoch=True, the original's classification and change-detection finetuning). `optimizer.schedule = "step"` is mmdet's detection schedule instead:
lr times `decay_factor` at each of `decay_steps` (MultiStepLR, epochs 8 and 11 of 12 in MTP's
detection finetuning), times the linear warmup factor min(1, t / warmup_steps), the product
mmengine forms when LinearLR and MultiStepLR run together (ours warms up from 0, mmengine's
from start_factor x lr). Global-norm clipping (`grad_clip_norm`: 5 in pretraining, 0 = none in
finetuning, as the original) comes before AdamW. Weight decay skips 1-D
parameters (biases, norms) and `pos_embed`.

Layer-wise lr decay (`optimizer.layer_decay` = rate < 1) multiplies each parameter's whole AdamW
update, weight decay included, by rate^(L + 1 - id), L the encoder's block count, with the
original's layer ids:
- ViT (mmcv's get_num_layer_for_vit): 0 for patch_embed and pos_embed, i + 1 for block i, L + 1
  (scale 1) for everything else;
- InternImage (its get_num_layer_for_swin, MTP_SPEC §2; L = sum(depths) = 39 for XL, the
  constructor's num_layers + 2 = 41 groups): 0 for patch_embed, 1 + sum(depths[:s]) + j for block
  j of stage s, 1 + sum(depths[:s + 1]) for stage s's downsample and norm, L + 1 for everything
  else. Deliberate, as the original: stage 3's norm gets 1 + sum(depths[:3]) (its else branch),
  the id of stage 3's first block.
This equals the constructors' per-group lr, which scales torch's AdamW step and its decoupled
decay alike. The original's ViT pretraining asked for 0.9 but applied 1 (§7.1); rate 1.0 (the
default) reproduces that, and the transform is then left out. InternImage's rule matched its
pretraining names, so its 0.94 applies in pretraining too (§3.5).
"""

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(config):
  opt, steps = config.optimizer, config.train.num_steps
  if opt.schedule == "step":
    boundaries, factor, warmup = tuple(int(b) for b in opt.decay_steps), opt.decay_factor, opt.warmup_steps

    def step_schedule(count):
      count = jnp.asarray(count, jnp.float32)
      lr = opt.lr * jnp.asarray(factor, jnp.float32) ** sum((count >= b).astype(jnp.float32) for b in boundaries)
      return lr * jnp.minimum(1.0, count / warmup) if warmup else lr

    return step_schedule
  if opt.epoch_steps:
    return per_epoch_cosine(opt.lr, opt.warmup_steps, steps, opt.epoch_steps)
  if opt.warmup_steps:
    return optax.warmup_cosine_decay_schedule(0.0, opt.lr, opt.warmup_steps, max(steps, opt.warmup_steps + 1), 0.0)
  return optax.cosine_decay_schedule(opt.lr, max(steps, 1), alpha=0.0)


def per_epoch_cosine(lr: float, warmup: int, steps: int, epoch_steps: int):
  """mmengine's LinearLR (per iteration) over the first `warmup` steps, then CosineAnnealingLR with
  by_epoch=True: during epoch e (steps [e E, (e + 1) E)) the lr is
  lr * 0.5 * (1 + cos(pi * (e E - warmup) / (steps - warmup))), i.e. with warmup = w epochs and
  steps = n epochs, T_max = n - w epochs and the lr of epoch e is cosine((e - w) / (n - w))."""
  span = max(steps - warmup, 1)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    epoch_start = jnp.floor(count / epoch_steps) * epoch_steps
    cosine = 0.5 * lr * (1 + jnp.cos(jnp.pi * jnp.clip((epoch_start - warmup) / span, 0.0, 1.0)))
    return jnp.where(count < warmup, lr * count / max(warmup, 1), cosine)

  return schedule


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def weight_decay_mask(params):
  """True where weight decay applies: parameters with ndim >= 2 other than pos_embed."""
  def decide(path, leaf):
    return leaf.ndim >= 2 and "pos_embed" not in _names(path)
  return jax.tree_util.tree_map_with_path(decide, params)


def encoder_depth(params) -> int:
  """Number of encoder blocks, read from the parameter tree (`encoder/blocks/<i>/...`, or
  InternImage's `encoder/levels/<s>/blocks/<j>/...` summed over its stages)."""
  return sum(stage_depths(params)) or max(
      (int(n[2]) + 1 for n in _leaf_names(params) if n[:2] == ["encoder", "blocks"]), default=0)


def stage_depths(params) -> tuple[int, ...]:
  """InternImage's blocks per stage (() for an encoder without `levels`)."""
  depths = {}
  for n in _leaf_names(params):
    if n[:2] == ["encoder", "levels"] and len(n) > 4 and n[3] == "blocks":
      depths[int(n[2])] = max(depths.get(int(n[2]), 0), int(n[4]) + 1)
  return tuple(depths[s] for s in sorted(depths))


def _leaf_names(params):
  return (_names(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))


def vit_layer_id(names: list[str], depth: int) -> int:
  """mmcv's get_num_layer_for_vit on our parameter paths (see the module docstring)."""
  if names[:1] == ["encoder"] and len(names) > 1:
    if names[1] in ("patch_embed", "pos_embed", "cls_token"):
      return 0
    if names[1] == "blocks":
      return int(names[2]) + 1
  return depth + 1


def intern_image_layer_id(names: list[str], depths: tuple[int, ...]) -> int:
  """InternImage's get_num_layer_for_swin on our parameter paths (see the module docstring)."""
  if names[:1] == ["encoder"] and len(names) > 1:
    if names[1] == "patch_embed":
      return 0
    if names[1] == "levels":
      stage = int(names[2])
      if names[3] == "blocks":
        return 1 + sum(depths[:stage]) + int(names[4])
      return 1 + sum(depths[:min(stage, 2) + 1])   # downsample / norm; stage 3 as stage 2 (deliberate)
  return sum(depths) + 1


def layer_decay_scales(params, rate: float):
  """Per-parameter lr multipliers rate^(L + 1 - id), as a tree shaped like `params`."""
  depths = stage_depths(params)
  depth = encoder_depth(params)
  layer_id = (lambda n: intern_image_layer_id(n, depths)) if depths else (lambda n: vit_layer_id(n, depth))
  return jax.tree_util.tree_map_with_path(
      lambda path, _: float(rate ** (depth + 1 - layer_id(_names(path)))), params)


def scale_by_layer_decay(rate: float) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's layer-decay scale (static per-leaf constants)."""
  def update(updates, state, params=None):
    del params
    scales = layer_decay_scales(updates, rate)
    return jax.tree.map(lambda u, s: u * s, updates, scales), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def encoder_mask(params):
  """True on the encoder's parameters."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _names(path)[:1] == ["encoder"], params)


def zero_encoder_updates() -> optax.GradientTransformation:
  """The encoder's updates set to exactly 0 (weight decay included): a frozen encoder."""
  def update(updates, state, params=None):
    del params
    frozen = encoder_mask(updates)
    return jax.tree.map(lambda u, f: jax.numpy.zeros_like(u) if f else u, updates, frozen), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW (+ clipping, layer decay). model.freeze_encoder: the encoder's updates are exactly
  zero (no weight decay either). Its gradients are zero too (the model stops them), so clipping
  sees the heads' alone; its AdamW moments stay allocated, at zero (a masked optimizer would
  save them, but optax's MaskedNode leaves break the state's sharding tree)."""
  opt = config.optimizer
  # No clipping keeps a stateless placeholder, so the optimizer state has one layout either way.
  clip = optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm > 0 else optax.identity()
  parts = [clip,
           optax.adamw(learning_rate_schedule(config), b1=opt.b1, b2=opt.b2,
                       weight_decay=opt.weight_decay, mask=weight_decay_mask)]
  if opt.layer_decay < 1.0:
    parts.append(scale_by_layer_decay(opt.layer_decay))
  if config.model.freeze_encoder:
    parts.append(zero_encoder_updates())
  return optax.chain(*parts)
