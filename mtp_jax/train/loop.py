"""The training loop of every run, pretraining and finetuning, read top to bottom: setup, data,
state, restore, steps, checkpoints, report.

Every process runs this same function; the data each reads and the checkpoints they write
together are described in data_pipelines/samrs/reader.py and mtp_jax/checkpoints/manager.py.
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
from data_pipelines.samrs import reader
from mtp_jax import experiment
from mtp_jax.checkpoints import full_model
from mtp_jax.checkpoints.encoder_init import initialize_encoder
from mtp_jax.checkpoints.manager import Checkpointer, model_signature
from mtp_jax.errors import CheckpointError, Preempted
from mtp_jax.metrics import report, writers
from mtp_jax.parallel import distributed, sharding
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
    self.mesh, self.tasks = mesh, tasks
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
  state = trainer.init()
  patch_size = config.model.encoder_overrides.get("patch_size", 16)
  if config.model.encoder_init:
    params, _ = initialize_encoder(state.params, config.model.encoder_init, config.data.image_size,
                                   patch_size, tuple(config.model.rgb_bands))
    state = state.replace(params=params)
  if not (config.model.encoder_init or config.model.full_init) and not sources.source(config).pretraining:
    print("note: model.encoder_init is empty, so the encoder starts from random weights; set it "
          "to a pretraining workdir, an import_torch folder or a .pth to finetune", flush=True)
  if config.model.full_init:
    params, stats, _ = full_model.initialize_model(
        state.params, state.batch_stats, config.model.full_init, tuple(config.data.subsets),
        tasks=tuple(trainer.tasks), image_size=config.data.image_size, patch_size=patch_size,
        trust_pickle=config.model.full_init_trust_pickle)
    state = state.replace(params=params, batch_stats=stats)
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
# Training
# ----------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config.train.num_steps` steps (resuming from `workdir`), then writes the report.

  Raises Preempted after saving a checkpoint if SIGTERM arrives during training.
  """
  subsets = tuple(config.data.subsets)
  tasks = experiment.tasks(config)
  mesh = sharding.config_mesh(config.mesh)
  local_batch = check_batch_size("data.batch_per_subset", config.data.batch_per_subset, mesh,
                                 config.optimizer.grad_accum_steps)
  _, num_streams = sources.source(config).reader_streams(config)
  reader.check_shard_counts(config.data.dir, subsets, "train", num_streams)
  reader.check_shard_counts(config.data.dir, subsets, config.eval.split, jax.process_count())

  trainer = Trainer(config, tasks, mesh)
  evaluation = Evaluation(config, trainer.graphdef, mesh, tasks)
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints,
                              keep_every=config.train.keep_every,
                              signature=model_signature(config, trainer.abstract_state.params),
                              config_json=config.to_json_best_effort())
  batches = sources.source(config).train_batches(config, tasks, local_batch)

  restored = checkpointer.restore(trainer.abstract_sharded_state())
  if restored is None:
    state = fresh_state(config, trainer)
    start = 0
  else:
    state, data_state, start = restored
    batches.set_state(data_state)
    logging.info("resumed from %s at step %d", checkpointer.directory, start)
    print(f"resumed from {checkpointer.directory} at step {start}", flush=True)

  data_state = batches.get_state()   # of the last batch consumed; saved with each checkpoint
  feed = DevicePrefetch(batches, functools.partial(device_batch, subsets=subsets, mesh=mesh,
                                                   fields=trainer.fields), config.data.prefetch)
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
    fed = next(feed)
    raw, batch, data_state = fed.raw, fed.batch, fed.data_state
    for s in subsets:
      if "num_instances" in raw[s]:   # datasets with instances (SAMRS): what the cap dropped
        counts = raw[s]["num_instances"].astype(np.int64)
        instances[s] += [counts.sum(), np.maximum(counts - config.data.max_instances[s], 0).sum()]
    if step == start + 1:
      step_fn = compile_everywhere(trainer.step, "train step", state, batch)
    state, metrics = step_fn(state, batch)
    pending.append(metrics)
    if step == start + 1:
      jax.block_until_ready(metrics)
      print(f"first step (with compilation) took {time.perf_counter() - compile_start:.1f}s", flush=True)
      feed.wait_seconds()   # the data-wait share counts from here: compilation is not a wait
      interval_start = time.perf_counter()
    stop = preemption.should_stop(step)
    if step % config.train.log_every == 0 or step == total or stop:
      scalars = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
      for k in ("nonfinite_steps", "learning_rate"):   # the value at this step, not a mean
        scalars[k] = float(jax.device_get(pending[-1][k]))
      corrupt = fed.corrupt
      now = time.perf_counter()   # the share of wall time the loop waited for the next batch
      scalars["data_wait_fraction"] = feed.wait_seconds() / max(now - interval_start, 1e-9)
      interval_start = now
      for s, (seen, dropped) in instances.items():   # data health, this process's share
        if s in config.data.max_instances:
          scalars[f"data/{s}/dropped_by_cap"] = float(dropped / max(seen, 1))
        scalars[f"data/{s}/corrupt_records"] = float(corrupt[s])
        instances[s][:] = 0
      scalars["steps_per_sec"] = progress.update(step, {"loss": scalars["loss"],
                                                        "data wait": scalars["data_wait_fraction"]})
      writer.write_scalars(step, scalars)
      history.append({"step": step, **scalars})
      pending = []
    if config.eval.every_steps and step % config.eval.every_steps == 0 and step < total and not stop:
      evaluated, _, _ = evaluation.run(state)
      writer.write_scalars(step, eval_scalars(evaluated, tasks))
      if jax.process_index() == 0:
        print("\n".join(summary_lines(evaluated, step, tasks)), flush=True)
    if step % config.train.checkpoint_every == 0 or step == total or stop:
      writer.flush()   # the metrics of every step up to a checkpoint are on disk before it is
      checkpointer.save(step, state, merged_data_state(data_state), force=True)
    if stop:
      break
  preemption.close()
  feed.close()
  if stop:   # the checkpoint of this step is saved: close everything and say so
    for closing in (writer, checkpointer, batches):
      closing.close()
    raise Preempted(step, checkpointer.directory)
  writer.flush()
  checkpointer.wait()

  results, rows, evaluators = evaluation.run(state, pictures=True)
  results["train"] = {"start_step": start, "end_step": total, "history": history}
  results = publish(workdir, writer, results, rows, evaluators, tasks, total, checkpointer.directory,
                    "train", config.eval.split)
  writer.close()
  checkpointer.close()
  batches.close()
  return results


# ----------------------------------------------------------------------------------------------
# Evaluation: --mode eval, and the published numbers of any evaluation
# ----------------------------------------------------------------------------------------------
def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict:
  """Evaluates the latest (or `step`'s) checkpoint in `workdir` on the valid splits and writes
  the report. Read-only on the checkpoints: it can run beside the training job of that workdir."""
  subsets = tuple(config.data.subsets)
  tasks = experiment.tasks(config)
  mesh = sharding.config_mesh(config.mesh)
  reader.check_shard_counts(config.data.dir, subsets, config.eval.split, jax.process_count())
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
