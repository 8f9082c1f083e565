"""Step and compile time of encoder + UperNet + Oriented R-CNN, and the detection head's share
(printed and written to JSON; never a test).

    python benchmarks/detection_step.py [--data data/samrs_tfrecords] [--steps 10]
        [--set tasks.rd.train_proposals=500 ...] [--out benchmarks/results/detection_step.json]

With the quickstart config (its toy encoder, 128 px, 4 images per subset, tasks ss + rd with the
quickstart's rd sizes) on the default devices, it compiles and times the real train step
(`loop.Trainer`) twice on one fixed batch: tasks ss alone, then ss + rd. The head's share of the
step is (t(ss + rd) - t(ss)) / t(ss + rd): the time that the rotated-detection head (FPN, RPN,
proposals, assignment and sampling, rotated RoIAlign, Shared2FC, both losses, and their
backward) adds to the step. --set overrides apply to both runs.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

from data_pipelines.samrs import reader  # noqa: E402
from mtp_jax.config import apply_overrides, load_config  # noqa: E402
from mtp_jax.parallel import sharding  # noqa: E402
from mtp_jax.train import batching, loop  # noqa: E402
from _report import write_result  # noqa: E402


def time_step(config, raw, steps: int) -> dict:
  """Compile time and mean step time (compute only) of config's train step on one batch."""
  mesh = sharding.make_mesh(config.mesh.shape)
  trainer = loop.Trainer(config, loop.build_tasks(config), mesh)
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
  p.add_argument("--out", default="benchmarks/results/detection_step.json")
  args = p.parse_args()
  base = [f"data.dir={args.data!r}", *args.set]
  ss_rd = apply_overrides(load_config("configs/pretrain/quickstart.py"), base + ["tasks.rd.enabled=True"])
  ss = apply_overrides(load_config("configs/pretrain/quickstart.py"), base + ["tasks.rd.enabled=False"])
  subsets = tuple(ss_rd.data.subsets)
  batches = reader.PretrainBatches(ss_rd.data.dir, subsets, image_size=ss_rd.data.image_size,
                                   max_instances=dict(ss_rd.data.max_instances),
                                   batch_size=ss_rd.data.batch_per_subset, seed=0)
  raw = next(batches)
  batches.close()
  only_ss = time_step(ss, raw, args.steps)
  both = time_step(ss_rd, raw, args.steps)
  rd = ss_rd.tasks.rd
  result = {
      "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
      "image_size": ss_rd.data.image_size, "images_per_step": ss_rd.data.batch_per_subset * len(subsets),
      "encoder": ss_rd.model.encoder, "encoder_overrides": dict(ss_rd.model.encoder_overrides),
      "rd": {k: rd[k] for k in rd if k not in ("enabled", "weight")},
      "ss": only_ss, "ss_rd": both,
      "rd_share_of_step": round((both["step_s"] - only_ss["step_s"]) / both["step_s"], 3),
      "rd_share_of_compile": round((both["compile_s"] - only_ss["compile_s"]) / both["compile_s"], 3),
  }
  write_result(result, args.out)


if __name__ == "__main__":
  main()
