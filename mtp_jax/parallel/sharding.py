"""Mesh construction and the mapping from logical parameter axes to mesh axes.

Parameters carry logical axis names (mtp_jax/models/layers.py); `config.sharding_rules` maps each
to a mesh axis or None. The mesh axes are fixed, `MESH_AXES` = ('data', 'fsdp', 'tensor'), and
the batch is split over `BATCH_AXES` = ('data', 'fsdp'); config.mesh.shape sizes them. Meshes are
built with `jax.sharding.Mesh` and Auto axis types (jax.make_mesh would default to Explicit axes).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtp_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(shape, devices=None) -> Mesh:
  """Mesh of `shape` (sizes of MESH_AXES) over `devices` (default all); one entry may be -1."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  axis_names = MESH_AXES
  if len(shape) != len(axis_names):
    raise ConfigError(f"mesh.shape {tuple(shape)} must give the sizes of the mesh axes {axis_names}")
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh.shape {tuple(shape)} has more than one -1")
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if len(devices) % rest:
      raise ConfigError(f"mesh.shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // rest
  if math.prod(shape) != len(devices):
    raise ConfigError(f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices, found {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names),
              axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def config_mesh(mesh_config, devices=None, process_count: int | None = None) -> Mesh:
  """The mesh of a config's `mesh` block: `shape` over all `devices` (default: the job's), or
  over the first `num_devices` of a one-process job (process_count: default this job's)."""
  devices = list(devices if devices is not None else jax.devices())
  processes = process_count or jax.process_count()
  n = int(mesh_config.get("num_devices", 0))
  if n <= 0:
    return make_mesh(mesh_config.shape, devices)
  if processes > 1:
    raise ConfigError(f"mesh.num_devices={n}: a job of {processes} processes uses all "
                      f"its devices; leave it 0")
  if n > len(devices):
    raise ConfigError(f"mesh.num_devices={n} but there are {len(devices)} devices")
  return make_mesh(mesh_config.shape, devices[:n])


def logical_to_mesh(spec: P, rules, mesh: Mesh, shape=None) -> P:
  """PartitionSpec of logical names -> PartitionSpec of mesh axes.

  A logical name without a rule, mapped to None, or to a mesh axis that is absent or of size 1
  stays whole (replicated); so does a dimension of `shape` that the mesh axis does not divide
  (e.g. a 19-class predictor on 8 devices), and any second use of the same mesh axis.
  """
  table = dict(rules)
  out, used = [], set()
  for dim, name in enumerate(spec):
    axis = table.get(name) if name is not None else None
    fits = axis in mesh.axis_names and mesh.shape[axis] > 1 and axis not in used
    if fits and shape is not None and shape[dim] % mesh.shape[axis]:
      fits = False
    out.append(axis if fits else None)
    used.add(axis if fits else None)
  return P(*out)


def tree_shardings(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a pytree of nnx Variables (logical names) and plain leaves (replicated)."""
  specs = nnx.get_partition_spec(abstract_tree)
  def shard(spec, leaf):
    if not isinstance(spec, P):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_mesh(spec, rules, mesh, getattr(leaf, "shape", None)))
  return jax.tree.map(shard, specs, abstract_tree, is_leaf=lambda x: isinstance(x, P) or x is None)


def bytes_per_device(tree) -> int:
  """Bytes of `tree`'s jax.Arrays held by this process's first device."""
  device = jax.local_devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, "addressable_shards", ()):
      if shard.device == device:
        total += shard.data.nbytes
  return total


def batch_spec(mesh) -> P:
  """The batch dimension split over the BATCH_AXES the mesh (or AbstractMesh) has."""
  return P(tuple(a for a in BATCH_AXES if a in mesh.axis_names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh))


def batch_divisor(mesh) -> int:
  """How many ways the batch dimension is split (a Mesh or an AbstractMesh)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def traced_in_mesh(fn, mesh: Mesh):
  """`fn` traced with `mesh` as the abstract mesh in context (`jax.sharding.use_abstract_mesh`),
  so the ops inside can split per-device work with `vmap_batch_shards`. Wrap a step with it
  before `jax.jit`."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def vmap_batch_shards(fn, in_axes=0):
  """`jax.vmap(fn, in_axes)` (in_axes: 0 or None per argument), run per device.

  Under a mesh in context (`traced_in_mesh`) that splits the batch, and when the mapped
  arguments' leading axis divides by that split, the vmap runs inside `jax.shard_map`: mapped
  arguments split over BATCH_AXES, unmapped ones (in_axes None) replicated; otherwise it is
  plainly `jax.vmap(fn, in_axes)`. fn must not close over traced arrays (pass them unmapped).
  What it buys: a data-dependent loop in fn (NMS's `lax.while_loop`s), vmapped, iterates while
  "any row is still running"; over a sharded batch that predicate is an all-reduce per
  iteration, and several such loops started by independent branches of one step deadlock
  XLA:CPU's simulated devices (each waits in a different rendezvous). Per device, each loop
  only waits for its own rows and needs no collective at all.
  """
  batched = jax.vmap(fn, in_axes=in_axes)

  @functools.wraps(fn)
  def run(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return batched(*args)
    axes_in = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    rows = {jnp.shape(x)[0] for a, ax in zip(args, axes_in) if ax is not None
            for x in jax.tree.leaves(a)}
    ways = batch_divisor(mesh)
    if ways == 1 or len(rows) != 1 or rows.pop() % ways:
      return batched(*args)
    split = batch_spec(mesh)
    specs = tuple(P() if ax is None else split for ax in axes_in)
    return jax.shard_map(batched, mesh=mesh, in_specs=specs, out_specs=split,
                         check_vma=False)(*args)
  return run


def global_batch(local_tree, mesh: Mesh):
  """This process's rows -> global jax.Arrays split over the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_tree)


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array (in global row order), as numpy: the
  rows its own input batch held. Replicated copies of a row block (e.g. over 'tensor') count once."""
  if x.is_fully_addressable:
    return np.asarray(x)
  blocks = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])
