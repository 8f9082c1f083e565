"""Initialise the encoder of a fresh run from a pretrained checkpoint (`config.model.encoder_init`).

The source is a training workdir of ours (a pretraining run: its latest checkpoint, or one
checkpoint folder `<workdir>/checkpoints/<step>`; read with `manager.read_checkpoint`), an
official / MAE PyTorch file (`.pth`, `.safetensors`) or a folder written by
`python -m mtp_jax.import_torch`. Every source goes through the same conversion: to the official
state-dict keys, pos_embed and the global rel-pos tables resized to the new image size, back. A PyTorch file goes through the same loading as the original's
(MTP_SPEC §3.5, §5.1): wrappers and `module.`/`encoder.` prefixes removed, pos_embed (without MAE's
cls token) and global rel-pos tables resized to the image size, then loaded non-strictly: keys the
encoder lacks are dropped and encoder parameters the file lacks (the RVSA offsets and window
tables, for an MAE file) keep their fresh initialisation; the global blocks' relative-position
tables are dropped this way for the detection finetunes' encoders, which have none (as the
original's). Both lists are printed, and a file that fits no parameter at all is an error rather
than a silent no-op.
"""

import os

import jax
import numpy as np
from flax import nnx

from mtp_jax.checkpoints import torch_convert
from mtp_jax.checkpoints.manager import read_checkpoint
from mtp_jax.errors import CheckpointError


def is_training_checkpoint(path: str) -> bool:
  """A workdir of ours (holds checkpoints/) or one of its checkpoint folders (holds state/)."""
  return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(os.path.join(path, "state"))


def read_encoder_source(path: str, template: dict, image_size: int, patch_size: int,
                        rgb_bands=()) -> tuple[dict, dict]:
  """(nested encoder params converted from `path`, shaped like `template`, report); parameters
  the source lacks are listed in report['missing'] (their entries in the result are meaningless).
  An RGB source for a model of more bands has its patch embedding adapted
  (`torch_convert.adapt_input_bands`, with rgb_bands); report['bands'] names the rule."""
  if is_training_checkpoint(path):
    params, _, meta, step = read_checkpoint(path)
    if "encoder" not in params:
      raise CheckpointError(f"model.encoder_init {path!r}: the checkpoint of step {step} has no encoder")
    sd = torch_convert.encoder_to_state_dict(params["encoder"])
    sd = torch_convert.adapt_to_image_size(sd, image_size, patch_size)
  elif os.path.isdir(path):
    from mtp_jax.import_torch import load_encoder_params  # noqa: PLC0415
    sd = torch_convert.encoder_to_state_dict(load_encoder_params(path))
    sd = torch_convert.adapt_to_image_size(sd, image_size, patch_size)
  elif os.path.isfile(path):
    sd = torch_convert.read_checkpoint(path)
    sd = torch_convert.adapt_to_image_size(sd, image_size, patch_size)
  else:
    raise CheckpointError(f"model.encoder_init {path!r} is neither a training workdir, a "
                          "checkpoint file nor an import_torch folder")
  sd, bands_rule = torch_convert.adapt_input_bands(sd, _in_chans(template), rgb_bands)
  loaded, report = torch_convert.state_dict_to_encoder(sd, template, strict=False)
  report["bands"] = bands_rule
  if report["loaded"] == 0:
    raise CheckpointError(f"model.encoder_init {path!r}: none of its {len(sd)} tensors fits the "
                          f"encoder (e.g. {sorted(sd)[:3]})")
  return loaded, report


def _in_chans(template: dict) -> int:
  """The encoder's input bands: the input dimension of its first convolution (official layout
  (D, C, kh, kw), the key from torch_convert.INPUT_CONV_KEYS)."""
  shapes = torch_convert.state_dict_shapes(template)
  return int(shapes[torch_convert.input_conv_key(shapes)][1])


def initialize_encoder(params, path: str, image_size: int, patch_size: int = 16, rgb_bands=()):
  """`params` (nnx.State with params['encoder']) with the encoder's tensors replaced from `path`.

  Every process reads the file; each new array is assembled in the sharding of the one it
  replaces, so this works for sharded and multi-host states. Prints what was loaded and missed.
  """
  pure = nnx.to_pure_dict(params)
  encoder = pure["encoder"]
  template = jax.tree.map(lambda a: np.broadcast_to(np.float32(0), a.shape), encoder)
  loaded, report = read_encoder_source(path, template, image_size, patch_size, rgb_bands)
  loaded, missing = dict(torch_convert.flatten_params(loaded)), set(report["missing"])

  def replace(path_keys, current):
    if torch_convert.torch_key(path_keys) in missing:
      return current
    value = loaded[path_keys].astype(current.dtype)
    return jax.make_array_from_callback(current.shape, current.sharding, lambda index: value[index])

  flat = {p: replace(p, v) for p, v in torch_convert.flatten_params(encoder)}
  pure["encoder"] = torch_convert.nest_params(flat)
  nnx.replace_by_pure_dict(params, pure)
  print(f"encoder initialised from {path}: {report['loaded']} tensors loaded; "
        f"{len(report['missing'])} encoder parameters kept their initialisation"
        + (f" ({', '.join(report['missing'][:6])}{' ...' if len(report['missing']) > 6 else ''})"
           if report["missing"] else "")
        + f"; {len(report['unexpected'])} checkpoint keys unused"
        + (f" ({', '.join(report['unexpected'][:6])}{' ...' if len(report['unexpected']) > 6 else ''})"
           if report["unexpected"] else "")
        + (f"; patch embedding: {report['bands']}" if report["bands"] else ""), flush=True)
  return params, report
