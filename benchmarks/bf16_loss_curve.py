"""The quickstart's training loss in bfloat16 against float32, beside float32's own seed-to-seed
spread (figures, not a test).

    python benchmarks/bf16_loss_curve.py [--steps 170] [--out benchmarks/results/bf16_loss_curve.json]

Runs `main.py --config configs/pretrain/quickstart.py` three times on the sample data (after
`make data`): float32 with the config's seed, float32 with the next seed, and bfloat16 with the
config's seed (parameters, losses and optimizer state stay float32). Each run logs the loss every
10 steps. The figure of merit: the mean absolute gap between the bfloat16 and float32 curves of
the total loss with the same seed, against the gap between the two float32 seeds (run-to-run
noise). bfloat16 "matches within noise" when its gap is no
larger. Evaluation is cut to one batch per subset (only the training curve is compared).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from _report import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "pretrain", "quickstart.py")


def run(workdir: str, dtype: str, seed: int, steps: int) -> tuple[dict, float]:
  """{step: metrics row} of one quickstart run, and its wall seconds."""
  args = [sys.executable, os.path.join(ROOT, "main.py"), "--config", CONFIG, "--workdir", workdir,
          "--set", f"model.compute_dtype='{dtype}'", "--set", f"seed={seed}",
          "--set", f"train.num_steps={steps}", "--set", "train.log_every=10",
          "--set", "eval.max_batches=1"]
  start = time.perf_counter()
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r for r in rows if "loss" in r}, time.perf_counter() - start


def gap(a: dict, b: dict, key: str) -> float:
  steps = sorted(set(a) & set(b))
  return float(np.mean([abs(a[s][key] - b[s][key]) for s in steps]))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=170)
  p.add_argument("--seed", type=int, default=2023)
  p.add_argument("--out", default="benchmarks/results/bf16_loss_curve.json")
  args = p.parse_args()
  runs = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, dtype, seed in (("float32", "float32", args.seed), ("float32_next_seed", "float32", args.seed + 1),
                              ("bfloat16", "bfloat16", args.seed)):
      runs[name] = run(os.path.join(tmp, name), dtype, seed, args.steps)
      print(f"{name}: {runs[name][1]:.0f} s", flush=True)
  curves = {name: rows for name, (rows, _) in runs.items()}
  dtype_gap = gap(curves["bfloat16"], curves["float32"], "loss")
  seed_gap = gap(curves["float32_next_seed"], curves["float32"], "loss")
  rows = [{"quantity": "loss", "bf16_vs_f32": round(dtype_gap, 4), "f32_seed_vs_seed": round(seed_gap, 4),
           "within_noise": dtype_gap <= seed_gap}]
  print(rows[0], flush=True)
  last = max(curves["float32"])
  write_result({"steps": args.steps, "seed": args.seed, "rows": rows,
                "seconds": {name: round(s, 1) for name, (_, s) in runs.items()},
                "final_loss": {name: curves[name][last]["loss"] for name in curves},
                "curves": {name: {str(s): r["loss"] for s, r in sorted(c.items())} for name, c in curves.items()}},
               args.out)


if __name__ == "__main__":
  main()
