"""Orbax CheckpointManager wrapper: `<workdir>/checkpoints/<step>/{state,data,meta}`.

- state: the TrainState (sharded arrays; restored into the current shardings),
- data:  the grain iterator state (JSON), so a resumed run sees the batches it would have seen,
- meta:  the model signature (encoder, sizes, subsets, every parameter shape) and the config.

Restoring into a different model stops with a CheckpointError that lists what differs, instead of
an Orbax shape error from deep inside the restore.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtp_jax.errors import CheckpointError


def model_signature(config, params) -> dict:
  """What must match for a checkpoint to belong to this model."""
  shapes = {"/".join(str(getattr(k, "key", k)) for k in path): list(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  return {
      "encoder": config.model.encoder,
      "encoder_overrides": {k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in config.model.encoder_overrides.items()},
      "image_size": config.data.image_size,
      "subsets": list(config.data.subsets),
      "tasks": list(config.tasks),
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


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int, signature: dict, config_json: str):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.signature = signature
    self.config_json = config_json
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=True),
        item_names=("state", "data", "meta"))

  def latest_step(self):
    return self.manager.latest_step()

  def restore(self, abstract_state):
    """Returns (state, data_state, step) of the latest checkpoint, or None if there is none."""
    step = self.manager.latest_step()
    if step is None:
      return None
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
      raise CheckpointError(f"checkpoint {self.directory}/{step} has unreadable metadata ({e})") from None
    diffs = _differences(meta.get("signature", {}), self.signature)
    if diffs:
      raise CheckpointError(
          f"{self.directory} holds a checkpoint (step {step}) of a different model:\n  - "
          + "\n  - ".join(diffs) + "\nUse a new --workdir, or the config that wrote it.")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored.state, restored.data, step

  def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
    meta = {"signature": self.signature, "config": self.config_json}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
