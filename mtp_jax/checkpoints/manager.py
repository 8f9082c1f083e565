"""Orbax CheckpointManager wrapper: `<workdir>/checkpoints/<step>/{state,data,meta}`.

- state: the TrainState (sharded arrays; restored into the current shardings),
- data:  the grain iterator state (JSON), so a resumed run sees the batches it would have seen,
- meta:  the model signature (encoder, sizes, subsets, every parameter shape), the config, and a
         fingerprint of the state (`fingerprint`) that restore checks.

Restoring into a different model stops with a CheckpointError that lists what differs, instead of
an Orbax shape error from deep inside the restore.

One read path (`_read_json`, `_read_state`: the item's handler, then the fingerprint check), two
ways in: `Checkpointer.restore` puts a run's own state back into its shardings (training, resume,
`--mode eval`); `read_checkpoint` reads any checkpoint's parameters onto one device without
knowing its model (export, prediction, starting a run from it: `checkpoints/sources.py`). A folder
written by `python -m mtp_jax.import_torch` is such a checkpoint (step 0, encoder only).
"""

import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mtp_jax.tasks import enabled as enabled_tasks
from mtp_jax.errors import CheckpointError
from mtp_jax.parallel import distributed


def model_signature(config, params) -> dict:
  """What must match for a checkpoint to belong to this model."""
  return signature(config.model.encoder, config.model.encoder_overrides, config.data.image_size,
                   config.data.subsets, enabled_tasks(config), params)


def signature(encoder: str, encoder_overrides, image_size: int, subsets, tasks, params) -> dict:
  """The signature of a model built from these settings, with parameters `params` (nested)."""
  shapes = {"/".join(str(getattr(k, "key", k)) for k in path): list(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  return {
      "encoder": encoder,
      "encoder_overrides": {k: (list(v) if isinstance(v, tuple) else v) for k, v in encoder_overrides.items()},
      "image_size": image_size,
      "subsets": list(subsets),
      "tasks": list(tasks),
      "param_shapes": shapes,
  }


def _differences(saved: dict, current: dict) -> list[str]:
  diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {current[k]!r}"
           for k in current if k != "param_shapes" and saved.get(k) != current[k]]
  a, b = saved.get("param_shapes", {}), current["param_shapes"]
  missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
  shape = sorted(k for k in set(a) & set(b) if a[k] != b[k])
  if missing:
    diffs.append(f"parameters missing from the checkpoint: {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
  if extra:
    diffs.append(f"parameters only in the checkpoint: {extra[:5]}" + (" ..." if len(extra) > 5 else ""))
  for k in shape[:5]:
    diffs.append(f"{k}: checkpoint shape {a[k]}, model shape {b[k]}")
  return diffs


def _as_uint32(x):
  """Bits of `x` as uint32 of the same shape (8-byte types folded, narrower ones widened)."""
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 8:
    pair = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return pair[..., 0] ^ (pair[..., 1] * jnp.uint32(0x9E3779B1))
  narrow = {2: jnp.uint16, 1: jnp.uint8}[size]
  return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


@jax.jit
def fingerprint(tree) -> list:
  """One uint32 per leaf: sum over elements of bits x odd position weight, modulo 2^32.

  Integer sums are exact and order-free, so the value does not depend on how a leaf is sharded;
  a changed element changes it (a flipped bit in a compressed chunk that Orbax reads back
  without complaint does, too).
  """
  def one(x):
    bits = _as_uint32(jnp.asarray(x))
    position = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
      position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
      stride *= bits.shape[axis]
    weights = position * jnp.uint32(2654435761) + jnp.uint32(1) | jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)
  return [one(x) for x in jax.tree.leaves(tree)]


def state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's PyTree handler (the layout StandardSave writes) whose jax.Array handler writes each
  array once from its first replica on a single host.

  Orbax's default on CPU and TPU ("replica parallel") splits every replicated array into one
  slice per replica, an eager dispatch per slice, so that several hosts share the writing: on one
  host it buys nothing and cost 3.8 s of a 5.7 s save of the tests' 2-block ViT on 8 CPU devices
  (2300 slices; `benchmarks/README.md`). With several processes Orbax's default is kept.
  """
  # Orbax's defaults, but for jax.Array (the array metadata store keeps typed PRNG keys' dtype).
  from orbax.checkpoint._src.metadata import array_metadata_store  # no public path in 0.12
  arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1,
                                          array_metadata_store=array_metadata_store.Store())
  scalar = ocp.type_handlers.ScalarHandler()
  registry = ocp.type_handlers.create_type_handler_registry(
      (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
      (np.ndarray, ocp.type_handlers.NumpyHandler()), (jax.Array, arrays),
      (str, ocp.type_handlers.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _fingerprint_list(tree) -> list[int]:
  return [int(v) for v in jax.device_get(fingerprint(tree))]


class Checkpointer:
  """Saves and restores `<workdir>/checkpoints/<step>` (see the module docstring).

  keep: the last N checkpoints are kept; keep_every > 0 also keeps every multiple of it. Saves
  are asynchronous; every process calls save and restore at the same steps (Orbax synchronises).
  """

  def __init__(self, workdir: str, *, keep: int, signature: dict, config_json: str, keep_every: int = 0,
               read_only: bool = False):
    """read_only (evaluation): never saves, deletes or moves anything in the workdir, so it can
    run beside a training job that is writing there; a damaged checkpoint is skipped, not moved."""
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.quarantine = os.path.abspath(os.path.join(workdir, "checkpoints.corrupt"))
    self.signature = signature
    self.config_json = config_json
    self.read_only = read_only
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                             keep_period=keep_every or None,
                                             save_interval_steps=0 if read_only else 1,
                                             enable_async_checkpointing=not read_only,
                                             create=not read_only, read_only=read_only,
                                             cleanup_tmp_directories=not read_only),
        item_handlers={"state": state_handler(), "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state, step: int | None = None):
    """Returns (state, data_state, step) of the newest good checkpoint, or None if there is none.

    A checkpoint that cannot be read or whose restored state does not match the fingerprint saved
    with it is moved to `<workdir>/checkpoints.corrupt/` with a warning (read_only: left in place),
    and the one before it is tried. A checkpoint of a different model stops with a CheckpointError
    instead. `step`: restore exactly that checkpoint (CheckpointError if missing or damaged).
    """
    candidates = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      if step not in candidates:
        raise CheckpointError(f"{self.directory} has no checkpoint of step {step}; it has "
                              f"{sorted(candidates) or 'none'}")
      candidates = [step]
    named = step is not None
    for step in candidates:
      where = os.path.join(self.directory, str(step))
      try:
        meta = _read_json(where, "meta")
        failure = None
      except Exception as e:  # noqa: BLE001 (any unreadable metadata means a damaged checkpoint)
        meta, failure = None, f"unreadable metadata ({type(e).__name__}: {str(e)[:200]})"
      if meta is not None:
        diffs = _differences(meta.get("signature", {}), self.signature)
        if diffs:
          raise CheckpointError(
              f"{self.directory} holds a checkpoint (step {step}) of a different model:\n  - "
              + "\n  - ".join(diffs) + "\nUse a new --workdir, or the config that wrote it.")
        try:
          state = _read_state(where, jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state),
                              meta, ordered=True)
          data = _read_json(where, "data")
        except _Damaged as e:
          failure = str(e)
        except Exception as e:  # noqa: BLE001 (a missing or unreadable data item)
          failure = f"unreadable data state ({type(e).__name__}: {str(e)[:200]})"
      if not distributed.any_process(failure is not None):
        return state, data, step
      failure = failure or "unreadable on another process"
      if named:
        raise CheckpointError(f"checkpoint {self.directory}/{step} is damaged: {failure}")
      self._set_aside(step, failure)
    return None

  def _set_aside(self, step: int, why: str):
    """Moves a damaged checkpoint to checkpoints.corrupt/ (read_only: only warns and skips it)."""
    target = os.path.join(self.quarantine, f"{step}-{int(time.time())}")
    where = "It is skipped (left in place)" if self.read_only else f"It was moved to {target}"
    message = (f"WARNING: checkpoint {self.directory}/{step} is damaged: {why}. {where} and the "
               "previous checkpoint is used instead.")
    logging.warning(message)
    print(message, file=sys.stderr, flush=True)
    if self.read_only:
      return
    if jax.process_index() == 0:
      os.makedirs(self.quarantine, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
    self.manager.reload()

  def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
    meta = {"signature": self.signature, "config": self.config_json,
            "fingerprint": _fingerprint_list(state)}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------------------------
# The one read path, and reading any checkpoint's parameters without its model
# ----------------------------------------------------------------------------------------------
class _Damaged(Exception):
  """A checkpoint's state is unreadable or differs from its fingerprint (the text says which)."""


def _read_json(where: str, item: str) -> dict:
  """A JSON item of the checkpoint folder `where`: 'meta' (signature, config, fingerprint) or
  'data' (the data iterators' positions)."""
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(where, item))


def _read_state(where: str, target, meta: dict, ordered: bool):
  """The `state` item of the checkpoint folder `where`, restored as `target` (ShapeDtypeStructs
  with shardings) and checked against the fingerprint saved in `meta`. ordered=False compares the
  per-leaf fingerprints as multisets: a target built from the saved metadata is a dict (leaves in
  key order), not the TrainState the state was saved from (field order). Raises _Damaged."""
  try:
    state = ocp.Checkpointer(state_handler()).restore(
        os.path.join(where, "state"),
        args=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  except Exception as e:  # noqa: BLE001 (truncated or missing array files)
    raise _Damaged(f"unreadable state ({type(e).__name__}: {str(e)[:200]})") from None
  saved, current = meta.get("fingerprint"), _fingerprint_list(state)
  if saved is not None and (saved != current if ordered else sorted(saved) != sorted(current)):
    raise _Damaged("its arrays differ from the fingerprint saved with them")
  return state


def checkpoint_location(path: str, step: int | None = None) -> tuple[str, int]:
  """(checkpoints folder, step) named by `path`: a workdir or an import_torch folder (its latest
  checkpoint, or `step`) or one checkpoint folder `<workdir>/checkpoints/<step>`."""
  path = os.path.abspath(path)
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
    named = int(os.path.basename(path))
    if step is not None and step != named:
      raise CheckpointError(f"{path} is the checkpoint of step {named}, not {step}")
    return os.path.dirname(path), named
  root = os.path.join(path, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
  if not steps and os.path.isdir(os.path.join(path, "encoder")):
    raise CheckpointError(f"{path!r} was written by an older `python -m mtp_jax.import_torch` "
                          "(an `encoder/` folder without a fingerprint): re-run the import with a "
                          "new --out, which writes a standard checkpoint")
  if not steps:
    raise CheckpointError(f"{path!r} holds no checkpoint (looked for {root}/<step>)")
  if step is None:
    return root, steps[-1]
  if step not in steps:
    raise CheckpointError(f"{path!r} has no checkpoint at step {step}; it has {steps}")
  return root, step


def read_checkpoint(path: str, step: int | None = None) -> tuple[dict, dict, dict, int]:
  """(params, batch_stats, meta, step) of a checkpoint as nested numpy arrays, on one device
  whatever mesh wrote it. path: a workdir or an import_torch folder (latest checkpoint, or
  `step`) or a checkpoint folder `<workdir>/checkpoints/<step>`. meta holds the run's `signature`
  (encoder, image size, subsets, tasks) and `config`. A state that does not match its saved
  fingerprint is refused."""
  root, step = checkpoint_location(path, step)
  where = os.path.join(root, str(step))
  try:
    meta = _read_json(where, "meta")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          state_handler().metadata(epath.Path(where) / "state").tree)
    state = _read_state(where, target, meta, ordered=False)
  except _Damaged as e:
    raise CheckpointError(f"checkpoint {where} is damaged: {e}") from None
  except Exception as e:  # noqa: BLE001 (any unreadable file means a damaged checkpoint)
    raise CheckpointError(f"checkpoint {where} is unreadable ({type(e).__name__}: {str(e)[:200]})") from None
  keep = {k: _unwrap_variables(jax.tree.map(np.asarray, state[k])) if k in state else {}
          for k in ("params", "batch_stats")}
  return keep["params"], keep["batch_stats"], meta, step


def _unwrap_variables(tree):
  """nnx.State saves each Variable as {'value': array}; return plain nested arrays."""
  if isinstance(tree, dict):
    if set(tree) == {"value"} and not isinstance(tree["value"], dict):
      return tree["value"]
    return {k: _unwrap_variables(v) for k, v in tree.items()}
  return tree
