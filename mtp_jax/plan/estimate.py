"""What the compiler says of one compiled program, per chip: HBM, flops, bytes and a roofline time.

`memory(compiled)`: the buffer assignment's bytes per device (arguments, outputs, aliased
arguments, temporaries, the program's own code) and total = arguments + outputs - aliased +
temporaries + code, the HBM the program holds while it runs.
`cost(compiled)`: XLA's cost analysis of the per-device program: flops, bytes accessed (every
operand read and result written at the boundary of each fused kernel) and, where positive, the
TPU compiler's own `optimal_seconds` (it comes out negative for large programs with loops, so it
is shown only beside the roofline, never instead of it).
`roofline(...)`: max(flops / peak, bytes / bandwidth), the step's time if it ran at the chip's
peak or its HBM bandwidth, whichever binds (bytes that stay on chip are charged at HBM bandwidth
too, so a memory-bound estimate errs long); which of the two binds; the arithmetic intensity. These are estimates from the
compiler's counts, not measured run times.
`out_of_memory(error)`: the TPU compiler refuses a program that cannot fit HBM; this reads what
it needed and what the chip has from its message.
"""

import contextlib
import re

GIB = 2 ** 30
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def memory(compiled) -> dict:
  """Bytes per device of a compiled executable's buffers (see the module docstring)."""
  m = compiled.memory_analysis()
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
         "code": m.generated_code_size_in_bytes}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
  return out


def cost(compiled) -> dict:
  """{flops, bytes, transcendentals, optimal_seconds (None unless positive)} per device."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):   # older jax: one dict per program
    analysis = analysis[0]
  analysis = analysis or {}
  optimal = analysis.get("optimal_seconds")
  return {"flops": float(analysis.get("flops", 0.0)), "bytes": float(analysis.get("bytes accessed", 0.0)),
          "transcendentals": float(analysis.get("transcendentals", 0.0)),
          "optimal_seconds": float(optimal) if optimal is not None and optimal > 0 else None}


def roofline(flops: float, bytes_accessed: float, peak_flops: float, bytes_per_s: float) -> dict:
  """Roofline time of one program run on a chip of `peak_flops` FLOP/s and `bytes_per_s` HBM
  bandwidth: {seconds, compute_seconds, memory_seconds, bound, intensity (FLOP/byte),
  utilization (flops / seconds / peak: the share of the chip's peak the bound allows)}."""
  compute_s, memory_s = flops / peak_flops, bytes_accessed / bytes_per_s
  seconds = max(compute_s, memory_s)
  return {"seconds": seconds, "compute_seconds": compute_s, "memory_seconds": memory_s,
          "bound": "compute" if compute_s >= memory_s else "memory",
          "intensity": flops / bytes_accessed if bytes_accessed else float("inf"),
          "utilization": flops / seconds / peak_flops if seconds else 0.0}


def _bytes(value: str, unit: str) -> int:
  return int(float(value) * _UNITS[unit.upper()])


def out_of_memory(error: BaseException) -> dict | None:
  """{needed_bytes, available_bytes, message} if `error` is the compiler refusing a program for
  HBM (either bound may be None when its message does not give it), else None."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  line = next((l.strip() for l in text.splitlines() if "memory" in l.lower()), text.strip().splitlines()[0])
  needed = available = None
  match = re.search(r"required for [^(]*\(([\d.]+)([KMGT]?)\)\s*exceeds available HBM \(([\d.]+)([KMGT]?)\)", text)
  if match:
    needed, available = _bytes(*match.group(1, 2)), _bytes(*match.group(3, 4))
  match = re.search(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", text)
  if match:
    needed, available = _bytes(*match.group(1, 2)), _bytes(*match.group(3, 4))
  return {"needed_bytes": needed, "available_bytes": available, "message": line}


def usable_hbm(device) -> int | None:
  """HBM bytes the TPU compiler lets a program use on `device` (a topology device), read from its
  refusal of a program far larger than any chip; None if it cannot be read."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: PLC0415
  mesh = Mesh([device], ("one",))
  huge = jax.ShapeDtypeStruct((2 ** 17, 2 ** 17), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
  try:
    with without_persistent_cache():
      jax.jit(lambda x: jnp.exp(x) + 1).lower(huge).compile()
  except Exception as e:  # noqa: BLE001 (the compiler's refusal is the answer)
    oom = out_of_memory(e)
    return oom["available_bytes"] if oom else None
  return None


@contextlib.contextmanager
def without_persistent_cache():
  """JAX's persistent compilation cache off: an executable compiled for a topology without its
  hardware cannot be read back from it (there is no client to load it into)."""
  import jax  # noqa: PLC0415
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
