"""Every paper recipe planned on the TPU compiler: does it fit, HBM, flops, bytes and roofline time
per step, images/s per chip and the schedule's hours, on v5e-8, v5p-8 and v6e-8, in bfloat16 and
float32 (printed as a markdown table and written to JSON; compiler estimates, not run times).

    python benchmarks/plan_recipes.py [--recipes vit_b vit_l internimage dota_v1 dior_r dior xview loveda levir_cd eurosat]
        [--topologies v5p-8 v5e-8 v6e-8] [--dtypes bfloat16 float32] [--out benchmarks/results/plan_recipes.json]

Each row is `python -m mtp_jax.plan --config <recipe> --topology <slice> --no-eval` in a fresh
process (one at a time: a paper-scale compile takes 5-20 minutes and up to ~17 GB of host memory
on a 2-core machine), its JSON kept in the output. A rerun skips the rows the output already
holds, so an interrupted run resumes. Batches: pretraining at MTP's global batch (32 images per
subset, 96 per step); finetuning at the config's global batch where it splits over the chips,
and detection at MTP's 2 images per device (2 per chip). Parallelism: the recipes' own (ViT-B
data parallel, ViT-L and InternImage-XL FSDP; remat where the config sets it). The schedule's
hours are for the recipe's own number of images (train.num_steps x its own batch) at the planned
batch's roofline time.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# name: (config, --set values, how many images per chip the batch is: None = the config's)
RECIPES = {
    "vit_b": ("configs/pretrain/mtp_vit_b_rvsa.py", [], None),
    "vit_l": ("configs/pretrain/mtp_vit_l_rvsa.py:fsdp", [], None),
    "internimage": ("configs/pretrain/mtp_internimage_xl.py:fsdp", [], None),
    "dota_v1": ("configs/finetune/dota_v1.py", [], 2),
    "dior_r": ("configs/finetune/dior_r.py", [], 2),
    "dior": ("configs/finetune/dior.py", [], 2),
    "xview": ("configs/finetune/xview.py", [], 2),
    "loveda": ("configs/finetune/loveda.py", [], None),
    "levir_cd": ("configs/finetune/levir_cd.py", [], None),
    "eurosat": ("configs/finetune/eurosat.py", [], None),
}
CHIPS = {"v5p-8": 4, "v5e-8": 8, "v6e-8": 8, "v4-8": 4}


def row_key(recipe: str, topology: str, dtype: str) -> str:
  return f"{recipe} {topology} {dtype}"


def git_commit() -> str:
  """The checkout's commit, with "+" when its tracked files differ from it."""
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
  dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
  return head + ("+" if dirty else "") if head else "unknown"


def plan_row(recipe: str, topology: str, dtype: str) -> dict:
  config, sets, per_chip = RECIPES[recipe]
  sets = [*sets, f"model.compute_dtype={dtype!r}"]
  if per_chip:
    sets.append(f"data.batch_per_subset={per_chip * CHIPS[topology]}")
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "plan.json")
    command = [sys.executable, "-m", "mtp_jax.plan", "--config", config, "--topology", topology, "--no-eval",
               "--json", out, *[a for s in sets for a in ("--set", s)]]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1) or not os.path.exists(out):
      return {"recipe": recipe, "topology": topology, "dtype": dtype, "error": (proc.stdout + proc.stderr)[-2000:],
              "command": " ".join(command[1:])}
    with open(out) as f:
      result = json.load(f)
  return {"recipe": recipe, "topology": topology, "dtype": dtype, "config": config, "sets": sets,
          "commit": git_commit(), "command": "python " + " ".join(command[1:]).replace(f" --json {out}", ""),
          "wall_s": round(wall, 1),
          "plan": result}


def summary(row: dict) -> dict:
  """The table's figures of one row."""
  if "error" in row:
    return {"fits": "error"}
  plan = row["plan"]
  train = plan["programs"]["train step"]
  out = {"chips": plan["chips"], "batch": plan["batch_per_subset"] * len(plan["subsets"]),
         "per_chip": train["images_per_chip"], "fits": train["fits"], "compile_s": train["compile_s"]}
  hbm = train["hbm"]
  out["hbm_gib"] = (hbm.get("total") or hbm.get("needed") or 0) / 2 ** 30
  if "cost" in train:
    out.update(tflop=train["cost"]["flops"] / 1e12, gb=train["cost"]["bytes"] / 1e9,
               roofline_ms=train["roofline"]["seconds"] * 1e3, bound=train["roofline"]["bound"],
               images_per_s=train["images_per_s_per_chip"], mfu=train["mfu"])
    # The schedule's images at the recipe's own batch, at this batch's roofline time per image.
    schedule_images = plan["train_steps"] * recipe_batch(row["recipe"])
    out["steps"] = schedule_images / out["batch"]
    out["hours"] = out["steps"] * train["roofline"]["seconds"] / 3600
  return out


@functools.cache
def recipe_batch(recipe: str) -> int:
  """The recipe config's own global batch (the batch its train.num_steps is set for)."""
  from mtp_jax.config import load_config  # noqa: PLC0415
  c = load_config(RECIPES[recipe][0])
  return c.data.batch_per_subset * len(c.data.subsets)


def table(rows: list) -> str:
  head = ("| recipe | slice | dtype | batch (per chip) | fits | HBM GiB/chip | TFLOP/step/chip | GB/step/chip "
          "| roofline ms | bound | img/s/chip | MFU | schedule h | compile s | commit |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for row in rows:
    s = summary(row)
    if s["fits"] == "error":
      lines.append(f"| {row['recipe']} | {row['topology']} | {row['dtype']} | - | error | | | | | | | | | | |")
      continue
    if "tflop" not in s:
      lines.append(f"| {row['recipe']} | {row['topology']} | {row['dtype']} | {s['batch']} ({s['per_chip']:g}) | "
                   f"**no** | needs {s['hbm_gib']:.1f} | | | | | | | | {s['compile_s']:.0f} | {row.get('commit', '')} |")
      continue
    fits = "yes" if s["fits"] else "**no**"
    lines.append(f"| {row['recipe']} | {row['topology']} | {row['dtype']} | {s['batch']} ({s['per_chip']:g}) | {fits} | "
                 f"{s['hbm_gib']:.2f} | {s['tflop']:.2f} | {s['gb']:.0f} | {s['roofline_ms']:.1f} | {s['bound']} | "
                 f"{s['images_per_s']:.1f} | {100 * s['mfu']:.1f} % | {s['hours']:.1f} | {s['compile_s']:.0f} | "
                 f"{row.get('commit', '')} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
  p.add_argument("--topologies", nargs="+", default=["v5p-8", "v5e-8", "v6e-8"], choices=list(CHIPS))
  p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
  p.add_argument("--out", default="benchmarks/results/plan_recipes.json")
  args = p.parse_args()
  done = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      done = {row_key(r["recipe"], r["topology"], r["dtype"]): r for r in json.load(f)["rows"]}
  rows = dict(done)
  for dtype in args.dtypes:
    for recipe in args.recipes:
      for topology in args.topologies:
        key = row_key(recipe, topology, dtype)
        if key in done and "error" not in done[key]:
          continue
        print(f"planning {key} ...", flush=True)
        rows[key] = plan_row(recipe, topology, dtype)
        print(f"  {summary(rows[key])}", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:   # after every row: a rerun resumes from here
          json.dump({"rows": list(rows.values())}, f, indent=1)
  ordered = sorted(rows.values(), key=lambda r: (list(RECIPES).index(r["recipe"]), r["dtype"], r["topology"]))
  with open(args.out, "w") as f:
    json.dump({"date": time.strftime("%Y-%m-%d"), "rows": ordered}, f, indent=1)
  print(table(ordered), flush=True)
  print(f"figures: {args.out}")


if __name__ == "__main__":
  main()
