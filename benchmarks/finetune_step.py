"""Finetune train-step time per task family on this machine (printed and written to JSON; never a
test).

    python benchmarks/finetune_step.py [--encoder vit_s_rvsa] [--steps 5] [--batch 8]
        [--set KEY=VALUE ...] [--out benchmarks/results/finetune_step.json]

For each family it builds the real finetune config (configs/finetune/eurosat.py,
spacenet1.py, levir_cd.py, dota_v1.py: the paper's input size 224 / 384 / 256 / 1024, MTP's heads:
linear, UperNet 512, UNet 512-64, Oriented R-CNN with 1000 objects per image of which 100 are
real, random rotated boxes of 10-80 px), swaps in the given encoder (the small model by default: ViT-S+RVSA,
12 blocks of width 384), builds the Trainer on all devices and times its compiled step on one
synthetic batch of `--batch` images (random pixels and labels; data loading excluded; `--steps 0`
compiles only). Figures:
compile time, seconds per step, images per second, the compiled step's memory from XLA's memory
analysis (argument, output, alias and temporary bytes, in GiB) and the process's peak resident
set so far (GiB, `getrusage` max RSS: compiling and running all families before it included),
XLA's FLOP count of the step (cost analysis) and the FLOP rate. With classification among the
families, each family's step time over the classification step's time scaled by their FLOPs
(`vs_classification_flop_rate`: 1 runs at classification's FLOP rate; a cliff shows as >> 1).
"""

import argparse
import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mtp_jax import experiment  # noqa: E402
from mtp_jax.config import apply_overrides, load_config  # noqa: E402
from mtp_jax.parallel import sharding  # noqa: E402
from mtp_jax.train import batching, loop  # noqa: E402
from _report import write_result  # noqa: E402

FAMILIES = {"classification": ("configs/finetune/eurosat.py", 10),
            "segmentation": ("configs/finetune/spacenet1.py", 1),
            "change_detection": ("configs/finetune/levir_cd.py", 1),
            "rotated_detection": ("configs/finetune/dota_v1.py", 15)}
OBJECTS = 100   # real objects per image of the rotated-detection batch


def synthetic_batch(config, classes: int, batch: int, rng) -> dict:
  s = config.data.image_size
  dataset = config.data.dataset
  if config.tasks.rd.enabled:
    m = config.data.max_instances[dataset]
    rboxes = np.zeros((batch, m, 5), np.float32)
    rboxes[:, :OBJECTS] = np.concatenate(
        [rng.uniform(40, s - 40, (batch, OBJECTS, 2)), rng.uniform(10, 80, (batch, OBJECTS, 2)),
         rng.uniform(-np.pi / 2, np.pi / 2, (batch, OBJECTS, 1))], -1)
    rboxes[..., 2:4] = np.sort(rboxes[..., 2:4], -1)[..., ::-1]   # le90: w >= h
    example = {"image": rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8), "rboxes": rboxes,
               "labels": rng.integers(0, classes, (batch, m), dtype=np.int32),
               "rbox_valid": np.arange(m)[None].repeat(batch, 0) < OBJECTS}
  elif config.tasks.cls.enabled:
    example = {"image": rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8),
               "label": rng.integers(0, classes, (batch,), dtype=np.int32)}
  else:
    dates = (2,) if config.tasks.cd.enabled else ()
    example = {"image": rng.integers(0, 256, (batch, *dates, s, s, 3), dtype=np.uint8),
               "semantic": rng.integers(0, classes + 1, (batch, s, s), dtype=np.uint8)}
  return {dataset: example}


def time_family(path: str, classes: int, encoder: str, batch: int, steps: int, sets=()) -> dict:
  config = apply_overrides(load_config(path), [f"model.encoder={encoder!r}",
                                               f"data.batch_per_subset={batch}", *sets])
  dataset = config.data.dataset
  tasks = experiment.tasks(config, {dataset: [f"class{i}" for i in range(classes)]})
  mesh = sharding.config_mesh(config.mesh)
  trainer = loop.Trainer(config, tasks, mesh)
  state = trainer.init()
  raw = synthetic_batch(config, classes, batch, np.random.default_rng(0))
  device = batching.device_batch(raw, (dataset,), mesh, trainer.fields)
  t = time.perf_counter()
  compiled = batching.compile_everywhere(trainer.step, "train step", state, device)   # as main.py
  compile_s = time.perf_counter() - t
  memory = compiled_memory_gib(compiled)
  gflop = compiled_gflop(compiled)
  if steps == 0:   # compile only: XLA's memory analysis and FLOPs, no step run
    return {"config": path, "image_size": config.data.image_size, "batch": batch,
            "compile_s": round(compile_s, 2), "gflop": gflop, **memory}
  state, m = compiled(state, device)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, device)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t) / steps
  return {"config": path, "image_size": config.data.image_size, "batch": batch,
          "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
          "images_per_s": round(batch / step_s, 2), "gflop": gflop,
          "gflop_per_s": round(gflop / step_s, 2) if gflop else None, **memory,
          "peak_rss_gib": round(peak_rss_gib(), 2)}


def compiled_memory_gib(compiled) -> dict:
  """XLA's memory analysis of a compiled step: argument, output, alias and temp sizes in GiB."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  names = ("argument", "output", "alias", "temp")
  return {f"{n}_gib": round(getattr(analysis, f"{n}_size_in_bytes") / 2**30, 3) for n in names}


def compiled_gflop(compiled):
  """XLA's cost analysis of a compiled step: its floating-point operations in GFLOP (None if the
  backend gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get("flops")
  return round(flops / 1e9, 1) if flops else None


def flops_share_ratio(runs: dict) -> dict:
  """{family: its step time / the classification step's time scaled by their FLOPs}: 1 is the
  classification step's FLOP rate, 3 a step three times slower than its FLOPs predict."""
  base = runs.get("classification")
  if not base or not base.get("gflop") or "step_s" not in base:
    return {}
  return {f: round(r["step_s"] / (base["step_s"] * r["gflop"] / base["gflop"]), 2)
          for f, r in runs.items() if r.get("gflop") and "step_s" in r}


def peak_rss_gib() -> float:
  """The process's peak resident set size so far in GiB (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--encoder", default="vit_s_rvsa")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--families", default=",".join(FAMILIES))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every family, as main.py's --set (e.g. model.remat=True)")
  p.add_argument("--out", default="benchmarks/results/finetune_step.json")
  args = p.parse_args()
  runs = {}
  for f in args.families.split(","):
    runs[f] = time_family(*FAMILIES[f], args.encoder, args.batch, args.steps, args.set)
    print(f"{f}: {runs[f]}", flush=True)
  ratios = flops_share_ratio(runs)
  if ratios:
    print("step time / FLOPs-proportional share of the classification step:", ratios)
  write_result({"backend": jax.default_backend(), "devices": jax.device_count(),
                "device_kind": jax.devices()[0].device_kind, "encoder": args.encoder,
                "overrides": args.set, "runs": runs,
                "vs_classification_flop_rate": ratios},
               args.out)


if __name__ == "__main__":
  main()
