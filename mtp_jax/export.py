"""Export the encoder of a training run to a PyTorch state_dict with the official MTP key names.

    python -m mtp_jax.export --workdir workdirs/quickstart --out encoder.pth [--step N]
    python -m mtp_jax.export --workdir DIR --out encoder.safetensors

`.pth` files load with `model.load_state_dict(torch.load(path), strict=True)` into a module of the
same architecture (for the RVSA encoders: `mtp_jax.torch_twin.vit_rvsa.build_twin`, or the
official `ViT_Win_RVSA_V3_WSZ7`). `.pth` needs torch, `.safetensors` the safetensors package.
"""

import argparse
import os
import sys

from mtp_jax.errors import CheckpointError


def restore_params(workdir: str, step: int | None = None):
  """(nested params of the run's model, step) from `<workdir>/checkpoints`, latest by default."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  root = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
  if not steps:
    raise CheckpointError(f"{workdir!r} holds no checkpoint (looked for {root}/<step>)")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise CheckpointError(f"{workdir!r} has no checkpoint at step {step}; it has {steps}")
  path = os.path.join(root, str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  # Restore onto this process's first device whatever mesh wrote it (no topology needed).
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata)
  state = checkpointer.restore(path, target)
  return _unwrap_variables(jax.tree.map(np.asarray, state["params"])), step


def _unwrap_variables(tree):
  """nnx.State saves each Variable as {'value': array}; return plain nested arrays."""
  if isinstance(tree, dict):
    if set(tree) == {"value"} and not isinstance(tree["value"], dict):
      return tree["value"]
    return {k: _unwrap_variables(v) for k, v in tree.items()}
  return tree


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True, help="FILE.pth or FILE.safetensors")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  args = parser.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # Orbax warns about metadata files it does not need here
  from mtp_jax.checkpoints import torch_convert
  try:
    if not args.out.endswith((".pth", ".pt", ".safetensors")):
      raise CheckpointError(f"--out {args.out!r} must end in .pth, .pt or .safetensors")
    params, step = restore_params(args.workdir, args.step)
    if "encoder" not in params:
      raise CheckpointError(f"the checkpoint at step {step} has no encoder parameters")
    sd = torch_convert.encoder_to_state_dict(params["encoder"])
    torch_convert.write_state_dict(sd, args.out)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {len(sd)} encoder tensors of step {step} to {args.out}")


if __name__ == "__main__":
  main()
