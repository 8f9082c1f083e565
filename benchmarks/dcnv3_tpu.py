"""DCNv3's bytes and roofline on a TPU chip, gather against matmul, from the TPU compiler (no TPU
needed; figures, not a test).

    python benchmarks/dcnv3_tpu.py [--topology v5p-8] [--image-size 448] [--methods gather matmul] \
        [--out benchmarks/results/dcnv3_tpu.json]

Compiles forward + backward (gradients to the input, offsets and mask) of one `dcnv3_core` call
per InternImage-XL stage, as its blocks call it for one image at --image-size (maps at strides
4, 8, 16, 32: channels 192 ... 1536, groups 12 ... 96, 3 x 3 points), bfloat16, for one chip of
the slice. Reports per call: bytes and flops (XLA's cost analysis, with the repeats of
fixed-length loops), the roofline time on that chip and the compile time; and per image, the
encoder's DCNv3 total over its 5 + 5 + 24 + 5 blocks for each method and for 'auto' (each stage
in the form `mtp_jax.ops.dcnv3.resolve_method` picks on TPU).
Needs libtpu: pip install -e '.[tpu]'.
"""

import argparse
import time

from mtp_jax.plan import chips

chips.tpu_environment()   # before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from mtp_jax.ops import target  # noqa: E402
from mtp_jax.ops.dcnv3 import dcnv3_core, resolve_method  # noqa: E402
from mtp_jax.plan import estimate, hlo  # noqa: E402
from _report import write_result  # noqa: E402

STAGES = ((4, 192, 12, 5), (8, 384, 24, 5), (16, 768, 48, 24), (32, 1536, 96, 5))   # stride, C, groups, blocks
POINTS = 9


def auto_total(rows) -> dict:
  """The encoder's per-image total with method 'auto' on TPU: each stage's row of the method
  `dcnv3.resolve_method` picks for its map there."""
  total = {"gb": 0.0, "gflop": 0.0, "roofline_ms": 0.0}
  with target.compiling_for("tpu"):
    for r in rows:
      if r["method"] == resolve_method("auto", r["map"], r["map"]):
        total["gb"] += r["blocks"] * r["gb_per_call"]
        total["gflop"] += r["blocks"] * r["gflop_per_call"]
        total["roofline_ms"] += r["blocks"] * r["roofline_ms_per_call"]
  return total


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--topology", default="v5p-8")
  p.add_argument("--image-size", type=int, default=448)
  p.add_argument("--methods", nargs="+", default=["gather", "matmul"])
  p.add_argument("--out", default="benchmarks/results/dcnv3_tpu.json")
  args = p.parse_args()
  tpu_slice = chips.resolve(args.topology)
  device = topologies.get_topology_desc(**tpu_slice.topology_kwargs()).devices[0]
  on_chip = jax.sharding.SingleDeviceSharding(device)
  spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=on_chip)
  rows, totals = [], {}
  for method in args.methods:
    for stride, channels, group, blocks in STAGES:
      side = args.image_size // stride

      def loss(x, offset, mask, cotangent, group=group, method=method):
        out = dcnv3_core(x, offset, mask, group=group, offset_scale=2.0, method=method)
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))

      start = time.perf_counter()
      with target.compiling_for("tpu"):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
            spec((1, side, side, channels)), spec((1, side, side, group * POINTS * 2)),
            spec((1, side, side, group * POINTS)), spec((1, side, side, channels)))
      compiled = lowered.compile()
      seconds = time.perf_counter() - start
      cost = estimate.cost(compiled)
      repeats = hlo.loop_repeats(hlo.kernels(compiled.as_text()))
      flops, bytes_ = cost["flops"] + repeats["flops"], cost["bytes"] + repeats["bytes"]
      roof = estimate.roofline(flops, bytes_, tpu_slice.chip.peak_bf16_flops, tpu_slice.chip.hbm_bytes_per_s)
      rows.append({"method": method, "stride": stride, "map": side, "channels": channels, "groups": group,
                   "blocks": blocks, "gb_per_call": round(bytes_ / 1e9, 4), "gflop_per_call": round(flops / 1e9, 3),
                   "roofline_ms_per_call": round(roof["seconds"] * 1e3, 4),
                   "hbm_mib": round(estimate.memory(compiled)["total"] / 2 ** 20, 1),
                   "compile_s": round(seconds, 1)})
      print(rows[-1], flush=True)
      total = totals.setdefault(method, {"gb": 0.0, "gflop": 0.0, "roofline_ms": 0.0})
      total["gb"] += blocks * bytes_ / 1e9
      total["gflop"] += blocks * flops / 1e9
      total["roofline_ms"] += blocks * roof["seconds"] * 1e3
  if {"gather", "matmul"} <= totals.keys():
    totals["auto"] = auto_total(rows)
  for method, total in totals.items():
    total.update({k: round(v, 3) for k, v in total.items()})
    print(f"{method}: the encoder's 39 DCNv3 calls per image, forward + backward: {total['gb']} GB, "
          f"{total['gflop']} GFLOP, roofline {total['roofline_ms']} ms on {tpu_slice.chip.name}")
  write_result({"topology": tpu_slice.name, "chip": tpu_slice.chip.name, "image_size": args.image_size,
                "dtype": "bfloat16", "jax": jax.__version__, "rows": rows, "encoder_per_image": totals}, args.out)


if __name__ == "__main__":
  main()
