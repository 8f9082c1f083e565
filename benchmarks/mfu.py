"""Model FLOPs utilisation, step time, compile time and memory per part of the model (printed as a
table and written to JSON; never a timed test).

    python benchmarks/mfu.py [--encoders vit_b_rvsa] [--sizes 448] [--parts encoder ss is rd all rd1024] \
        [--scan-blocks] [--remat] \
        [--batch 2] [--steps 3] [--dtype bfloat16] [--peak-tflops X] [--tiny]
        [--out benchmarks/results/mfu.json]

Parts, each compiled and timed on its own on all local devices:
  encoder   forward + backward of the encoder alone (loss: sum of squares of its four maps);
  ss/is/rd  the real pretraining train step (`loop.Trainer`: forward, losses, backward, AdamW)
            with only that task's head (UperNet / Mask R-CNN / Oriented R-CNN) on the encoder;
  all       the full three-task pretraining step (MTP_SPEC §3.2);
  rd1024    the Oriented R-CNN finetuning step of configs/finetune/dota_v1.py at 1024 px (the
            `--sizes` are ignored), on the batch of benchmarks/finetune_step.py.
Pretraining parts read `--batch` images per subset of a synthetic SAMRS sample (written and
converted to a temporary folder at the largest size) through the training reader.

Figures per row: compile_s; step_s (mean of `--steps` after one warm-up); images_per_s; flops per
step and device from XLA's cost analysis of the compiled step (what XLA executes, recomputation
included); mfu = flops / step_s / peak of one device; per-device memory from XLA's memory
analysis (argument + output - alias + temp, GiB), and the allocator's peak where the backend
reports one. Peak: `--peak-tflops`, else the table below by device kind and dtype (dense
tensor-core / MXU rates; float32 on GPUs is TF32, JAX's default matmul precision there), else
(CPUs) the measured rate of a 2048^3 matmul in the dtype, which `peak_source` names.
`--tiny` shrinks everything to the CI smoke size (3-block width-48 ViT or the toy InternImage of
configs/recipes.py INTERN_IMAGE_SMOKE, 64 px, toy heads). InternImage (`--encoders intern_image_xl`) runs
with its own recipes: configs/pretrain/mtp_internimage_xl.py and dota_v1.py:internimage.
"""

import argparse
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import write_result  # noqa: E402
from finetune_step import synthetic_batch  # noqa: E402
from data_pipelines.samrs import convert, synthetic  # noqa: E402
from data_pipelines.samrs import examples as samrs_examples  # noqa: E402
from mtp_jax import experiment, models, tasks as tasks_lib  # noqa: E402
from mtp_jax.config import apply_overrides, load_config, load_module  # noqa: E402
from mtp_jax.parallel import sharding  # noqa: E402
from mtp_jax.train import batching, loop  # noqa: E402

GIB = 2 ** 30
# Dense peak FLOP/s per chip: (substring of jax's device_kind, bfloat16, float32).
PEAKS = (("TPU v4", 275e12, 275e12), ("TPU v5 lite", 197e12, 197e12), ("TPU v5e", 197e12, 197e12),
         ("TPU v5p", 459e12, 459e12), ("TPU v5", 459e12, 459e12), ("TPU v6", 918e12, 918e12),
         ("A100", 312e12, 156e12), ("H100", 989e12, 495e12), ("H200", 989e12, 495e12))
TASKS = ("ss", "is", "rd")


def is_intern_image(encoder: str) -> bool:
  return encoder in models.INTERN_IMAGE_PRESETS


def pretrain_recipe(encoder: str) -> str:
  """The paper's pretraining config of the encoder's family (its lr, layer decay, drop path)."""
  return "configs/pretrain/" + ("mtp_internimage_xl.py" if is_intern_image(encoder) else "mtp_vit_b_rvsa.py")


def finetune_rd_recipe(encoder: str) -> str:
  return "configs/finetune/dota_v1.py" + (":internimage" if is_intern_image(encoder) else "")


def tiny_encoder(encoder: str) -> dict:
  """The CI smoke size of the encoder's family: a 3-block width-48 ViT, or the toy InternImage."""
  if is_intern_image(encoder):
    return dict(load_module("configs/recipes.py").INTERN_IMAGE_SMOKE)
  return dict(embed_dim=48, depth=3, num_heads=2, out_indices=(0, 1, 2, 2), patch_size=8)


def tiny_encoder_sets(encoder: str) -> list[str]:
  return [f"model.encoder_overrides.{k}={v!r}" for k, v in tiny_encoder(encoder).items()]

TINY_HEADS = ["tasks.ss.channels=16", "tasks.rd.neck_channels=16", "tasks.rd.fc_channels=32",
              "tasks.rd.rpn_samples=32", "tasks.rd.train_proposals=64", "tasks.rd.rcnn_samples=32",
              "tasks.is.neck_channels=16", "tasks.is.fc_channels=32", "tasks.is.mask_channels=8",
              "tasks.is.rpn_samples=32", "tasks.is.train_pre_nms=64", "tasks.is.train_proposals=64",
              "tasks.is.rcnn_samples=32"]


def peak_flops(dtype: str, override_tflops: float | None) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from)."""
  if override_tflops:
    return override_tflops * 1e12, "--peak-tflops"
  kind = jax.devices()[0].device_kind
  for name, bf16, fp32 in PEAKS:
    if name in kind:
      return (bf16 if dtype == "bfloat16" else fp32), f"table: {name}"
  n = 2048
  a = jnp.ones((n, n), jnp.dtype(dtype))
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  start = time.perf_counter()
  for _ in range(5):
    out = matmul(a)
  jax.block_until_ready(out)
  return 2 * n ** 3 * 5 / (time.perf_counter() - start), f"measured: {n}^3 {dtype} matmul"


def measure(jitted, args, steps: int, images: int, peak: float, carry_state: bool) -> dict:
  """Compiles `jitted` for `args` and times it; carry_state: it returns (state, ...) to feed back."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  mem = compiled.memory_analysis()
  memory_gib = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes) / GIB

  def run(args):
    out = compiled(*args)
    return ((out[0], *args[1:]) if carry_state else args), out

  args, out = run(args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    args, out = run(args)
  jax.block_until_ready(out)
  step_s = (time.perf_counter() - start) / steps
  row = {"compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
         "images_per_s": round(images / step_s, 2), "gflops_per_step_per_device": round(flops / 1e9, 2),
         "mfu": round(flops / step_s / peak, 4), "memory_gib_per_device": round(memory_gib, 3)}
  stats = jax.devices()[0].memory_stats() or {}
  if stats.get("peak_bytes_in_use"):
    row["peak_allocated_gib"] = round(stats["peak_bytes_in_use"] / GIB, 3)
  return row


def encoder_part(encoder: str, size: int, batch: int, dtype: str, tiny: bool, steps: int, peak: float,
                 model_flags: dict):
  overrides = tiny_encoder(encoder) if tiny else {}
  enc = models.build_encoder(encoder, size, rngs=nnx.Rngs(0),
                             dtype=None if dtype == "float32" else jnp.dtype(dtype), **model_flags, **overrides)
  graphdef, params = nnx.split(enc, nnx.Param)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)

  def loss(params, x):
    return sum(jnp.sum(f.astype(jnp.float32) ** 2) for f in nnx.merge(graphdef, params)(x))

  step = jax.jit(jax.value_and_grad(loss))
  return measure(step, (params, images), steps, batch, peak, carry_state=False)


def trainer_part(config, raw: dict, subsets, steps: int, peak: float) -> dict:
  names = {s: [f"class{i}" for i in range(c)] for s, c in raw.pop("_classes").items()} if "_classes" in raw else None
  tasks = experiment.tasks(config, names)
  mesh = sharding.config_mesh(config.mesh)
  trainer = loop.Trainer(config, tasks, mesh)
  state = trainer.init()
  batch = batching.device_batch(raw, subsets, mesh, trainer.fields)
  images = batch["image"].shape[0]
  return measure(trainer.step, (state, batch), steps, images, peak, carry_state=True)


def pretrain_config(data_dir, encoder, size, batch, dtype, tiny, enabled, model_sets):
  sets = [*model_sets, f"data.dir={data_dir!r}", f"model.encoder={encoder!r}", f"data.image_size={size}",
          f"data.batch_per_subset={batch * jax.device_count()}", f"model.compute_dtype={dtype!r}",
          *[f"tasks.{t}.enabled={t in enabled}" for t in TASKS]]
  if tiny:
    sets += tiny_encoder_sets(encoder) + TINY_HEADS + ["data.max_instances.sota=16", "data.max_instances.sior=16",
                                                       "data.max_instances.fast=16"]
  return apply_overrides(load_config(pretrain_recipe(encoder)), sets)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--encoders", nargs="+", default=["vit_b_rvsa"])
  p.add_argument("--sizes", type=int, nargs="+", default=[448])
  p.add_argument("--parts", nargs="+", default=["encoder", "ss", "is", "rd", "all", "rd1024"])
  p.add_argument("--batch", type=int, default=2, help="images (per subset) per device")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--peak-tflops", type=float, default=None)
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--scan-blocks", action="store_true", help="model.scan_blocks: the encoder as a lax.scan")
  p.add_argument("--remat", action="store_true", help="model.remat: activation checkpointing per block")
  p.add_argument("--out", default="benchmarks/results/mfu.json")
  args = p.parse_args(argv)
  if args.tiny:
    args.sizes = [64]
  peak, peak_source = peak_flops(args.dtype, args.peak_tflops)
  model_flags = {"scan_blocks": args.scan_blocks, "remat": args.remat}
  model_sets = [f"model.{k}={v}" for k, v in model_flags.items()]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    pretrain_parts = [q for q in args.parts if q in (*TASKS, "all")]
    if pretrain_parts:
      per_subset = max(2 * args.batch * jax.device_count(), 4)
      synthetic.generate(os.path.join(tmp, "raw"), images=per_subset + 2, size=max(args.sizes),
                         seed=0, valid_fraction=0.01)
      for subset in ("sota", "sior", "fast"):
        convert.convert_split(os.path.join(tmp, "raw"), subset, "train", os.path.join(tmp, "data"),
                              num_shards=1, log=lambda *_: None)
    for encoder in args.encoders:
      for size in args.sizes:
        for part in args.parts:
          if part == "rd1024" and size != args.sizes[0]:
            continue
          if part == "encoder":
            row = encoder_part(encoder, size, args.batch * jax.device_count(), args.dtype, args.tiny,
                               args.steps, peak, model_flags)
          elif part == "rd1024":
            sets = [*model_sets, f"model.encoder={encoder!r}", f"data.batch_per_subset={args.batch * jax.device_count()}",
                    f"model.compute_dtype={args.dtype!r}"]
            if args.tiny:
              sets += tiny_encoder_sets(encoder) + ["data.image_size=128", "data.max_instances.dota_v1=128",
                                      "tasks.rd.neck_channels=16", "tasks.rd.fc_channels=32",
                                      "tasks.rd.rpn_samples=32", "tasks.rd.train_proposals=64",
                                      "tasks.rd.rcnn_samples=32"]
            config = apply_overrides(load_config(finetune_rd_recipe(encoder)), sets)
            raw = synthetic_batch(config, 15, config.data.batch_per_subset, np.random.default_rng(0))
            raw["_classes"] = {config.data.dataset: 15}
            row = trainer_part(config, raw, (config.data.dataset,), args.steps, peak)
            row["image_px"] = config.data.image_size
          else:
            enabled = TASKS if part == "all" else (part,)
            config = pretrain_config(os.path.join(tmp, "data"), encoder, size, args.batch, args.dtype,
                                     args.tiny, enabled, model_sets)
            batches = samrs_examples.train_batches(
                config.data.dir, tuple(config.data.subsets), image_size=size,
                max_instances=dict(config.data.max_instances), batch_size=config.data.batch_per_subset,
                seed=0, shuffle_window=4, with_masks=tasks_lib.needs_masks(experiment.tasks(config)))
            raw = next(batches)
            batches.close()
            row = trainer_part(config, raw, tuple(config.data.subsets), args.steps, peak)
          row = {"encoder": encoder, "part": part, "image_px": row.pop("image_px", size), **row}
          rows.append(row)
          print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
  result = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "dtype": args.dtype, "batch_per_device": args.batch,
            "tiny": args.tiny, **model_flags, "peak_tflops": round(peak / 1e12, 3), "peak_source": peak_source,
            "jax": jax.__version__, "rows": rows}
  write_result(result, args.out)
  bad = [(r["part"], k) for r in rows for k, v in r.items()
         if isinstance(v, float) and not (math.isfinite(v) and v > 0)]
  if bad:
    raise SystemExit(f"non-finite or non-positive figures: {bad}")
  return result


if __name__ == "__main__":
  main()
