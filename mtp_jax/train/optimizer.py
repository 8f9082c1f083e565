"""AdamW with a cosine schedule and gradient clipping (MTP_SPEC §3.5).

lr_t = lr * 0.5 * (1 + cos(pi * t / num_steps)) down to 0, after an optional linear warmup from 0
(the original has none). Global-norm clipping (5) comes before AdamW. Weight decay skips 1-D
parameters (biases, norms) and `pos_embed`. Layer-wise lr decay arrives with the scale-out issue
(it was a silent no-op in the original pretraining, §7.1, so uniform lr is faithful here).
"""

import jax
import optax


def learning_rate_schedule(config):
  opt, steps = config.optimizer, config.train.num_steps
  if opt.warmup_steps:
    return optax.warmup_cosine_decay_schedule(0.0, opt.lr, opt.warmup_steps, max(steps, opt.warmup_steps + 1), 0.0)
  return optax.cosine_decay_schedule(opt.lr, max(steps, 1), alpha=0.0)


def weight_decay_mask(params):
  """True where weight decay applies: parameters with ndim >= 2 other than pos_embed."""
  def decide(path, leaf):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return leaf.ndim >= 2 and "pos_embed" not in names
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(config) -> optax.GradientTransformation:
  opt = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=opt.b1, b2=opt.b2,
                  weight_decay=opt.weight_decay, mask=weight_decay_mask))
