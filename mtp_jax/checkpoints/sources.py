"""Where weights come from: any source, read in the official key layout, and a fresh train state
started from it (`model.encoder_init`, `model.full_init`; `initialize` is what a fresh run does).

A source is
- a checkpoint: a training workdir of ours (its latest checkpoint), one of its checkpoint folders
  `<workdir>/checkpoints/<step>`, or a folder written by `python -m mtp_jax.import_torch` (a
  standard checkpoint of step 0 holding the encoder); read by `manager.read_checkpoint`, so its
  fingerprint is checked;
- a PyTorch file, `.pth` or `.safetensors`: an official, MAE or exported encoder, or a whole
  official (or exported) pretraining model.

`encoder_state_dict` / `model_state_dict` give any source's official encoder / full-model keys
(`torch_convert`, `full_model`). Encoder initialisation goes through the same loading as the
original's (MTP_SPEC §3.5, §5.1): wrappers and `module.`/`encoder.` prefixes removed, pos_embed
(without MAE's cls token) and global rel-pos tables resized to the image size, then loaded
non-strictly: keys the encoder lacks are dropped and encoder parameters the source lacks (the
RVSA offsets and window tables, for an MAE file) keep their fresh initialisation; the global
blocks' relative-position tables are dropped this way for the detection finetunes' encoders,
which have none (as the original's). Both lists are printed, and a source that fits no parameter
at all is an error rather than a silent no-op. Full-model initialisation is strict by default
(`full_model.state_dict_to_model`).
"""

import os

import jax
import numpy as np
from flax import nnx

from mtp_jax.checkpoints import full_model
from mtp_jax.checkpoints import torch_convert as tc
from mtp_jax.checkpoints.manager import read_checkpoint
from mtp_jax.errors import CheckpointError


# ----------------------------------------------------------------------------------------------
# Any source -> official keys
# ----------------------------------------------------------------------------------------------
def is_checkpoint(path: str) -> bool:
  """A folder is read as a checkpoint (a workdir, an import folder or one checkpoint folder;
  `manager.checkpoint_location` says what is wrong with any other); a file as a PyTorch file."""
  return os.path.isdir(path)


def _file(path: str, step: int | None) -> str:
  if not os.path.isfile(path):
    raise CheckpointError(f"{path!r} is neither a folder (a training workdir, an import_torch "
                          "folder) nor a checkpoint file (.pth, .safetensors)")
  if step is not None:
    raise CheckpointError(f"{path!r} is a file: it has no checkpoint of step {step}")
  return path


def encoder_state_dict(path: str, step: int | None = None, *,
                       trust_pickle: bool = False) -> tuple[dict, int | None]:
  """({official encoder key: numpy array}, step) of any source (step None for a file; a
  full-model file gives its `encoder.*` / `backbone.*` keys, prefix removed)."""
  if is_checkpoint(path):
    params, _, _, step = read_checkpoint(path, step)
    if "encoder" not in params:
      raise CheckpointError(f"the checkpoint {path!r} at step {step} has no encoder parameters")
    return tc.encoder_to_state_dict(params["encoder"]), step
  return tc.read_encoder_state_dict(_file(path, step), trust_pickle), None


def model_state_dict(path: str, step: int | None = None, *,
                     trust_pickle: bool = False) -> tuple[dict, int | None]:
  """({official full-model key: numpy array}, step) of any source. A checkpoint's model is
  converted (`full_model.model_to_state_dict`): k = 1, 2, 3 of the per-dataset predictors follow
  its `data.subsets` (saved in the checkpoint), and each BatchNorm's unused num_batches_tracked is
  step x subsets, what MTP's per-subset decoder calls count. A file's keys are kept as they are
  (`state_dict`/`model` unwrapped, `module.` stripped)."""
  if not is_checkpoint(path):
    return full_model.read_full_checkpoint(_file(path, step), trust_pickle), None
  params, batch_stats, meta, step = read_checkpoint(path, step)
  subsets = tuple(meta.get("signature", {}).get("subsets") or ())
  if not subsets and params.get("heads"):
    raise CheckpointError(f"the checkpoint at step {step} does not name its subsets")
  tree = full_model.model_state_tree(params, batch_stats)
  return full_model.model_to_state_dict(tree, subsets, num_batches_tracked=step * len(subsets)), step


# ----------------------------------------------------------------------------------------------
# A fresh train state from a source
# ----------------------------------------------------------------------------------------------
def initialize(state, config, tasks):
  """The state a fresh run starts from: `state` (the trainer's initialisation) with
  `model.encoder_init` (encoder only), then `model.full_init` (encoder and the heads of `tasks`,
  official full-model names) loaded when they name a source."""
  patch_size = config.model.encoder_overrides.get("patch_size", 16)
  if config.model.encoder_init:
    params, _ = initialize_encoder(state.params, config.model.encoder_init, config.data.image_size,
                                   patch_size, tuple(config.model.rgb_bands))
    state = state.replace(params=params)
  if config.model.full_init:
    params, stats, _ = initialize_model(
        state.params, state.batch_stats, config.model.full_init, tuple(config.data.subsets),
        tasks=tuple(tasks), image_size=config.data.image_size, patch_size=patch_size,
        trust_pickle=config.model.full_init_trust_pickle)
    state = state.replace(params=params, batch_stats=stats)
  return state


def _replace(current, new: np.ndarray):
  """`new` as an array in the sharding of `current` (sharded and multi-host states alike)."""
  new = np.asarray(new).astype(current.dtype)
  return jax.make_array_from_callback(current.shape, current.sharding, lambda index: new[index])


def read_encoder_source(path: str, template: dict, image_size: int, patch_size: int,
                        rgb_bands=()) -> tuple[dict, dict]:
  """(nested encoder params converted from `path`, shaped like `template`, report); parameters
  the source lacks are listed in report['missing'] (their entries in the result are meaningless).
  An RGB source for a model of more bands has its patch embedding adapted
  (`torch_convert.adapt_input_bands`, with rgb_bands); report['bands'] names the rule."""
  sd, _ = encoder_state_dict(path)
  sd = tc.adapt_to_image_size(sd, image_size, patch_size)
  sd, bands_rule = tc.adapt_input_bands(sd, _in_chans(template), rgb_bands)
  loaded, report = tc.state_dict_to_encoder(sd, template, strict=False)
  report["bands"] = bands_rule
  if report["loaded"] == 0:
    raise CheckpointError(f"model.encoder_init {path!r}: none of its {len(sd)} tensors fits the "
                          f"encoder (e.g. {sorted(sd)[:3]})")
  return loaded, report


def _in_chans(template: dict) -> int:
  """The encoder's input bands: the input dimension of its first convolution (official layout
  (D, C, kh, kw), the key from torch_convert.INPUT_CONV_KEYS)."""
  shapes = tc.state_dict_shapes(template)
  return int(shapes[tc.input_conv_key(shapes)][1])


def _listed(names: list) -> str:
  return f" ({', '.join(names[:6])}{' ...' if len(names) > 6 else ''})" if names else ""


def initialize_encoder(params, path: str, image_size: int, patch_size: int = 16, rgb_bands=()):
  """`params` (nnx.State with params['encoder']) with the encoder's tensors replaced from the
  source `path` (any source, see the module docstring).

  Every process reads the source; each new array is assembled in the sharding of the one it
  replaces, so this works for sharded and multi-host states. Prints what was loaded and missed.
  """
  pure = nnx.to_pure_dict(params)
  encoder = pure["encoder"]
  template = jax.tree.map(lambda a: np.broadcast_to(np.float32(0), a.shape), encoder)
  loaded, report = read_encoder_source(path, template, image_size, patch_size, rgb_bands)
  loaded, missing = dict(tc.flatten_params(loaded)), set(report["missing"])
  flat = {p: v if tc.torch_key(p) in missing else _replace(v, loaded[p])
          for p, v in tc.flatten_params(encoder)}
  pure["encoder"] = tc.nest_params(flat)
  nnx.replace_by_pure_dict(params, pure)
  print(f"encoder initialised from {path}: {report['loaded']} tensors loaded; "
        f"{len(report['missing'])} encoder parameters kept their initialisation"
        + _listed(report["missing"])
        + f"; {len(report['unexpected'])} checkpoint keys unused" + _listed(report["unexpected"])
        + (f"; patch embedding: {report['bands']}" if report["bands"] else ""), flush=True)
  return params, report


def initialize_model(params, batch_stats, path: str, subsets, *, tasks=None, strict: bool = True,
                     image_size: int | None = None, patch_size: int = 16, trust_pickle: bool = False):
  """(params, batch_stats, report): the nnx.States of a fresh train state with every tensor the
  source `path` supplies in the official full-model layout replaced (an official or exported
  full `.pth`/`.safetensors`, or a checkpoint of ours; each new array in the sharding of the one
  it replaces, so sharded and multi-host states work). image_size: resize the encoder's pos_embed
  and global rel-pos tables to it (MTP_SPEC §5.1) when the source was trained at another."""
  pure_p, pure_b = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
  current = full_model.model_state_tree(pure_p, pure_b)
  template = jax.tree.map(lambda a: np.broadcast_to(np.zeros((), a.dtype), a.shape), current)
  sd, _ = model_state_dict(path, trust_pickle=trust_pickle)
  if image_size is not None:
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
    sd.update({"encoder." + k: v for k, v in tc.adapt_to_image_size(enc, image_size, patch_size).items()})
  tree, report, loaded_paths = full_model.convert_to_model(sd, template, subsets, strict, tasks)
  flat_new = dict(tc.flatten_params(tree))
  merged = tc.nest_params({p: _replace(v, flat_new[tuple(p)]) if tuple(p) in loaded_paths else v
                           for p, v in tc.flatten_params(current)})
  nnx.replace_by_pure_dict(params, full_model.split_like(merged, pure_p))
  nnx.replace_by_pure_dict(batch_stats, full_model.split_like(merged, pure_b))
  print(f"model initialised from {path}: {report['loaded']} tensors loaded; "
        f"{len(report['missing'])} missing, {len(report['unexpected'])} unexpected, "
        f"{len(report['kept'])} kept (tasks not loaded), {len(report['dropped_unused'])} unused "
        f"official tensors dropped", flush=True)
  return params, batch_stats, report
