"""Host batches to device: images interleaved into one global batch, ground truth per subset.

The encoder sees one batch whose rows alternate between subsets (MTP_SPEC.md §3.2, one encoder
pass over the G subsets' images): image i of subset g is row i*G + g (mtp_jax/models/multitask.py).
Ground truth stays per subset, `{subset: {field: (b, ...)}}`, since subsets pad their instances to
different counts (data.max_instances); every array is split over the batch axes, so a device
holds the ground truth of exactly the images whose rows it holds.
"""

import jax
import numpy as np

from mtp_jax.errors import ConfigError
from mtp_jax.parallel import distributed, sharding
from mtp_jax.train import host_memory


def interleave(per_subset: dict, subsets, key: str) -> np.ndarray:
  """{subset: (b, ...)} -> (b*G, ...) with image i of subset g at row i*G + g."""
  stacked = np.stack([per_subset[s][key] for s in subsets], axis=1)
  return stacked.reshape(-1, *stacked.shape[2:])


def task_fields(tasks: dict, train: bool) -> tuple:
  """The example fields that the enabled tasks read on the device, in a fixed order."""
  return tuple(sorted({f for task in tasks.values() for f in task.fields(train)}))


def device_batch(raw: dict, subsets, mesh, fields=()):
  """{subset: host batch} -> {"image": (b*G, ...) interleaved, "gt": {subset: {field: (b, ...)}}}
  as global jax.Arrays split over the batch axes."""
  host = {"image": interleave(raw, subsets, "image"),
          "gt": {s: {f: raw[s][f] for f in fields} for s in subsets}}
  return sharding.global_batch(host, mesh)


def abstract_batch(shapes: dict, per_subset: int, fields, sharding=None) -> dict:
  """ShapeDtypeStructs of a `device_batch` of `per_subset` GLOBAL images per subset (for
  lowering): shapes {subset: {field: (shape, dtype)}} (`Source.device_shapes`), in the order the
  batch interleaves the subsets; sharding: of every leaf (the batch sharding), or None."""
  subsets = tuple(shapes)
  struct = lambda shape, dtype, n: jax.ShapeDtypeStruct((n, *shape), dtype, sharding=sharding)
  image_shape, image_dtype = shapes[subsets[0]]["image"]
  return {"image": struct(image_shape, image_dtype, per_subset * len(subsets)),
          "gt": {s: {f: struct(*shapes[s][f], per_subset) for f in fields} for s in subsets}}


def check_batch_size(name: str, per_subset: int, mesh, accum_steps: int = 1, processes: int | None = None):
  """Per-process images per subset; the global count must split over the batch shards, the
  processes (default: this job's) and the micro-batches."""
  div = sharding.batch_divisor(mesh)
  processes = processes or jax.process_count()
  if per_subset % (div * accum_steps) or per_subset % processes:
    micro = f" times the {accum_steps} micro-batches" if accum_steps > 1 else ""
    raise ConfigError(f"{name} = {per_subset} must be a multiple of the {div} batch shards{micro} "
                      f"and of the {processes} processes")
  return per_subset // processes


def compile_everywhere(jitted, name: str, *args):
  """`jitted` compiled for `args`, once every process has compiled it (distributed.barrier).
  The compiler's freed heap goes back to the system before the program's buffers are allocated
  (`host_memory.release_freed_heap`)."""
  compiled = jitted.lower(*args).compile()
  host_memory.release_freed_heap()
  distributed.barrier(f"compiled {name}")
  return compiled
