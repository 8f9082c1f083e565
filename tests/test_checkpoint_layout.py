"""The checkpoint layout across the change of state handler (`manager.state_handler`, no
replica-parallel slicing on one host): a checkpoint written by Orbax's StandardSave, as every
workdir before it was, restores through `Checkpointer.restore` bit for bit, and one written now
reads back through Orbax's StandardCheckpointer (what `read_checkpoint` and users' scripts use)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtp_jax.checkpoints import manager


def replicated_state():
  """A small state replicated over the 8 devices (as data parallel leaves it), and its abstract twin."""
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P())
  rng = np.random.default_rng(0)
  tree = {"step": jnp.int32(4), "params": {"kernel": rng.standard_normal((8, 16)).astype(np.float32),
                                           "bias": rng.standard_normal(16).astype(np.float32)},
          "mu": {"kernel": np.zeros((8, 16), np.float32), "bias": np.ones(16, jnp.bfloat16)}}
  state = jax.device_put(tree, sharding)
  return state, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


SIGNATURE = {"encoder": "test", "tasks": ["ss"], "param_shapes": {}}


def test_a_standardsave_checkpoint_restores_and_a_new_one_reads_with_orbax(tmp_path):
  state, abstract = replicated_state()
  old = str(tmp_path / "old")
  legacy = ocp.CheckpointManager(os.path.join(old, "checkpoints"), item_names=("state", "data", "meta"))
  legacy.save(4, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"position": 3}),
      meta=ocp.args.JsonSave({"signature": SIGNATURE, "fingerprint": manager._fingerprint_list(state)})))
  legacy.wait_until_finished()
  legacy.close()
  restored, data, step = manager.Checkpointer(old, keep=3, signature=SIGNATURE, config_json="{}").restore(abstract)
  assert step == 4 and data == {"position": 3}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    assert a.sharding == b.sharding and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  new = str(tmp_path / "new")
  checkpointer = manager.Checkpointer(new, keep=3, signature=SIGNATURE, config_json="{}")
  checkpointer.save(5, state, {"position": 4}, force=True)
  checkpointer.close()
  read = ocp.StandardCheckpointer().restore(os.path.join(new, "checkpoints", "5", "state"), abstract)
  for a, b in zip(jax.tree.leaves(read), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
