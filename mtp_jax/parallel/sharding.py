"""Mesh construction and the mapping from logical parameter axes to mesh axes.

Parameters carry logical axis names (mtp_jax/models/layers.py); `config.sharding_rules` maps each
to a mesh axis or None. The batch is split over ('data', 'fsdp'). Meshes are built with
`jax.sharding.Mesh` and Auto axis types (jax.make_mesh would default to Explicit axes).
"""

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtp_jax.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


def make_mesh(shape, axis_names, devices=None) -> Mesh:
  """Mesh of `shape` over `devices` (default all); one entry of `shape` may be -1."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(axis_names):
    raise ConfigError(f"mesh.shape {tuple(shape)} and mesh.axes {tuple(axis_names)} differ in length")
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


def logical_to_mesh(spec: P, rules, mesh: Mesh) -> P:
  """PartitionSpec of logical names -> PartitionSpec of mesh axes (absent axes -> replicated)."""
  table = dict(rules)
  out = []
  for name in spec:
    axis = table.get(name) if name is not None else None
    out.append(axis if axis in mesh.axis_names and mesh.shape[axis] > 1 else None)
  return P(*out)


def tree_shardings(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a pytree of nnx Variables (logical names) and plain leaves (replicated)."""
  specs = nnx.get_partition_spec(abstract_tree)
  shard = lambda spec: NamedSharding(mesh, logical_to_mesh(spec, rules, mesh) if isinstance(spec, P) else P())
  return jax.tree.map(shard, specs, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes))


def batch_divisor(mesh: Mesh) -> int:
  """How many ways the batch dimension is split."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def global_batch(local_tree, mesh: Mesh):
  """This process's rows -> global jax.Arrays split over the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_tree)
