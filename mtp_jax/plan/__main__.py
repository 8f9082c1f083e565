"""Will it fit, and how fast can it run? Compile a config's training and evaluation steps for a
TPU slice, on any machine (no TPU needed), and read the compiler's figures.

    python -m mtp_jax.plan --config configs/pretrain/mtp_vit_b_rvsa.py:bf16 --topology v5p-8
    python -m mtp_jax.plan --config configs/finetune/dota_v1.py --topology v5e-8 --set data.batch_per_subset=16
    python -m mtp_jax.plan --config ... --topology v5p-64 --parts --top 10 --json plan.json
    python -m mtp_jax.plan --config ... --topology local --run 10     # on the TPU host itself

--topology is a Cloud TPU name (v4-8, v5e-16 or v5litepod-16, v5p-64, v6e-8; the number after
the dash counts TensorCores for v4 and v5p, chips for v5e and v6e) or a topology (v5p:2x4x4), or
`local` for this machine's own devices. The program is the training loop's own step (model,
optimizer, shardings, the config's mesh and global batch split over every chip of the slice,
several hosts compiled as the multi-process job runs) on abstract state and batches: nothing is
allocated and no data is read. It prints, per chip: HBM (arguments, temporaries, total) against
what the chip lets a program use; flops and bytes per step and their ratio; a roofline time
max(flops / peak, bytes / HBM bandwidth), with the compiler's own estimate beside it where it
gives a usable one; images per second and the flops utilisation at that time; the hours of the
config's whole schedule; the same for the evaluation step; the compile times. These are the
compiler's estimates, not measured speed: --run N on the TPU host times N real steps beside them.

Needs the TPU compiler for slices: `pip install -e '.[tpu]'` (libtpu; no TPU needed). Exits 0 if
every program fits, 1 if one does not (it says how much it needs), 2 on bad input, 3 if planning
itself failed (a compiler error: its traceback is printed).
"""

import json
import os
import sys
import traceback

from mtp_jax import cli

GIB = 2 ** 30


def _gib(value) -> str:
  return "?" if value is None else f"{value / GIB:.2f} GiB"


def _seconds(value: float) -> str:
  if value >= 1:
    return f"{value:.2f} s"
  return f"{value * 1e3:.2f} ms" if value >= 1e-3 else f"{value * 1e6:.1f} us"


def _hours(value: float) -> str:
  if value >= 0.1:
    return f"{value:.2f} h"
  return f"{value * 60:.1f} min" if value >= 1 / 60 else f"{value * 3600:.1f} s"


def program_lines(p: dict, train_steps: int | None = None) -> list[str]:
  """The printed lines of one program's figures (planner.program_figures)."""
  name = p["program"]
  lines = [f"{name}: {p['images']} images per run, {p['images_per_chip']:g} per chip; lowered in "
           f"{p['lower_s']:.1f} s, compiled in {p['compile_s']:.1f} s"]
  hbm = p.get("hbm", {})
  if p.get("fits") is False and "needed" in hbm:   # refused before or by the compiler
    lines.append(f"  DOES NOT FIT: needs {_gib(hbm['needed'])} per chip, the chip lets a program use "
                 f"{_gib(hbm.get('available'))} ({p.get('refusal', '')})")
    return lines
  verdict = {True: "fits", False: "DOES NOT FIT", None: "capacity unknown"}[p.get("fits")]
  lines.append(f"  HBM per chip   {_gib(hbm['total'])} of {_gib(hbm.get('available'))}: {verdict} "
               f"(arguments {_gib(hbm['argument'])}, outputs {_gib(hbm['output'])}, of which aliased "
               f"{_gib(hbm['alias'])}, temporaries {_gib(hbm['temp'])}, program {_gib(hbm['code'])})")
  cost = p["cost"]
  intensity = cost["flops"] / cost["bytes"] if cost["bytes"] else float("inf")
  lines.append(f"  per run, chip  {cost['flops'] / 1e9:,.1f} GFLOP, {cost['bytes'] / 1e9:,.2f} GB accessed "
               f"(about {cost['hbm_bytes'] / 1e9:,.2f} GB of it in HBM), {intensity:.1f} FLOP/byte")
  loops = cost["loops"]
  if loops["fixed"] or loops["run_time"]:
    lines.append(f"  loops          {loops['fixed']} of fixed length (their repeats add {loops['repeat_flops'] / 1e9:,.1f} "
                 f"GFLOP, {loops['repeat_bytes'] / 1e9:,.2f} GB to XLA's count), {loops['run_time']} whose length "
                 f"the compiler does not know (NMS), counted once")
  if "roofline" in p:
    r = p["roofline"]
    optimal = (f"; the compiler's own estimate {_seconds(cost['optimal_seconds'])}"
               if cost.get("optimal_seconds") else "")
    lines.append(f"  roofline       {_seconds(r['seconds'])}, {r['bound']}-bound (compute {_seconds(r['compute_seconds'])}, "
                 f"memory {_seconds(r['memory_seconds'])}; HBM traffic alone {_seconds(r['hbm_memory_seconds'])}){optimal}")
    lines.append(f"  estimated      {p['images_per_s_per_chip']:,.1f} images/s per chip, MFU {100 * p['mfu']:.1f} % "
                 f"(compiler flops: recomputation counts)")
    if "schedule_hours" in p and train_steps:
      lines.append(f"  schedule       {train_steps:,} steps: {_hours(p['schedule_hours'])} at the roofline")
  if "measured" in p:
    m = p["measured"]
    mfu = f", MFU {100 * m['mfu']:.1f} %" if "mfu" in m else ""
    lines.append(f"  measured       {_seconds(m['seconds_per_step'])} per step over {m['steps']} real steps, "
                 f"{m['images_per_s_per_chip']:,.1f} images/s per chip{mfu}")
  return lines


def top_lines(p: dict) -> list[str]:
  top = p.get("top")
  if not top:
    return []
  lines = [f"  kernels of the {p['program']}: {top['kernels']}, {top['kernel_bytes'] / 1e9:,.2f} GB at their "
           f"boundaries (XLA's total: {p['cost']['bytes'] / 1e9:,.2f} GB)",
           "  by scope (block and level numbers folded):",
           f"    {'GB':>9} {'in HBM':>9} {'GFLOP':>10} {'kernels':>8}  stage     scope"]
  for g in top["by_scope"]:
    lines.append(f"    {g['bytes'] / 1e9:9.3f} {g['hbm_bytes'] / 1e9:9.3f} {g['flops'] / 1e9:10.2f} {g['kernels']:8d}  "
                 f"{g['stage']:<9} {g['scope']}")
  lines.append("  by Python line:")
  lines.append(f"    {'GB':>9} {'in HBM':>9} {'GFLOP':>10} {'kernels':>8}  source")
  for g in top.get("by_source", []):
    lines.append(f"    {g['bytes'] / 1e9:9.3f} {g['hbm_bytes'] / 1e9:9.3f} {g['flops'] / 1e9:10.2f} {g['kernels']:8d}  "
                 f"{g['source']}")
  for key, title in (("by_bytes", "most bytes"), ("by_flops", "most matmul flops")):
    lines.append(f"  kernels with the {title}:")
    for k in top[key]:
      where = "/".join(filter(None, (k["scope"], k["primitive"]))) or "-"
      lines.append(f"    {k['bytes'] / 1e9:9.3f} GB {k['flops'] / 1e9:10.2f} GFLOP x{k['count']:<3} {k['opcode']:<14} "
                   f"{k['stage']:<8} {where}  [{k['source']}]")
  return lines


def part_lines(parts: list) -> list[str]:
  lines = ["parts (each compiled alone; 'adds' = a task's step beyond the encoder: its head, its loss and "
           "the optimizer update of all it trains):",
           f"  {'part':<34} {'GFLOP':>10} {'GB':>9} {'roofline':>10} {'HBM':>10} | {'adds GFLOP':>10} {'adds GB':>9}"]
  for r in parts:
    a = r["attributed"]
    fmt = lambda v, scale: "-" if v is None else f"{v / scale:,.1f}"
    lines.append(f"  {r['part']:<34} {fmt(r.get('flops'), 1e9):>10} {fmt(r.get('bytes'), 1e9):>9} "
                 f"{_seconds(r['roofline_s']) if 'roofline_s' in r else '-':>10} {_gib(r.get('hbm_total')):>10} | "
                 f"{fmt(a.get('flops'), 1e9):>10} {fmt(a.get('bytes'), 1e9):>9}")
  return lines


def report_lines(result: dict, config_name: str) -> list[str]:
  chip = result.get("chip")
  mesh = ", ".join(f"{k} {v}" for k, v in result["mesh"].items())
  lines = [f"{config_name} on {result['description']}",
           f"  mesh ({mesh}); {result['batch_per_subset']} images per subset x {len(result['subsets'])} "
           f"subset(s) per step; {result['image_size']} px; compute {result['compute_dtype']}; "
           f"remat {'on' if result['remat'] else 'off'}; tasks {', '.join(result['tasks'])}"]
  if chip:
    lines.append(f"  chip: {chip['peak_bf16_flops'] / 1e12:g} TFLOP/s bf16, {chip['hbm_bytes_per_s'] / 1e9:g} GB/s "
                 f"HBM ({chip['peak_bf16_flops'] / chip['hbm_bytes_per_s']:.0f} FLOP/byte to be compute-bound), "
                 f"{_gib(result['usable_hbm'])} of HBM usable by a program; source: {chip['source']}")
  for name, p in result["programs"].items():
    lines += program_lines(p, result["train_steps"] if name == "train step" else None)
    lines += top_lines(p)
  if result.get("parts"):
    lines += part_lines(result["parts"])
  unknown = any(p.get("fits") is None for p in result["programs"].values())
  verdict = ("DOES NOT FIT: see above" if not result["fits"] else
             "every program compiled (the devices' memory capacity is unknown)" if unknown else "every program fits")
  lines.append(verdict
               + f" (planned in {result['wall_s']:.0f} s; jax {result['jax']}"
               + (f", libtpu {result['libtpu']})" if result.get("libtpu") else ")"))
  return lines


def main(argv=None):
  parser = cli.parser(__file__, __doc__)
  parser.add_argument("--config", required=True, help="config file: path/to/config.py[:arg]")
  parser.add_argument("--topology", required=True,
                      help="TPU slice (v4-8, v5e-16, v5p-64, v6e-8, v5p:2x4x4) or 'local' (this machine)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, as main.py's (repeatable)")
  parser.add_argument("--json", default=None, metavar="OUT", help="also write every figure to this JSON file")
  parser.add_argument("--programs", nargs="+", default=["train", "eval"], metavar="P",
                      help="what to compile: train (the train step), eval (the evaluation step), encoder "
                           "(the encoder alone, forward and backward); default: train eval")
  parser.add_argument("--no-eval", action="store_true", help="the train step only (--programs train)")
  parser.add_argument("--parts", action="store_true",
                      help="also compile the encoder alone and each task's train step alone, and attribute "
                           "flops and bytes to each")
  parser.add_argument("--top", type=int, default=0, metavar="K",
                      help="list the K kernels of the compiled programs with the most bytes and the most "
                           "flops, and the bytes per model scope")
  parser.add_argument("--dump", default=None, metavar="DIR",
                      help="write each compiled program's optimised HLO text to DIR/<program>.hlo.txt")
  parser.add_argument("--run", type=int, default=0, metavar="N",
                      help="with --topology local: also time N real train steps on the config's data")
  args = parser.parse_args(argv)
  if args.run < 0 or args.top < 0:
    parser.error("--run and --top take a count of 0 or more")
  if args.topology != "local":
    from mtp_jax.plan.chips import tpu_environment   # imports no jax: before jax reads it
    tpu_environment()
  from mtp_jax.quiet_startup import quiet_startup
  quiet_startup()
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  try:
    with cli.reported():
      from mtp_jax.config import apply_overrides, load_config
      from mtp_jax.plan.planner import plan
      config = apply_overrides(load_config(args.config), args.set)
      programs = [p for p in args.programs if not (args.no_eval and p == "eval")]
      result = plan(config, args.topology, programs=tuple(programs), parts=args.parts, top_k=args.top,
                    run_steps=args.run, dump=args.dump, log=lambda line: print(line, flush=True))
  except Exception:  # noqa: BLE001 (a compiler error or a bug: the traceback is the report)
    traceback.print_exc()
    print("error: planning failed (the traceback above); this is not a verdict on memory", file=sys.stderr)
    sys.exit(3)
  result["config"], result["overrides"] = args.config, list(args.set)
  print("\n".join(report_lines(result, args.config)), flush=True)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"figures: {args.json}")
  sys.exit(0 if result["fits"] else 1)


if __name__ == "__main__":
  main()
