"""Pretraining loop, read top to bottom: setup, data, state, restore, steps, checkpoints, report.

Every process runs this same function; the data each reads and the checkpoints they write
together are described in data_pipelines/samrs/reader.py and mtp_jax/checkpoints/manager.py.
"""

import functools
import signal
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from flax import nnx

from data_pipelines.samrs import augment, reader
from data_pipelines.samrs.classes import subset as subset_layout
from mtp_jax import models
from mtp_jax.config import enabled_tasks
from mtp_jax.checkpoints.encoder_init import initialize_encoder
from mtp_jax.checkpoints.manager import Checkpointer, model_signature
from mtp_jax.errors import ConfigError, DataError, Preempted
from mtp_jax.metrics import report, segmentation, writers
from mtp_jax.models.multitask import MultiTaskModel
from mtp_jax.parallel import distributed, sharding
from mtp_jax.train.optimizer import learning_rate_schedule, make_optimizer
from mtp_jax.train.state import create_state
from mtp_jax.train.step import make_predict, make_train_step

DTYPES = {"float32": None, "bfloat16": jax.numpy.bfloat16, "float16": jax.numpy.float16}


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def build_model(config, num_classes: dict, rngs: nnx.Rngs) -> MultiTaskModel:
  dtype = DTYPES[config.model.compute_dtype]
  encoder = models.build_encoder(
      config.model.encoder, config.data.image_size, rngs=rngs, dtype=dtype,
      drop_path_rate=config.model.drop_path_rate, remat=config.model.remat,
      **dict(config.model.encoder_overrides))
  return MultiTaskModel(encoder, num_classes, tasks=enabled_tasks(config),
                        seg_channels=config.model.seg_channels, seg_dropout=config.model.seg_dropout,
                        seg_norm=config.model.seg_norm,
                        dtype=dtype, rngs=rngs)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def subset_classes(config) -> dict:
  """{subset: class count}, checking that the converted data carries the expected class lists."""
  out = {}
  for s in config.data.subsets:
    info = reader.load_info(config.data.dir, s, "train")
    expected = list(subset_layout(s).classes)
    if info.get("class_names") != expected:
      raise DataError(f"{config.data.dir}/{s}/train holds classes {info.get('class_names')}, "
                      f"not the {len(expected)} {s} classes")
    out[s] = len(expected)
  return out


def interleave(per_subset: dict, subsets, key: str) -> np.ndarray:
  """{subset: (b, ...)} -> (b*G, ...) with image i of subset g at row i*G + g."""
  stacked = np.stack([per_subset[s][key] for s in subsets], axis=1)
  return stacked.reshape(-1, *stacked.shape[2:])


def device_batch(raw: dict, subsets, mesh, keys=("image", "semantic")):
  return sharding.global_batch({k: interleave(raw, subsets, k) for k in keys}, mesh)


def check_batch_size(name: str, per_subset: int, mesh, accum_steps: int = 1):
  """Per-process images per subset; the global count must split over the batch shards, the
  processes and the micro-batches."""
  div = sharding.batch_divisor(mesh)
  if per_subset % (div * accum_steps) or per_subset % jax.process_count():
    micro = f" times the {accum_steps} micro-batches" if accum_steps > 1 else ""
    raise ConfigError(f"{name} = {per_subset} must be a multiple of the {div} batch shards{micro} "
                      f"and of the {jax.process_count()} processes")
  return per_subset // jax.process_count()


def reader_streams(config) -> tuple[tuple[int, ...], int]:
  """(this process's stream indices, total streams): data.num_streams, or one per process."""
  n, p = config.data.num_streams or jax.process_count(), jax.process_count()
  if n % p:
    raise ConfigError(f"data.num_streams = {n} must be a multiple of the {p} processes")
  per = n // p
  return tuple(range(jax.process_index() * per, (jax.process_index() + 1) * per)), n


def merged_data_state(batches) -> dict:
  """Every process's reader streams in one JSON state (saved once, read by all on restore)."""
  states = distributed.allgather_json(batches.get_state())
  return {"num_streams": states[0]["num_streams"],
          "streams": {j: s for state in states for j, s in state["streams"].items()}}


# ----------------------------------------------------------------------------------------------
# The jitted pieces of one configuration
# ----------------------------------------------------------------------------------------------
class Trainer:
  """Model, optimizer, shardings and the jitted train step of `config` on `mesh`.

  init() -> a fresh TrainState created directly in its shards; step(state, batch) -> (state,
  metrics) with the state donated; batch = `device_batch(...)` rows, split over the batch axes.
  """

  def __init__(self, config, num_classes: dict, mesh):
    self.mesh = mesh
    model_fn = functools.partial(build_model, config, num_classes)
    tx = make_optimizer(config)
    self._init_fn = functools.partial(create_state, model_fn, tx, config.seed)
    self.abstract_state = jax.eval_shape(self._init_fn)
    self.state_shardings = sharding.tree_shardings(self.abstract_state, mesh, config.sharding_rules)
    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
    step = make_train_step(
        self.graphdef, tx, tuple(config.data.subsets), jax.random.key(config.seed + 1),
        schedule=learning_rate_schedule(config),
        task_weights={t: config.tasks[t].weight for t in enabled_tasks(config)},
        accum_steps=config.optimizer.grad_accum_steps, batch_shards=sharding.batch_divisor(mesh),
        skip_nonfinite=config.optimizer.skip_nonfinite)
    self.step = jax.jit(step, in_shardings=(self.state_shardings, sharding.batch_sharding(mesh)),
                        out_shardings=(self.state_shardings, None), donate_argnums=0)

  def init(self):
    return jax.jit(self._init_fn, out_shardings=self.state_shardings)()

  def abstract_sharded_state(self):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_shardings)


def compile_everywhere(jitted, name: str, *args):
  """`jitted` compiled for `args`, once every process has compiled it (distributed.barrier)."""
  compiled = jitted.lower(*args).compile()
  distributed.barrier(f"compiled {name}")
  return compiled


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------
class PreemptionWatch:
  """Did a SIGTERM arrive? One process: a signal handler sets a flag. Several: JAX's preemption
  sync point (the distributed runtime catches SIGTERM), so every process stops at the same step."""

  def __init__(self):
    self.received = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.received = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config.train.num_steps` steps (resuming from `workdir`), then writes the report.

  Raises Preempted after saving a checkpoint if SIGTERM arrives during training.
  """
  subsets = tuple(config.data.subsets)
  num_classes = subset_classes(config)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  local_batch = check_batch_size("data.batch_per_subset", config.data.batch_per_subset, mesh,
                                 config.optimizer.grad_accum_steps)
  streams, num_streams = reader_streams(config)
  reader.check_shard_counts(config.data.dir, subsets, "train", num_streams)
  reader.check_shard_counts(config.data.dir, subsets, "valid", jax.process_count())

  trainer = Trainer(config, num_classes, mesh)
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints,
                              keep_every=config.train.keep_every,
                              signature=model_signature(config, trainer.abstract_state.params),
                              config_json=config.to_json_best_effort())
  batches = reader.PretrainBatches(
      config.data.dir, subsets, image_size=config.data.image_size,
      max_instances=dict(config.data.max_instances), batch_size=local_batch, seed=config.seed,
      streams=streams, num_streams=num_streams, shuffle_window=config.data.shuffle_window,
      augment_config=augment.AugmentConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                              for k, v in config.data.augment.items()}),
      max_corrupt_fraction=config.data.max_corrupt_fraction)

  restored = checkpointer.restore(trainer.abstract_sharded_state())
  if restored is None:
    state = trainer.init()
    if config.model.encoder_init:
      params, _ = initialize_encoder(state.params, config.model.encoder_init, config.data.image_size,
                                     config.model.encoder_overrides.get("patch_size", 16))
      state = state.replace(params=params)
    start = 0
  else:
    state, data_state, start = restored
    batches.set_state(data_state)
    logging.info("resumed from %s at step %d", checkpointer.directory, start)
    print(f"resumed from {checkpointer.directory} at step {start}", flush=True)

  writer = writers.create_writer(workdir, resume_step=start)
  if start == 0:
    writer.write_hparams({k: v for k, v in config.items() if not hasattr(v, "items")})

  total = config.train.num_steps
  progress = writers.Progress(total, start)
  preemption, stop = PreemptionWatch(), False
  history, pending = [], []
  instances = {s: np.zeros(2, np.int64) for s in subsets}   # (before the cap, dropped by it)
  compile_start = time.perf_counter()
  for step in range(start + 1, total + 1):
    raw = next(batches)
    for s in subsets:
      counts = raw[s]["num_instances"].astype(np.int64)
      instances[s] += [counts.sum(), np.maximum(counts - config.data.max_instances[s], 0).sum()]
    batch = device_batch(raw, subsets, mesh)
    if step == start + 1:
      step_fn = compile_everywhere(trainer.step, "train step", state, batch)
    state, metrics = step_fn(state, batch)
    pending.append(metrics)
    if step == start + 1:
      jax.block_until_ready(metrics)
      print(f"first step (with compilation) took {time.perf_counter() - compile_start:.1f}s", flush=True)
    stop = preemption.should_stop(step)
    if step % config.train.log_every == 0 or step == total or stop:
      scalars = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
      for k in ("nonfinite_steps", "learning_rate"):   # the value at this step, not a mean
        scalars[k] = float(jax.device_get(pending[-1][k]))
      corrupt = batches.corrupt_records()
      for s, (seen, dropped) in instances.items():   # data health, this process's share
        scalars[f"data/{s}/dropped_by_cap"] = float(dropped / max(seen, 1))
        scalars[f"data/{s}/corrupt_records"] = float(corrupt[s])
        instances[s][:] = 0
      scalars["steps_per_sec"] = progress.update(step, {"loss": scalars["loss"]})
      writer.write_scalars(step, scalars)
      history.append({"step": step, **scalars})
      pending = []
    if step % config.train.checkpoint_every == 0 or step == total or stop:
      writer.flush()   # the metrics of every step up to a checkpoint are on disk before it is
      checkpointer.save(step, state, merged_data_state(batches), force=True)
    if stop:
      break
  preemption.close()
  if stop:   # the checkpoint of this step is saved: close everything and say so
    for closing in (writer, checkpointer, batches):
      closing.close()
    raise Preempted(step, checkpointer.directory)
  writer.flush()
  checkpointer.wait()

  results = evaluate(config, trainer.graphdef, state, mesh, num_classes)
  results["train"] = {"start_step": start, "end_step": total, "history": history}
  if jax.process_index() == 0:
    rows = results.pop("_rows")
    paths = report.write_report(workdir, results, rows)
    print(f"report: {paths['metrics']} and {paths['predictions']}", flush=True)
  else:
    results.pop("_rows")
  writer.write_scalars(total, {f"eval/{s}/miou": r["miou"] for s, r in results["eval"].items()})
  writer.close()
  checkpointer.close()
  batches.close()
  return results


# ----------------------------------------------------------------------------------------------
# Evaluation (valid split, semantic segmentation mIoU per subset)
# ----------------------------------------------------------------------------------------------
def evaluate(config, graphdef, state, mesh, num_classes: dict) -> dict:
  subsets = tuple(config.data.subsets)
  local_batch = check_batch_size("eval.batch_per_subset", config.eval.batch_per_subset, mesh)
  predict = jax.jit(make_predict(graphdef))
  iters = {s: iter(reader.make_dataset(
      config.data.dir, s, "valid", image_size=config.data.image_size,
      max_instances=config.data.max_instances[s], batch_size=local_batch, train=False,
      process_index=jax.process_index(), process_count=jax.process_count())) for s in subsets}
  conf = {s: np.zeros((num_classes[s] + 1,) * 2, np.int64) for s in subsets}
  rows, batches_done = [], 0
  while True:
    raw = {s: next(it, None) for s, it in iters.items()}
    if all(b is None for b in raw.values()):
      break
    template = next(b for b in raw.values() if b is not None)
    raw = {s: b if b is not None else {k: np.zeros_like(v) for k, v in template.items()}
           for s, b in raw.items()}
    batch = device_batch(raw, subsets, mesh)
    if batches_done == 0:
      predict = compile_everywhere(predict, "predict", state.params, state.batch_stats, batch["image"])
    preds = predict(state.params, state.batch_stats, batch["image"])
    for s in subsets:
      pred = np.asarray(multihost_utils.process_allgather(preds[s], tiled=True))
      labels, real = raw[s]["semantic"], raw[s]["is_real"]
      if jax.process_count() > 1:  # every process scores the whole batch
        labels = np.asarray(multihost_utils.process_allgather(labels, tiled=True))
        real = np.asarray(multihost_utils.process_allgather(real, tiled=True))
      conf[s] += segmentation.confusion_matrix(labels[real], pred[real], num_classes[s] + 1)
      for i in np.flatnonzero(raw[s]["is_real"]):
        if sum(r[0].startswith(s) for r in rows) < config.eval.report_images:
          rows.append((f"{s} valid", raw[s]["image"][i], raw[s]["semantic"][i], pred[i]))
    batches_done += 1
    if config.eval.max_batches and batches_done >= config.eval.max_batches:
      break
  for it in iters.values():
    it.close()
  results = {"eval": {}}
  for s in subsets:
    r = segmentation.iou_from_confusion(conf[s])
    names = ["background"] + list(subset_layout(s).classes)
    results["eval"][s] = {
        "miou": r["miou"], "pixel_accuracy": r["accuracy"], "pixels": int(conf[s].sum()),
        "iou_per_class": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, r["iou"])}}
    if jax.process_index() == 0:
      print(f"eval {s}: mIoU {r['miou']:.4f}, pixel accuracy {r['accuracy']:.4f}", flush=True)
  results["_rows"] = rows
  return results
