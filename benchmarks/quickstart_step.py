"""Figures for the quickstart step and input pipeline (printed and written to JSON; never a test).

    python benchmarks/quickstart_step.py [--data data/samrs_tfrecords] [--steps 20] [--set KEY=VALUE ...] [--out benchmarks/results/quickstart_step.json]

Measures, with the quickstart config on the default devices: compile time of the train step,
mean step time over `--steps` steps on one fixed batch (compute only), and the input pipeline's
batches/s and images/s on its own (1 process, 0 workers).
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


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data", default="data/samrs_tfrecords")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--out", default="benchmarks/results/quickstart_step.json")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, as main.py's --set (e.g. tasks.is.enabled=False)")
  args = p.parse_args()
  config = apply_overrides(load_config("configs/pretrain/quickstart.py"),
                           [f"data.dir={args.data!r}", *args.set])
  subsets = tuple(config.data.subsets)
  mesh = sharding.make_mesh(config.mesh.shape)
  tasks = experiment.tasks(config)
  trainer = loop.Trainer(config, tasks, mesh)
  state, step = trainer.init(), trainer.step

  batches = samrs_examples.train_batches(config.data.dir, subsets, image_size=config.data.image_size,
                                         max_instances=dict(config.data.max_instances),
                                         batch_size=config.data.batch_per_subset, seed=0,
                                         with_masks=tasks_lib.needs_masks(tasks))
  t = time.perf_counter()
  n_data = 30
  for _ in range(n_data):
    raw = next(batches)
  data_s = (time.perf_counter() - t) / n_data
  batch = batching.device_batch(raw, subsets, mesh, trainer.fields)

  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(args.steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t) / args.steps
  images = config.data.batch_per_subset * len(subsets)
  result = {
      "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
      "image_size": config.data.image_size, "images_per_step": images,
      "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
      "train_images_per_s": round(images / step_s, 1),
      "input_pipeline_batch_s": round(data_s, 4),
      "input_pipeline_images_per_s": round(images / data_s, 1),
  }
  batches.close()
  write_result(result, args.out)


if __name__ == "__main__":
  main()
