"""Seconds per checkpoint save of a fresh train state, with our state handler (one write per
array on a single host) and with Orbax's default (replica-parallel slices) (printed and written
to JSON; never a test).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/checkpoint_save.py \
        [--config configs/pretrain/quickstart.py] [--data data/samrs_tfrecords] [--saves 3] [--out benchmarks/results/checkpoint_save.json]

`--data`: a converted SAMRS folder (only its class lists are read). The state is the config's (data parallel: every array replicated over the local devices), saved
`--saves` times by each handler into a scratch folder, each save waited for (`wait_until_finished`);
the first save of each handler is reported apart (it traces and compiles its slicing).
"""

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from mtp_jax import experiment  # noqa: E402
from mtp_jax.checkpoints.manager import state_handler  # noqa: E402
from mtp_jax.config import apply_overrides, load_config  # noqa: E402
from mtp_jax.parallel import sharding  # noqa: E402
from mtp_jax.train import loop  # noqa: E402
from _report import write_result  # noqa: E402


def time_saves(handler, state, saves: int) -> list[float]:
  folder = tempfile.mkdtemp(prefix="ckpt_bench_")
  try:
    manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(max_to_keep=1),
                                    item_handlers={"state": handler})
    times = []
    for step in range(saves):
      start = time.perf_counter()
      manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)), force=True)
      manager.wait_until_finished()
      times.append(time.perf_counter() - start)
    manager.close()
    return times
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/pretrain/quickstart.py")
  p.add_argument("--data", default="data/samrs_tfrecords")
  p.add_argument("--saves", type=int, default=3)
  p.add_argument("--out", default="benchmarks/results/checkpoint_save.json")
  args = p.parse_args()
  config = apply_overrides(load_config(args.config), [f"data.dir={args.data!r}"])
  tasks = experiment.tasks(config)
  trainer = loop.Trainer(config, tasks, sharding.config_mesh(config.mesh))
  state = trainer.init()
  leaves = jax.tree.leaves(state)
  rows = {}
  for name, handler in (("ours", state_handler()), ("orbax_default", ocp.PyTreeCheckpointHandler())):
    times = time_saves(handler, state, args.saves)
    rows[name] = {"first_save_s": round(times[0], 3), "later_save_s": round(float(np.mean(times[1:] or times)), 3)}
  write_result({"config": args.config, "devices": jax.device_count(), "backend": jax.default_backend(),
                "arrays": len(leaves), "megabytes": round(sum(x.nbytes for x in leaves) / 2**20, 1),
                **rows}, args.out)


if __name__ == "__main__":
  main()
