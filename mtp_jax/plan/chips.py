"""TPU chips and the slice names users rent, mapped to the TPU compiler's topologies.

A slice is named as Cloud TPU names it: `v4-8`, `v5p-64` (the number counts TensorCores, two per
chip), `v5e-16` or `v5litepod-16`, `v6e-8` (the number counts chips). `resolve("v5p-64")` gives
the topology string `jax.experimental.topologies.get_topology_desc` takes ("v5:2x4x4"), the chip,
and the hosts of the slice. A raw topology string ("v5p:4x4x8", "v5e:8x16") is accepted too.

Chip figures are Google's published per-chip specifications (the `source` of each entry). HBM
capacities are in GiB as the runtime counts them; the runtime keeps a little of it for itself,
so a program within a few hundred MiB of the capacity may still not load.
"""

import dataclasses
import math
import os
import re

from mtp_jax.errors import ConfigError

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str                  # as users rent it: v4, v5e, v5p, v6e
  topology_prefix: str       # the TPU compiler's name in topology strings
  device_kind: str           # jax's device_kind on that chip
  peak_bf16_flops: float     # dense bfloat16 matrix FLOP/s per chip
  hbm_bytes: int             # HBM per chip
  hbm_bytes_per_s: float     # HBM bandwidth per chip
  chips_per_host: int        # chips on one host VM of a multi-host slice
  cores_per_chip: int        # TensorCores per chip (2: megacore, one JAX device per chip)
  dims: int                  # torus dimensions (2 or 3)
  source: str

  @property
  def ridge(self) -> float:
    """FLOP per byte above which a program is compute-bound on this chip."""
    return self.peak_bf16_flops / self.hbm_bytes_per_s


CHIPS = {
    "v4": Chip("v4", "v4", "TPU v4", 275e12, 32 * GIB, 1200e9, 4, 2, 3,
               "https://cloud.google.com/tpu/docs/v4 (275 TFLOPs bf16; HBM2 32 GiB, 1200 GBps)"),
    "v5e": Chip("v5e", "v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 8, 1, 2,
                "https://cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16; HBM2 16 GB, 819 GBps)"),
    "v5p": Chip("v5p", "v5", "TPU v5", 459e12, 95 * GIB, 2765e9, 4, 2, 3,
                "https://cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16; HBM2e 95 GB, 2765 GBps)"),
    "v6e": Chip("v6e", "v6e", "TPU v6 lite", 918e12, 32 * GIB, 1640e9, 8, 1, 2,
                "https://cloud.google.com/tpu/docs/v6e (918 TFLOPs bf16; HBM 32 GB, 1640 GBps)"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e"}

# Chip counts of the slice shapes Cloud TPU offers: 2-D (v5e, v6e) and 3-D (v4, v5p) tori.
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
             256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str                  # what the user asked for
  chip: Chip
  shape: tuple               # chips along each torus axis
  topology: str              # the TPU compiler's topology string, e.g. "v5:2x4x4"

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def chips_per_host_bounds(self) -> tuple:
    """Chips of one host along each axis (what get_topology_desc needs to split the hosts)."""
    if self.num_chips == 1:
      return (1, 1, 1)
    if self.num_chips <= 4 or self.chip.chips_per_host == 4:
      return (2, 2, 1)
    return (2, 4, 1)   # 8-chip hosts of v5e / v6e

  @property
  def num_hosts(self) -> int:
    return max(1, self.num_chips // math.prod(self.chips_per_host_bounds))

  def topology_kwargs(self) -> dict:
    """Keyword arguments of jax.experimental.topologies.get_topology_desc for this slice."""
    return {"topology_name": self.topology, "platform": "tpu",
            "chip_config_name": "megacore" if self.chip.cores_per_chip == 2 else "default",
            "chips_per_host_bounds": self.chips_per_host_bounds}


def _chip(name: str, what: str) -> Chip:
  key = ALIASES.get(name, name)
  if key not in CHIPS:
    raise ConfigError(f"--topology {what}: unknown TPU generation {name!r}; known: {', '.join(CHIPS)}")
  return CHIPS[key]


def resolve(name: str) -> Slice:
  """The slice of a Cloud TPU name (`v5p-64`, `v5e-16`, `v5litepod-16`, `v6e-8`, `v4-8`) or of a
  topology string (`v5p:2x4x4`, `v5e:4x8`)."""
  text = name.strip().lower()
  raw = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
  if raw:
    chip = _chip(raw.group(1), name)
    shape = tuple(int(v) for v in raw.group(2).split("x"))
    if len(shape) != chip.dims:
      raise ConfigError(f"--topology {name}: {chip.name} slices have {chip.dims} axes, e.g. "
                        f"{chip.name}:{'x'.join(['2'] * chip.dims)}")
    return Slice(name, chip, shape, f"{chip.topology_prefix}:{'x'.join(map(str, shape))}")
  rented = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if not rented:
    raise ConfigError(f"--topology {name!r}: expected a Cloud TPU name such as v5p-8, v5e-16, v6e-8, "
                      f"v4-8, or a topology such as v5p:2x2x1")
  chip = _chip(rented.group(1), name)
  count = int(rented.group(2))
  chips = count // chip.cores_per_chip if chip.cores_per_chip == 2 else count
  shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
  if count % chip.cores_per_chip or chips not in shapes:
    unit = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
    sizes = ", ".join(f"{chip.name}-{n * chip.cores_per_chip}" for n in shapes)
    raise ConfigError(f"--topology {name}: the number after the dash counts {unit}; {chip.name} slices "
                      f"are {sizes} (or give a topology such as {chip.name}:{'x'.join(['4'] * chip.dims)})")
  shape = shapes[chips]
  return Slice(name, chip, shape, f"{chip.topology_prefix}:{'x'.join(map(str, shape))}")


def chip_of_device_kind(device_kind: str) -> Chip | None:
  """The chip whose jax device_kind this is (the longest match), or None (CPU, GPU, unknown)."""
  best = None
  for chip in CHIPS.values():
    if device_kind.startswith(chip.device_kind) and (best is None or len(chip.device_kind) > len(best.device_kind)):
      best = chip
  return best


def tpu_environment():
  """Environment for compiling for TPU slices on a machine without one: JAX stays on the CPU (the
  topology API loads libtpu itself) and several processes may load libtpu at once. Call before
  jax is imported."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
