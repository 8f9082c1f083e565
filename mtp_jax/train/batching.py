"""Host batches to device: subsets interleaved into one global batch split over the batch axes.

The encoder sees one batch whose rows alternate between subsets (MTP_SPEC.md §3.2, one encoder
pass over the G subsets' images): image i of subset g is row i*G + g (mtp_jax/models/multitask.py).
"""

import jax
import numpy as np

from mtp_jax.errors import ConfigError
from mtp_jax.parallel import distributed, sharding


def interleave(per_subset: dict, subsets, key: str) -> np.ndarray:
  """{subset: (b, ...)} -> (b*G, ...) with image i of subset g at row i*G + g."""
  stacked = np.stack([per_subset[s][key] for s in subsets], axis=1)
  return stacked.reshape(-1, *stacked.shape[2:])


def device_batch(raw: dict, subsets, mesh, keys=("image", "semantic")):
  """{subset: host batch} -> {key: global jax.Array} of the interleaved rows."""
  return sharding.global_batch({k: interleave(raw, subsets, k) for k in keys}, mesh)


def check_batch_size(name: str, per_subset: int, mesh, accum_steps: int = 1):
  """Per-process images per subset; the global count must split over the batch shards, the
  processes and the micro-batches."""
  div = sharding.batch_divisor(mesh)
  if per_subset % (div * accum_steps) or per_subset % jax.process_count():
    micro = f" times the {accum_steps} micro-batches" if accum_steps > 1 else ""
    raise ConfigError(f"{name} = {per_subset} must be a multiple of the {div} batch shards{micro} "
                      f"and of the {jax.process_count()} processes")
  return per_subset // jax.process_count()


def compile_everywhere(jitted, name: str, *args):
  """`jitted` compiled for `args`, once every process has compiled it (distributed.barrier)."""
  compiled = jitted.lower(*args).compile()
  distributed.barrier(f"compiled {name}")
  return compiled
