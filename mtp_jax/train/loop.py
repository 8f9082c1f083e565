"""The training loop of every run, pretraining and finetuning, read top to bottom: setup, data,
state, restore, steps, checkpoints, report.

Every process runs this same function; the data each reads and the checkpoints they write
together are described in data_pipelines/records/ and mtp_jax/checkpoints/manager.py.
"""

import functools
import os
import signal
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from flax import nnx

from data_pipelines import sources
from data_pipelines.records import shards
from mtp_jax import experiment
from mtp_jax.checkpoints import sources as weight_sources
from mtp_jax.checkpoints.manager import Checkpointer, model_signature
from mtp_jax.errors import CheckpointError, Preempted
from mtp_jax.metrics import writers
from mtp_jax.parallel import distributed, sharding
from mtp_jax.train import report
from mtp_jax.train.optimizer import learning_rate_schedule, make_optimizer
from mtp_jax.train.prefetch import DevicePrefetch
from mtp_jax.train.state import create_state
from mtp_jax.train import batching
from mtp_jax.train.batching import check_batch_size, compile_everywhere, device_batch
from mtp_jax.train.evaluate import Evaluation, eval_scalars, summary_lines
from mtp_jax.train.step import make_train_step


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def merged_data_state(state: dict) -> dict:
  """Every process's reader streams (`state`: this process's `get_state()`) in one JSON state
  (saved once, read by all on restore)."""
  states = distributed.allgather_json(state)
  return {"num_streams": states[0]["num_streams"], "num_workers": states[0].get("num_workers", 0),
          "streams": {j: s for state in states for j, s in state["streams"].items()}}


# ----------------------------------------------------------------------------------------------
# The jitted pieces of one configuration
# ----------------------------------------------------------------------------------------------
class Trainer:
  """Model, optimizer, shardings and the jitted train step of `config` on `mesh`.

  init() -> a fresh TrainState created directly in its shards; step(state, batch) -> (state,
  metrics) with the state donated; batch = `device_batch(..., self.fields)`, split over the batch
  axes. tasks: {name: Task} (`experiment.tasks`).
  """

  def __init__(self, config, tasks: dict, mesh):
    self.config, self.mesh, self.tasks = config, mesh, tasks
    self.fields = batching.task_fields(tasks, train=True)
    model_fn = functools.partial(experiment.model, config, tasks)
    tx = make_optimizer(config)
    self._init_fn = functools.partial(create_state, model_fn, tx, config.seed)
    self.abstract_state = jax.eval_shape(self._init_fn)
    self.state_shardings = sharding.tree_shardings(self.abstract_state, mesh, config.sharding_rules)
    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
    step = make_train_step(
        self.graphdef, tx, tasks, jax.random.key(config.seed + 1),
        schedule=learning_rate_schedule(config),
        task_weights={t: config.tasks[t].weight for t in tasks},
        accum_steps=config.optimizer.grad_accum_steps, batch_shards=sharding.batch_divisor(mesh),
        skip_nonfinite=config.optimizer.skip_nonfinite)
    self.step = jax.jit(sharding.traced_in_mesh(step, mesh),
                        in_shardings=(self.state_shardings, sharding.batch_sharding(mesh)),
                        out_shardings=(self.state_shardings, None), donate_argnums=0)

  def init(self):
    return jax.jit(self._init_fn, out_shardings=self.state_shardings)()

  def abstract_sharded_state(self):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_shardings)


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------
def fresh_state(config, trainer: "Trainer"):
  """The TrainState a run without a checkpoint starts from: the trainer's initialisation, then
  `model.encoder_init` (encoder only) and `model.full_init` (encoder and the enabled tasks'
  heads, official full-model names) when they name checkpoints."""
  state = weight_sources.initialize(trainer.init(), config, tuple(trainer.tasks))
  if not (config.model.encoder_init or config.model.full_init) and not sources.source(config).pretraining:
    print("note: model.encoder_init is empty, so the encoder starts from random weights; set it "
          "to a pretraining workdir, an import_torch folder or a .pth to finetune", flush=True)
  return state


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
# What each logging interval reports
# ----------------------------------------------------------------------------------------------
class DataHealth:
  """This process's data health over a logging interval, per subset: the share of instances the
  data.max_instances cap dropped (datasets with instances, e.g. SAMRS) and the corrupt records
  the reader skipped so far."""

  def __init__(self, subsets: tuple, max_instances):
    self.max_instances = max_instances
    self.instances = {s: np.zeros(2, np.int64) for s in subsets}   # (before the cap, dropped by it)

  def add(self, raw: dict):
    """Counts the instances of one host batch {subset: {field: array}}."""
    for s in self.instances:
      if "num_instances" in raw[s]:   # datasets with instances (SAMRS): what the cap dropped
        counts = raw[s]["num_instances"].astype(np.int64)
        self.instances[s] += [counts.sum(), np.maximum(counts - self.max_instances[s], 0).sum()]

  def scalars(self, corrupt: dict) -> dict:
    """data/<subset>/dropped_by_cap and data/<subset>/corrupt_records (`corrupt`: {subset: records
    skipped so far}); the next interval counts from zero."""
    out = {}
    for s, (seen, dropped) in self.instances.items():
      if s in self.max_instances:
        out[f"data/{s}/dropped_by_cap"] = float(dropped / max(seen, 1))
      out[f"data/{s}/corrupt_records"] = float(corrupt[s])
      self.instances[s][:] = 0
    return out


class IntervalLog:
  """The scalars of each logging interval, written at its last step: the mean of its steps'
  metrics (nonfinite_steps and learning_rate: the last step's value), the share of wall time the
  loop waited for data, the data health and the steps per second. history: every interval's."""

  def __init__(self, config, writer, feed: DevicePrefetch, start: int):
    self.writer, self.feed = writer, feed
    self.health = DataHealth(tuple(config.data.subsets), config.data.max_instances)
    self.progress = writers.Progress(config.train.num_steps, start)
    self.pending, self.history = [], []
    self._interval_start = None

  def start_clock(self):
    """Called after the first step: the data-wait share counts from here (compilation is not a wait)."""
    self.feed.wait_seconds()
    self._interval_start = time.perf_counter()

  def write(self, step: int, corrupt: dict):
    pending, self.pending = self.pending, []
    scalars = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
    for k in ("nonfinite_steps", "learning_rate"):   # the value at this step, not a mean
      scalars[k] = float(jax.device_get(pending[-1][k]))
    now = time.perf_counter()   # the share of wall time the loop waited for the next batch
    scalars["data_wait_fraction"] = self.feed.wait_seconds() / max(now - self._interval_start, 1e-9)
    self._interval_start = now
    scalars.update(self.health.scalars(corrupt))   # data health, this process's share
    scalars["steps_per_sec"] = self.progress.update(step, {"loss": scalars["loss"],
                                                           "data wait": scalars["data_wait_fraction"]})
    self.writer.write_scalars(step, scalars)
    self.history.append({"step": step, **scalars})


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config.train.num_steps` steps (resuming from `workdir`), then writes the report.

  Raises Preempted after saving a checkpoint if SIGTERM arrives during training.
  """
  tasks = experiment.tasks(config)
  mesh = sharding.config_mesh(config.mesh)
  local_batch = check_training_data(config, mesh)

  trainer = Trainer(config, tasks, mesh)
  evaluation = Evaluation(config, trainer.graphdef, mesh, tasks)
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints,
                              keep_every=config.train.keep_every,
                              signature=model_signature(config, trainer.abstract_state.params),
                              config_json=config.to_json_best_effort())
  batches = sources.source(config).train_batches(config, tasks, local_batch)
  state, start = restore_or_start(config, trainer, checkpointer, batches)

  feed = DevicePrefetch(batches, functools.partial(device_batch, subsets=tuple(config.data.subsets), mesh=mesh,
                                                   fields=trainer.fields), config.data.prefetch)
  writer = writers.create_writer(workdir, resume_step=start)
  if start == 0:
    writer.write_hparams({k: v for k, v in config.items() if not hasattr(v, "items")})
  log = IntervalLog(config, writer, feed, start)
  state, stopped_at = train_steps(config, trainer, evaluation, state, start, feed, log, checkpointer)
  feed.close()
  if stopped_at is not None:   # the checkpoint of this step is saved: close everything and say so
    for closing in (writer, checkpointer, batches):
      closing.close()
    raise Preempted(stopped_at, checkpointer.directory)
  writer.flush()
  checkpointer.wait()

  total = config.train.num_steps
  results, rows, evaluators = evaluation.run(state, pictures=True)
  results["train"] = {"start_step": start, "end_step": total, "history": log.history}
  results = publish(workdir, writer, results, rows, evaluators, tasks, total, checkpointer.directory,
                    "train", config.eval.split)
  writer.close()
  checkpointer.close()
  batches.close()
  return results


def check_training_data(config, mesh) -> int:
  """This process's batch per subset, once data.batch_per_subset is known to split over `mesh`
  and the train and eval shards over the reader streams and the processes."""
  subsets = tuple(config.data.subsets)
  local_batch = check_batch_size("data.batch_per_subset", config.data.batch_per_subset, mesh,
                                 config.optimizer.grad_accum_steps)
  _, num_streams = sources.source(config).reader_streams(config)
  shards.check_shard_counts(config.data.dir, subsets, "train", num_streams)
  shards.check_shard_counts(config.data.dir, subsets, config.eval.split, jax.process_count())
  return local_batch


def restore_or_start(config, trainer: Trainer, checkpointer: Checkpointer, batches) -> tuple:
  """(state, step): the latest checkpoint's, with `batches` moved to where that run had read,
  or `fresh_state` at step 0 when there is none."""
  restored = checkpointer.restore(trainer.abstract_sharded_state())
  if restored is None:
    return fresh_state(config, trainer), 0
  state, data_state, start = restored
  batches.set_state(data_state)
  logging.info("resumed from %s at step %d", checkpointer.directory, start)
  print(f"resumed from {checkpointer.directory} at step {start}", flush=True)
  return state, start


def train_steps(config, trainer: Trainer, evaluation: Evaluation, state, start: int, feed: DevicePrefetch,
                log: IntervalLog, checkpointer: Checkpointer) -> tuple:
  """Steps start + 1 .. train.num_steps: log every train.log_every, evaluate every
  eval.every_steps, checkpoint every train.checkpoint_every and at the end. Returns (state, the
  step a SIGTERM stopped at, its checkpoint saved; None when all steps ran)."""
  total = config.train.num_steps
  preemption = PreemptionWatch()
  compile_start = time.perf_counter()
  for step in range(start + 1, total + 1):
    fed = next(feed)
    log.health.add(fed.raw)
    if step == start + 1:
      step_fn = compile_everywhere(trainer.step, "train step", state, fed.batch)
    state, metrics = step_fn(state, fed.batch)
    log.pending.append(metrics)
    if step == start + 1:
      jax.block_until_ready(metrics)
      print(f"first step (with compilation) took {time.perf_counter() - compile_start:.1f}s", flush=True)
      log.start_clock()
    stop = preemption.should_stop(step)
    if step % config.train.log_every == 0 or step == total or stop:
      log.write(step, fed.corrupt)
    if config.eval.every_steps and step % config.eval.every_steps == 0 and step < total and not stop:
      evaluated, _, _ = evaluation.run(state)
      log.writer.write_scalars(step, eval_scalars(evaluated, trainer.tasks))
      if jax.process_index() == 0:
        print("\n".join(summary_lines(evaluated, step, trainer.tasks)), flush=True)
    if step % config.train.checkpoint_every == 0 or step == total or stop:
      log.writer.flush()   # the metrics of every step up to a checkpoint are on disk before it is
      checkpointer.save(step, state, merged_data_state(fed.data_state), force=True)
    if stop:
      preemption.close()
      return state, step
  preemption.close()
  return state, None


# ----------------------------------------------------------------------------------------------
# Evaluation: --mode eval, and the published numbers of any evaluation
# ----------------------------------------------------------------------------------------------
def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict:
  """Evaluates the latest (or `step`'s) checkpoint in `workdir` on the valid splits and writes
  the report. Read-only on the checkpoints: it can run beside the training job of that workdir."""
  subsets = tuple(config.data.subsets)
  tasks = experiment.tasks(config)
  mesh = sharding.config_mesh(config.mesh)
  shards.check_shard_counts(config.data.dir, subsets, config.eval.split, jax.process_count())
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise CheckpointError(f"{os.path.abspath(workdir)} has no checkpoints/ folder: nothing to evaluate "
                          "(pass the --workdir of a training run)")
  trainer = Trainer(config, tasks, mesh)
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints,
                              signature=model_signature(config, trainer.abstract_state.params),
                              config_json=config.to_json_best_effort(), read_only=True)
  restored = checkpointer.restore(trainer.abstract_sharded_state(), step)
  if restored is None:
    raise CheckpointError(f"{checkpointer.directory} holds no readable checkpoint")
  state, _, step = restored
  evaluation = Evaluation(config, trainer.graphdef, mesh, tasks)
  results, rows, evaluators = evaluation.run(state, pictures=True)
  writer = writers.create_writer(workdir, resume_step=None)
  results = publish(workdir, writer, results, rows, evaluators, tasks, step, checkpointer.directory, "eval",
                    config.eval.split)
  writer.close()
  checkpointer.close()
  return results


def publish(workdir: str, writer, results: dict, rows: dict, evaluators: dict, tasks: dict, step: int,
            checkpoints: str, mode: str, split: str = "valid") -> dict:
  """Eval scalars to the writers, the summary to the console, the report and each task's result
  files (e.g. DOTA submissions) to the workdir (process 0). Returns `results` with step,
  checkpoint, mode, the evaluated split and the written task files added."""
  writer.write_scalars(step, eval_scalars(results, tasks))
  writer.flush()   # the report's curves read metrics.jsonl
  results = {"step": step, "checkpoint": os.path.join(checkpoints, str(step)), "mode": mode,
             "split": split, **results}
  if jax.process_index() == 0:
    print("\n".join(summary_lines(results, step, tasks)), flush=True)
    results["outputs"] = {n: tasks[n].write_outputs(workdir, e) for n, e in evaluators.items()}
    paths = report.write_report(workdir, results, tasks, rows)
    writer.write_images(step, {f"report/{n}": image[None] for n, image in paths["images"].items()})
    writer.flush()
    print(f"report: {paths['report']} (all numbers: {paths['metrics']})", flush=True)
  return results
