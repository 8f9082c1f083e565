"""The multi-task train step: a pure function over the TrainState, jitted with explicit shardings.

batch: {'image': (b*G, S, S, 3) uint8, rows interleaved by subset (mtp_jax/models/multitask.py),
'gt': {subset: {field: (b, ...)}}, the fields every enabled task reads (Task.fields)}. Loss = sum
over tasks and subsets of each loss component times its task's weight (config.tasks.<task>.weight,
1 as in the original, MTP_SPEC §3.2). The key for stochastic depth, dropout and the R-CNN samplers
is folded from the step (and from the micro-batch index when accumulating). The step iterates over
`tasks` ({name: Task}, through their `TaskModel` face) and names none of them.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtp_jax.models.multitask import task_keys
from mtp_jax.models.slide import slide_logits
from mtp_jax.train.state import TrainState


def loss_normalizers(batch: dict, tasks: dict) -> dict:
  """{task: that task's whole-batch normalisers} (Task.normalizers), before micro-batching."""
  return {name: task.normalizers(batch["gt"]) for name, task in tasks.items()}


def compute_losses(model, batch: dict, tasks: dict, weights: dict, normalizers: dict, key,
                   micro_batches: int = 1) -> dict:
  """{'loss': weighted total, '<task>/<subset>/<component>': unweighted ...} (MTP_SPEC §3.2).

  A task without whole-batch normalisers (normalizers[task] == {}) has its losses divided by
  `micro_batches`, so that summing the micro-batches' losses averages them.
  """
  k_enc, k_tasks = task_keys(key, tuple(tasks))
  features = model.features(batch["image"], train=True, key=k_enc)
  losses, total = {}, 0.0
  for name, task in tasks.items():
    with jax.named_scope(name):   # names the compiled kernels (python -m mtp_jax.plan --top)
      parts = task.losses(model.heads[name], features, batch["gt"], train=True, key=k_tasks[name],
                          normalizers=normalizers[name])
    share = 1.0 if normalizers[name] else 1.0 / micro_batches
    for component, value in parts.items():
      value = value * share
      losses[f"{name}/{component}"] = value
      total = total + weights[name] * value
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


def accumulated_grads(micro_grads, state: TrainState, batch: dict, key, normalizers: dict, accum_steps: int,
                      batch_shards: int):
  """(summed gradients, summed losses, BatchNorm state after the last micro-batch) of
  `micro_grads(params, batch_stats, micro_batch, key, normalizers)` run over `accum_steps`
  micro-batches (`split_micro_batches`) one after another (lax.scan), micro-batch j with key
  fold_in(key, j)."""
  def body(carry, xs):
    grad_sum, loss_sum, batch_stats = carry
    micro, j = xs
    grads, losses, batch_stats = micro_grads(state.params, batch_stats, micro,
                                             jax.random.fold_in(key, j), normalizers)
    return (jax.tree.map(jnp.add, grad_sum, grads), jax.tree.map(jnp.add, loss_sum, losses),
            batch_stats), None
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  micros = split_micro_batches(batch, accum_steps, batch_shards)
  first = jax.tree.map(lambda x: x[0], micros)
  loss_shapes = jax.eval_shape(lambda: micro_grads(state.params, state.batch_stats, first, key,
                                                   normalizers)[1])
  loss_zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), loss_shapes)
  (grads, losses, batch_stats), _ = jax.lax.scan(
      body, (zeros, loss_zeros, state.batch_stats), (micros, jnp.arange(accum_steps)))
  return grads, losses, batch_stats


def optimizer_update(tx: optax.GradientTransformation, state: TrainState, grads, batch_stats, finite,
                     skip_nonfinite: bool):
  """(params, opt_state, batch_stats) after the update of `grads`; with skip_nonfinite, the old
  ones where `finite` (loss and gradient norm) is False."""
  def apply(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  if not skip_nonfinite:
    return (*apply(grads, state.opt_state, state.params), batch_stats)
  # A branch, not a select of the new and old state: the skipped update costs nothing and
  # the applied one is not followed by a pass over parameters and optimizer state.
  params, opt_state = jax.lax.cond(finite, apply, lambda g, o, p: (p, o),
                                   grads, state.opt_state, state.params)
  batch_stats = jax.tree.map(lambda a, b: jnp.where(finite, a, b), batch_stats, state.batch_stats)
  return params, opt_state, batch_stats


def make_train_step(graphdef, tx: optax.GradientTransformation, tasks: dict, base_key, *,
                    schedule=None, task_weights=None, accum_steps: int = 1, batch_shards: int = 1,
                    skip_nonfinite: bool = True):
  """Returns step(state, batch) -> (state, metrics); jit it with shardings and donation.

  accum_steps = k > 1 splits the batch into k micro-batches (`split_micro_batches`), runs them
  one after another (lax.scan) and applies the summed gradient once. Each loss is normalised by
  its whole batch's count, so without dropout and BatchNorm this is exactly one step on the whole
  batch. BatchNorm layers normalise each micro-batch by its own statistics and update their
  running statistics once per micro-batch, as accumulation does in every framework.
  skip_nonfinite: a step whose loss or gradient norm is not finite keeps the old parameters,
  optimizer and BatchNorm state, and counts itself in `state.nonfinite_steps`. Tasks that
  normalise inside their loss (the R-CNN heads' sample counts) normalise each micro-batch by its
  own counts; their accumulated losses are then averaged over the micro-batches.
  """
  weights = {name: 1.0 for name in tasks} | dict(task_weights or {})

  def micro_grads(params, batch_stats, batch, key, normalizers):
    def loss_fn(params, batch_stats):  # batch_stats as an argument: mutated inside this trace
      model = nnx.merge(graphdef, params, batch_stats, copy=True)
      losses = compute_losses(model, batch, tasks, weights, normalizers, key, accum_steps)
      return losses["loss"], (losses, nnx.state(model, nnx.BatchStat))
    (_, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
    return grads, losses, batch_stats

  def step(state: TrainState, batch: dict):
    key = jax.random.fold_in(base_key, state.step)
    normalizers = loss_normalizers(batch, tasks)
    if accum_steps == 1:
      grads, losses, batch_stats = micro_grads(state.params, state.batch_stats, batch, key, normalizers)
    else:
      grads, losses, batch_stats = accumulated_grads(micro_grads, state, batch, key, normalizers,
                                                     accum_steps, batch_shards)
    with jax.named_scope("optimizer"):
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(losses["loss"]) & jnp.isfinite(grad_norm)
      params, opt_state, batch_stats = optimizer_update(tx, state, grads, batch_stats, finite, skip_nonfinite)
    nonfinite = state.nonfinite_steps + (~finite).astype(jnp.int32)
    metrics = dict(losses, grad_norm=grad_norm, nonfinite_steps=nonfinite)
    if schedule is not None:  # the optimizer's count: skipped steps do not advance it
      metrics["learning_rate"] = schedule(state.step - state.nonfinite_steps)
    new_state = TrainState(step=state.step + 1, nonfinite_steps=nonfinite, params=params,
                           batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return step


def make_eval_step(graphdef, tasks: dict, slide=None, subsets=()):
  """Returns eval_step(params, batch_stats, batch) -> {task: (sums, per_image)} (Task.eval_outputs).

  batch: "image" (b*G, S, S, 3) interleaved, "gt": {subset: {field: (b, ...)}} with each task's
  evaluation fields and "is_real" (b,) (False for the padding images of a last batch).
  slide = (window, stride): mmseg's slide inference (mtp_jax/models/slide.py) over each image's
  true size (gt "image_hw"), for tasks with per-pixel outputs (Task.slides); subsets: the
  interleaved subsets in order.
  """
  if slide:
    flat = [n for n, t in tasks.items() if not t.slides]
    if flat:
      raise ValueError(f"tasks {flat} have no per-pixel outputs: slide inference does not apply")

  def eval_step(params, batch_stats, batch):
    model = nnx.merge(graphdef, params, batch_stats)
    if slide:
      window, stride = slide
      def predict(windows):
        features = model.features(windows, train=False)
        return {n: t.dense_logits(model.heads[n], features, (window, window)) for n, t in tasks.items()}
      hw = jnp.stack([batch["gt"][s]["image_hw"] for s in subsets], axis=1).reshape(-1, 2)
      logits = slide_logits(predict, batch["image"], hw, window, stride, tuple(subsets))
      return {n: t.eval_from_logits(logits[n], batch["gt"]) for n, t in tasks.items()}
    features = model.features(batch["image"], train=False)
    size = batch["image"].shape[-3:-1]   # (b*G, [T,] S, S, C)
    outputs = {}
    for name, task in tasks.items():
      with jax.named_scope(name):
        outputs[name] = task.eval_outputs(model.heads[name], features, batch["gt"], size)
    return outputs

  return eval_step
