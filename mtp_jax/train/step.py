"""The multi-task train step: a pure function over the TrainState, jitted with explicit shardings.

batch: {'image': (b*G, S, S, 3) uint8, 'semantic': (b*G, S, S) uint8}, rows interleaved by subset
(mtp_jax/models/multitask.py). Loss = sum over tasks and subsets of each loss (all weights 1, as
the original, MTP_SPEC §3.2). The key for stochastic depth and dropout is folded from the step.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtp_jax.models.heads.upernet import segmentation_loss
from mtp_jax.train.state import TrainState


def split_by_subset(x, groups: int):
  """(b*G, ...) interleaved rows -> (b, G, ...)."""
  return x.reshape(x.shape[0] // groups, groups, *x.shape[1:])


def compute_losses(outputs: dict, batch: dict, subsets) -> dict:
  """{'loss': total, 'ss/<subset>': ...} from the model outputs and the batch labels."""
  losses = {}
  if "ss" in outputs:
    labels = split_by_subset(batch["semantic"], len(subsets))
    for g, s in enumerate(subsets):
      losses[f"ss/{s}"], _ = segmentation_loss(outputs["ss"][s], labels[:, g])
  losses["loss"] = sum(losses.values())
  return losses


def make_train_step(graphdef, tx: optax.GradientTransformation, subsets, base_key):
  """Returns step(state, batch) -> (state, metrics); jit it with shardings and donation."""

  def step(state: TrainState, batch: dict):
    key = jax.random.fold_in(base_key, state.step)

    def loss_fn(params, batch_stats):  # batch_stats as an argument: mutated inside this trace
      model = nnx.merge(graphdef, params, batch_stats, copy=True)
      outputs = model(batch["image"], train=True, key=key)
      losses = compute_losses(outputs, batch, subsets)
      return losses["loss"], (losses, nnx.state(model, nnx.BatchStat))

    (_, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(losses, grad_norm=optax.tree.norm(grads))
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state)
    return new_state, metrics

  return step


def make_predict(graphdef):
  """Returns predict(params, batch_stats, images) -> {subset: (b, S, S) int32 class maps}."""

  def predict(params, batch_stats, images):
    model = nnx.merge(graphdef, params, batch_stats)
    outputs = model(images, train=False)
    size = images.shape[1:3]
    preds = {}
    for s, logits in outputs["ss"].items():
      logits = jax.image.resize(logits, (logits.shape[0], *size, logits.shape[-1]), "bilinear", antialias=False)
      preds[s] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return preds

  return predict
