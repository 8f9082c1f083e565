"""Shared by the TPU-compiler benchmarks: one chip of a slice to compile for, and the figures of a
program compiled for it (no TPU needed; libtpu must be installed, and `chips.tpu_environment()`
called before jax is imported)."""

import jax
from jax.experimental import topologies

from mtp_jax.ops import target
from mtp_jax.plan import chips, estimate, hlo


def one_chip(topology: str):
  """(the slice, spec(shape, dtype) -> an abstract array placed on the slice's first chip)."""
  tpu_slice = chips.resolve(topology)
  device = topologies.get_topology_desc(**tpu_slice.topology_kwargs()).devices[0]
  on_chip = jax.sharding.SingleDeviceSharding(device)
  return tpu_slice, lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip)


def compile_and_measure(fn, specs, tpu_slice) -> dict:
  """jit(fn) traced for the TPU and compiled for `specs`: GB and GFLOP (XLA's cost analysis plus
  the repeats of fixed-length loops), the roofline time on the slice's chip and HBM in MiB."""
  with target.compiling_for("tpu"):
    compiled = jax.jit(fn).lower(*specs).compile()
  cost = estimate.cost(compiled)
  repeats = hlo.loop_repeats(hlo.kernels(compiled.as_text()))
  flops, bytes_ = cost["flops"] + repeats["flops"], cost["bytes"] + repeats["bytes"]
  roof = estimate.roofline(flops, bytes_, tpu_slice.chip.peak_bf16_flops, tpu_slice.chip.hbm_bytes_per_s)
  return {"gb": round(bytes_ / 1e9, 3), "gflop": round(flops / 1e9, 2),
          "roofline_ms": round(roof["seconds"] * 1e3, 3),
          "hbm_mib": round(estimate.memory(compiled)["total"] / 2 ** 20, 1)}
