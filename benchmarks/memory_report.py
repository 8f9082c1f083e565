"""Compiled per-device memory of the real pretraining train step (printed and written to JSON).

    python benchmarks/memory_report.py [--config configs/pretrain/mtp_vit_b_rvsa.py ...]
        [--encoders vit_b_rvsa vit_l_rvsa] [--modes dp fsdp] [--remat off on] [--batches 1 2]
        [--verify] [--resume PATH] [--out benchmarks/results/memory_report.json]

Builds the step with the training loop's own `loop.Trainer` (model, optimizer, shardings, jitted
step with donated state) on abstract inputs (jax.eval_shape: no parameter is allocated), lowers and compiles it for 8 devices, and
reads XLA's memory analysis: argument, output, alias and temp bytes per device, and
total = argument + output - alias + temp (GiB). Modes: 'dp' mesh (8, 1, 1), 'fsdp' (1, 8, 1)
on ('data', 'fsdp', 'tensor'). b = images per subset per device (3*b images per device; global
data.batch_per_subset = 8*b). Measured at each --batches value, then fitted linearly,
total(b) = fixed + b * per_b (from the smallest and largest b measured), to give the largest b
whose predicted total fits 16 and 80 GiB per device (0 if b = 1 does not). The fit is an
extrapolation; --verify compiles once more at each predicted b beyond those measured to check it.
--resume PATH reuses the groups (and checks) already in PATH, e.g. the `_partial.json` an
interrupted run leaves, or a finished report to add --verify to.

Without 8 accelerators the 8 devices are simulated CPU devices: the figures are then XLA:CPU
buffer assignment, and GPU/TPU fusion, layouts and rematerialisation differ. Rerun this same
command on the accelerator host for its figures; it uses the real devices when 8 exist (else the
simulated CPU ones; JAX_PLATFORMS=cpu forces them) and says in `devices` which it used.
On XLA:CPU, remat did not lower temp memory (November 2026) although it cuts the encoder's saved
residuals about 6x in the jaxpr: judge remat on the accelerator. Compiling one variant takes
1.5-4 minutes on a 2-core CPU.
"""

import argparse
import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

from data_pipelines import sources  # noqa: E402
from data_pipelines.samrs.classes import subset as subset_layout  # noqa: E402
from mtp_jax import experiment  # noqa: E402
from mtp_jax.config import load_config, pretrain_defaults, validate  # noqa: E402
from mtp_jax.tasks import enabled as enabled_tasks  # noqa: E402
from mtp_jax.parallel import sharding  # noqa: E402
from mtp_jax.train import batching, loop  # noqa: E402
from _report import write_result  # noqa: E402

GIB = 2 ** 30
NUM_DEVICES = 8
MESHES = {"dp": (NUM_DEVICES, 1, 1), "fsdp": (1, NUM_DEVICES, 1)}
CAPS_GIB = (16, 80)
DEFAULT_CONFIGS = ("configs/pretrain/mtp_vit_b_rvsa.py", "configs/pretrain/mtp_vit_l_rvsa.py")


def load_or_fallback(path: str):
  """The config at `path`; if the file is missing, the defaults with the encoder its name gives
  (mtp_vit_l_rvsa.py -> vit_l_rvsa), 448 px, drop path 0.1. Returns (config, note or None)."""
  file = path.partition(":")[0]   # load_config takes 'file.py:arg'
  if os.path.isfile(file):
    return load_config(path), None
  encoder = os.path.basename(file).removesuffix(".py").removeprefix("mtp_")
  c = pretrain_defaults()
  c.model.encoder = encoder
  c.data.image_size = 448
  c.model.drop_path_rate = 0.1
  return validate(c), f"{path} missing: pretrain_defaults() with encoder {encoder}, 448 px, drop path 0.1"


def pick_devices():
  """8 devices: the default backend's if it has 8, else 8 simulated CPU devices."""
  if jax.default_backend() != "cpu" and jax.device_count() >= NUM_DEVICES:
    devs = jax.devices()[:NUM_DEVICES]
    return devs, f"{NUM_DEVICES} x {devs[0].device_kind} ({jax.default_backend()})"
  devs = jax.devices("cpu")[:NUM_DEVICES]
  if len(devs) < NUM_DEVICES:
    raise SystemExit(f"need {NUM_DEVICES} CPU devices, found {len(devs)}: XLA_FLAGS was set too late")
  note = f"{NUM_DEVICES} simulated CPU devices (XLA:CPU buffer assignment)"
  if jax.default_backend() != "cpu":
    note += f"; the {jax.device_count()} {jax.default_backend()} device(s) here are fewer than {NUM_DEVICES}"
  return devs, note


def sharded_bytes(abstract_tree, shardings) -> int:
  """Bytes per device of `abstract_tree` laid out by `shardings` (the largest shard)."""
  leaves = jax.tree.leaves(abstract_tree)
  shards = jax.tree.leaves(shardings)
  return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, shards))


def compile_step(config, devices, mode: str, remat: bool, b: int) -> dict:
  """Lowers and compiles the train step for one variant; returns its memory figures (GiB)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mesh.shape = MESHES[mode]
    config.model.remat = remat
    config.data.batch_per_subset = NUM_DEVICES * b
  subsets = tuple(config.data.subsets)
  class_names = {s: list(subset_layout(s).classes) for s in subsets}
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  trainer = loop.Trainer(config, experiment.tasks(config, class_names), mesh)   # the loop's own step
  step, abstract_state, state_shardings = trainer.step, trainer.abstract_state, trainer.state_shardings
  batch = batching.abstract_batch(sources.source(config).device_shapes(config, train=True),
                                  config.data.batch_per_subset, trainer.fields)
  t = time.perf_counter()
  lowered = step.lower(abstract_state, batch)
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  mem = lowered.compile().memory_analysis()
  compile_s = time.perf_counter() - t
  figures = {k: getattr(mem, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp")}
  figures["total"] = figures["argument"] + figures["output"] - figures["alias"] + figures["temp"]
  figures["peak"] = getattr(mem, "peak_memory_in_bytes", None)
  params = abstract_state.params
  return {
      "encoder": config.model.encoder, "mode": mode, "mesh": list(config.mesh.shape),
      "remat": remat, "b": b, "images_per_device": b * len(subsets),
      "global_batch_per_subset": config.data.batch_per_subset,
      "param_count": sum(math.prod(a.shape) for a in jax.tree.leaves(params)),
      "params_gib": sharded_bytes(params, state_shardings.params) / GIB,
      "opt_state_gib": sharded_bytes(abstract_state.opt_state, state_shardings.opt_state) / GIB,
      **{f"{k}_gib": (v / GIB if v is not None else None) for k, v in figures.items()},
      "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1)}


def largest_batch(fixed: float, per_b: float, b1_total: float, cap: float) -> int:
  """Largest b with fixed + b * per_b <= cap (0 if b = 1 does not fit)."""
  if b1_total > cap:
    return 0
  return int((cap - fixed) // per_b) if per_b > 0 else -1   # -1: does not grow with b


def fit(rows: list) -> dict:
  """Linear fit of total(b) over the measured b (first and last), and the caps it gives."""
  rows = sorted(rows, key=lambda r: r["b"])
  lo, hi = rows[0], rows[-1]
  out = {"measured_b": [r["b"] for r in rows]}
  if hi["b"] == lo["b"]:
    return out
  per_b = (hi["total_gib"] - lo["total_gib"]) / (hi["b"] - lo["b"])
  fixed = lo["total_gib"] - lo["b"] * per_b
  b1 = fixed + per_b
  out.update(fixed_gib=round(fixed, 3), per_b_gib=round(per_b, 3))
  for cap in CAPS_GIB:
    out[f"max_b_{cap}gib"] = largest_batch(fixed, per_b, b1, cap)
  return out


def rounded(row: dict) -> dict:
  return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}


def table(rows: list, fits: dict) -> str:
  head = ("encoder     mode remat b | args   out    alias  temp   total | params+opt | "
          "fixed per_b b@16 b@80 | compile s")
  lines = [head, "-" * len(head)]
  for r in rows:
    f = fits.get((r["config"], r["mode"], r["remat"]), {})
    lines.append(
        f"{r['encoder']:<11} {r['mode']:<4} {'on ' if r['remat'] else 'off'}   {r['b']} | "
        f"{r['argument_gib']:6.2f} {r['output_gib']:6.2f} {r['alias_gib']:6.2f} "
        f"{r['temp_gib']:6.2f} {r['total_gib']:6.2f} | {r['params_gib'] + r['opt_state_gib']:10.3f} | "
        f"{f.get('fixed_gib', float('nan')):5.2f} {f.get('per_b_gib', float('nan')):5.2f} "
        f"{f.get('max_b_16gib', '-'):>4} {f.get('max_b_80gib', '-'):>4} | {r['compile_s']:.0f}")
  return "\n".join(lines)


def report(device_note, notes, rows, fits, verified, wall_s) -> dict:
  return {
      "devices": device_note, "jax": jax.__version__, "notes": notes,
      "figures": "GiB per device from compiled.memory_analysis(); total = argument + output - alias "
                 "+ temp; peak is XLA's peak_memory_in_bytes as reported (on CPU it tracks the "
                 "arguments, not the live-range peak)",
      "batch": "b = images per subset per device; 3*b images per device; global batch_per_subset = 8*b",
      "fit": "linear in b from the smallest and largest b measured; the max_b_* values are "
             "extrapolated" + (", checked in 'verified'" if verified else " and not verified"),
      "wall_s": round(wall_s, 1),
      "compile_s_sum": round(sum(r["lower_s"] + r["compile_s"] for r in rows)
                             + sum(v["lower_s"] + v["compile_s"] for v in verified), 1),
      "rows": [rounded(r) for r in rows],
      "fits": [{"config": c, "mode": m, "remat": r, **f} for (c, m, r), f in fits.items()],
      "verified": verified,
  }


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", nargs="+", default=list(DEFAULT_CONFIGS), help="file.py[:arg] ...")
  p.add_argument("--encoders", nargs="+", default=None, help="only these of the configs' encoders")
  p.add_argument("--modes", nargs="+", default=["dp", "fsdp"], choices=sorted(MESHES))
  p.add_argument("--remat", nargs="+", default=["off", "on"], choices=["off", "on"])
  p.add_argument("--batches", nargs="+", type=int, default=[1, 2], help="b: images per subset per device")
  p.add_argument("--verify", action="store_true", help="compile at each predicted b beyond --batches")
  p.add_argument("--resume", default=None, help="JSON of an earlier run: reuse its groups and checks")
  p.add_argument("--out", default="benchmarks/results/memory_report.json")
  args = p.parse_args()
  devices, device_note = pick_devices()
  print(f"devices: {device_note}", flush=True)

  configs, notes = [], []
  for path in args.config:
    config, note = load_or_fallback(path)
    if note:
      print(f"note: {note}", flush=True)
      notes.append(note)
    if args.encoders is None or config.model.encoder in args.encoders:
      configs.append((path, config))

  start = time.perf_counter()
  rows, fits, verified = [], {}, []
  done, checked = {}, set()
  if args.resume:
    with open(args.resume) as fh:
      prev = json.load(fh)
    for r in prev["rows"]:
      done.setdefault((r["config"], r["mode"], r["remat"]), []).append(r)
    verified = prev["verified"]
    checked = {(v["config"], v["mode"], v["remat"], v["b"]) for v in verified}
  partial = args.out.removesuffix(".json") + "_partial.json"
  for path, config in configs:
    print(f"{config.model.encoder} ({path}): tasks {enabled_tasks(config)}, "
          f"{config.data.image_size} px, subsets {tuple(config.data.subsets)}, "
          f"compute {config.model.compute_dtype}", flush=True)
    for mode in args.modes:
      for remat in (r == "on" for r in args.remat):
        key = (path, mode, remat)
        group = sorted(done.get(key, []), key=lambda r: r["b"])
        if [r["b"] for r in group] == sorted(args.batches):
          print(f"  {mode} remat {remat}: b={[r['b'] for r in group]} from {args.resume}", flush=True)
        else:
          group = []
          for b in sorted(args.batches):
            row = {"config": path, "tasks": list(enabled_tasks(config)),
                   **compile_step(config, devices, mode, remat, b)}
            group.append(row)
            print(f"  {mode} remat {remat} b={b}: total {row['total_gib']:.2f} GiB (temp "
                  f"{row['temp_gib']:.2f}), lower {row['lower_s']} s, compile {row['compile_s']} s",
                  flush=True)
        rows.extend(group)
        f = fits[key] = fit(group)
        for cap in CAPS_GIB:
          b = f.get(f"max_b_{cap}gib", 0)
          if not args.verify or b <= max(args.batches) or (*key, b) in checked:
            continue
          row = compile_step(config, devices, mode, remat, b)
          predicted = f["fixed_gib"] + b * f["per_b_gib"]
          checked.add((*key, b))
          verified.append({"config": path, "encoder": row["encoder"], "mode": mode, "remat": remat,
                           "b": b, "cap_gib": cap, "predicted_total_gib": round(predicted, 3),
                           "measured_total_gib": round(row["total_gib"], 3),
                           "lower_s": row["lower_s"], "compile_s": row["compile_s"]})
          print(f"  {mode} remat {remat} check b={b} ({cap} GiB): predicted {predicted:.2f} GiB, "
                f"measured {row['total_gib']:.2f} GiB, compile {row['compile_s']} s", flush=True)
        with open(partial, "w") as fh:   # what --resume reads after an interruption
          json.dump(report(device_note, notes, rows, fits, verified, time.perf_counter() - start), fh, indent=1)

  print(table(rows, fits), flush=True)
  for v in verified:
    print(f"check {v['encoder']} {v['mode']} remat {v['remat']} b={v['b']}: predicted "
          f"{v['predicted_total_gib']:.2f} GiB, measured {v['measured_total_gib']:.2f} GiB", flush=True)
  write_result(report(device_note, notes, rows, fits, verified, time.perf_counter() - start), args.out)
  os.remove(partial)


if __name__ == "__main__":
  main()
