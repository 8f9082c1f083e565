"""Step and compile time of the full three-task pretraining step and each head's share (printed
and written to JSON; never a test).

    python benchmarks/pretrain_step.py [--data data/samrs_tfrecords] [--steps 10]
        [--set tasks.rd.train_proposals=500 ...] [--out benchmarks/results/pretrain_step.json]

With the quickstart config (its toy encoder and image size, its batch, tasks ss + is + rd with
the quickstart's head sizes) on the default devices, it compiles and times the real train step
(`loop.Trainer`) on one fixed batch, first with all three tasks, then once with each task left
out. A head's share of the step is (t(all) - t(all but that task)) / t(all): the time its head
(forward, targets, losses and backward) adds; the encoder's share is what remains. The same for
compile time. --set overrides apply to every run.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

from data_pipelines.samrs import examples as samrs_examples  # noqa: E402
from mtp_jax import experiment, tasks as tasks_lib  # noqa: E402
from mtp_jax.config import apply_overrides, load_config  # noqa: E402
from mtp_jax.parallel import sharding  # noqa: E402
from mtp_jax.train import batching, loop  # noqa: E402
from _report import write_result  # noqa: E402

QUICKSTART = "configs/pretrain/quickstart.py"
TASKS = ("ss", "is", "rd")


def time_step(config, raw, steps: int) -> dict:
  """Compile time and mean step time (compute only) of config's train step on one batch."""
  mesh = sharding.make_mesh(config.mesh.shape)
  trainer = loop.Trainer(config, experiment.tasks(config), mesh)
  state = trainer.init()
  batch = batching.device_batch(raw, tuple(config.data.subsets), mesh, trainer.fields)
  t = time.perf_counter()
  compiled = trainer.step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  return {"compile_s": round(compile_s, 2), "step_s": round((time.perf_counter() - t) / steps, 4)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data", default="data/samrs_tfrecords")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--set", action="append", default=[], help="config overrides, key=value")
  p.add_argument("--out", default="benchmarks/results/pretrain_step.json")
  args = p.parse_args()
  base = [f"data.dir={args.data!r}", *args.set]
  config = lambda *extra: apply_overrides(load_config(QUICKSTART), base + list(extra))
  everything = config(*[f"tasks.{t}.enabled=True" for t in TASKS])
  subsets = tuple(everything.data.subsets)
  batches = samrs_examples.train_batches(everything.data.dir, subsets, image_size=everything.data.image_size,
                                         max_instances=dict(everything.data.max_instances),
                                         batch_size=everything.data.batch_per_subset, seed=0,
                                         with_masks=tasks_lib.needs_masks(experiment.tasks(everything)))
  raw = next(batches)
  batches.close()
  runs = {"ss+is+rd": time_step(everything, raw, args.steps)}
  for left_out in TASKS:
    kept = [t for t in TASKS if t != left_out]
    runs["+".join(kept)] = time_step(config(*[f"tasks.{t}.enabled={t != left_out}" for t in TASKS]),
                                     raw, args.steps)
  full = runs["ss+is+rd"]
  shares = {}
  for left_out in TASKS:
    without = runs["+".join(t for t in TASKS if t != left_out)]
    shares[left_out] = {k: round((full[k] - without[k]) / full[k], 3) for k in ("step_s", "compile_s")}
  shares["encoder+rest"] = {k: round(1 - sum(s[k] for s in shares.values()), 3) for k in ("step_s", "compile_s")}
  result = {
      "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
      "image_size": everything.data.image_size,
      "images_per_step": everything.data.batch_per_subset * len(subsets),
      "encoder": everything.model.encoder, "encoder_overrides": dict(everything.model.encoder_overrides),
      "heads": {t: {k: everything.tasks[t][k] for k in everything.tasks[t] if k not in ("enabled", "weight")}
                for t in TASKS},
      "runs": runs, "share": shares,
  }
  write_result(result, args.out)


if __name__ == "__main__":
  main()
