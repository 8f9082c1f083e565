"""The multi-task train step: a pure function over the TrainState, jitted with explicit shardings.

batch: {'image': (b*G, S, S, 3) uint8, 'semantic': (b*G, S, S) uint8}, rows interleaved by subset
(mtp_jax/models/multitask.py). Loss = sum over tasks and subsets of each loss times its task's
weight (config.tasks.<task>.weight, 1 as in the original, MTP_SPEC §3.2). The key for stochastic
depth and dropout is folded from the step (and from the micro-batch index when accumulating).
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtp_jax.metrics.segmentation import ConfusionMatrix
from mtp_jax.models.heads.upernet import segmentation_loss
from mtp_jax.train.state import TrainState


def split_by_subset(x, groups: int):
  """(b*G, ...) interleaved rows -> (b, G, ...)."""
  return x.reshape(x.shape[0] // groups, groups, *x.shape[1:])


def loss_normalizers(batch: dict, subsets, ignore_index: int = 255) -> dict:
  """{'ss/<subset>': labelled pixels of that subset in the whole batch}: each task loss's mean."""
  labels = split_by_subset(batch["semantic"], len(subsets))
  return {f"ss/{s}": (labels[:, g] != ignore_index).sum() for g, s in enumerate(subsets)}


def compute_losses(outputs: dict, batch: dict, subsets, weights: dict, normalizers: dict) -> dict:
  """{'loss': weighted total, '<task>/<subset>': unweighted ...} (MTP_SPEC §3.2: all weights 1)."""
  losses = {}
  total = 0.0
  if "ss" in outputs:
    labels = split_by_subset(batch["semantic"], len(subsets))
    for g, s in enumerate(subsets):
      losses[f"ss/{s}"], _ = segmentation_loss(outputs["ss"][s], labels[:, g],
                                               normalizer=normalizers[f"ss/{s}"])
      total = total + weights["ss"] * losses[f"ss/{s}"]
  losses["loss"] = total
  return losses


def split_micro_batches(batch: dict, k: int, shards: int) -> dict:
  """(B, ...) leaves -> (k, B / k, ...): micro-batch j takes the j-th k-th of every device's rows.

  Each device keeps its own rows (no communication) and every micro-batch spans all devices;
  rows stay in whole subset groups when B / (shards * k) is a multiple of the group count.
  """
  def split(x):
    rows = x.shape[0] // (shards * k)
    x = x.reshape(shards, k, rows, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(k, shards * rows, *x.shape[3:])
  return jax.tree.map(split, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, subsets, base_key, *,
                    schedule=None, task_weights=None, accum_steps: int = 1, batch_shards: int = 1,
                    skip_nonfinite: bool = True):
  """Returns step(state, batch) -> (state, metrics); jit it with shardings and donation.

  accum_steps = k > 1 splits the batch into k micro-batches (`split_micro_batches`), runs them
  one after another (lax.scan) and applies the summed gradient once. Each loss is normalised by
  its whole batch's count, so without dropout and BatchNorm this is exactly one step on the whole
  batch. BatchNorm layers normalise each micro-batch by its own statistics and update their
  running statistics once per micro-batch, as accumulation does in every framework.
  skip_nonfinite: a step whose loss or gradient norm is not finite keeps the old parameters,
  optimizer and BatchNorm state, and counts itself in `state.nonfinite_steps`.
  """
  weights = dict(task_weights or {"ss": 1.0})

  def micro_grads(params, batch_stats, batch, key, normalizers):
    def loss_fn(params, batch_stats):  # batch_stats as an argument: mutated inside this trace
      model = nnx.merge(graphdef, params, batch_stats, copy=True)
      outputs = model(batch["image"], train=True, key=key)
      losses = compute_losses(outputs, batch, subsets, weights, normalizers)
      return losses["loss"], (losses, nnx.state(model, nnx.BatchStat))
    (_, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
    return grads, losses, batch_stats

  def step(state: TrainState, batch: dict):
    key = jax.random.fold_in(base_key, state.step)
    normalizers = loss_normalizers(batch, subsets)
    if accum_steps == 1:
      grads, losses, batch_stats = micro_grads(state.params, state.batch_stats, batch, key, normalizers)
    else:
      def body(carry, xs):
        grad_sum, loss_sum, batch_stats = carry
        micro, j = xs
        grads, losses, batch_stats = micro_grads(state.params, batch_stats, micro,
                                                 jax.random.fold_in(key, j), normalizers)
        return (jax.tree.map(jnp.add, grad_sum, grads), jax.tree.map(jnp.add, loss_sum, losses),
                batch_stats), None
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      loss_zeros = {name: jnp.zeros((), jnp.float32) for name in [*normalizers, "loss"]}
      (grads, losses, batch_stats), _ = jax.lax.scan(
          body, (zeros, loss_zeros, state.batch_stats),
          (split_micro_batches(batch, accum_steps, batch_shards), jnp.arange(accum_steps)))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(losses["loss"]) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      batch_stats = keep(batch_stats, state.batch_stats)
    nonfinite = state.nonfinite_steps + (~finite).astype(jnp.int32)
    metrics = dict(losses, grad_norm=grad_norm, nonfinite_steps=nonfinite)
    if schedule is not None:  # the optimizer's count: skipped steps do not advance it
      metrics["learning_rate"] = schedule(state.step - state.nonfinite_steps)
    new_state = TrainState(step=state.step + 1, nonfinite_steps=nonfinite, params=params,
                           batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return step


def make_eval_step(graphdef, subsets, num_classes: dict, ignore_index: int = 255):
  """Returns eval_step(params, batch_stats, batch) -> (preds, confusions).

  batch: "image" (B, S, S, 3), "semantic" (B, S, S), "is_real" (B,), rows interleaved by subset.
  preds: {subset: (b, S, S) int32 class maps}, logits bilinearly resized to the input size.
  confusions: {subset: ConfusionMatrix} over the whole (global) batch, padded images and
  `ignore_index` pixels left out; num_classes[subset] counts background (class 0).
  """

  def eval_step(params, batch_stats, batch):
    model = nnx.merge(graphdef, params, batch_stats)
    outputs = model(batch["image"], train=False)
    size = batch["image"].shape[1:3]
    labels = split_by_subset(batch["semantic"], len(subsets))
    real = split_by_subset(batch["is_real"], len(subsets))
    preds, confusions = {}, {}
    for g, s in enumerate(subsets):
      logits = outputs["ss"][s]
      logits = jax.image.resize(logits, (logits.shape[0], *size, logits.shape[-1]), "bilinear", antialias=False)
      preds[s] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      confusions[s] = ConfusionMatrix.from_model_output(
          labels=labels[:, g], predictions=preds[s], num_classes=num_classes[s],
          ignore_index=ignore_index, mask=real[:, g])
    return preds, confusions

  return eval_step
