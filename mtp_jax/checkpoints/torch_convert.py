"""Encoder parameters <-> PyTorch `state_dict` with the official MTP key names (MTP_SPEC §1.6).

A JAX parameter path joins into the official key; `kernel`/`scale` become `weight`:
  Linear kernel (in, out)            <-> weight (out, in)
  Conv kernel (kh, kw, in, out)      <-> weight (out, in, kh, kw)
  fpn ConvTranspose (2, 2, in, out)  <-> weight (in, out, 2, 2)
The RVSA buffers `relative_position_index` are written on export and checked on import.

Works on plain nested dicts of numpy arrays ({'blocks': {'0': {...}}}), the form of
`nnx.to_pure_dict(state)` and of an Orbax restore without a target. Reading `.pth` needs torch
(the `torch` extra); `.safetensors` needs the safetensors package.
"""

import os

import numpy as np

from mtp_jax.errors import CheckpointError
from mtp_jax.checkpoints.resize import bicubic_resize
from mtp_jax.models.rel_pos import window_bias_index

_RENAME = {"kernel": "weight", "scale": "weight"}


def _is_conv_transpose(key: str) -> bool:
  return key.startswith(("fpn1.0.", "fpn1.3.", "fpn2.0."))


def to_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
  if value.ndim == 2 and key.endswith(".weight") and not key.endswith("bias_table"):
    return value.T
  if value.ndim == 4 and key.endswith(".weight"):
    return value.transpose(2, 3, 0, 1) if _is_conv_transpose(key) else value.transpose(3, 2, 0, 1)
  return value


def from_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
  if value.ndim == 2 and key.endswith(".weight"):
    return value.T
  if value.ndim == 4 and key.endswith(".weight"):
    return value.transpose(2, 3, 0, 1) if _is_conv_transpose(key) else value.transpose(2, 3, 1, 0)
  return value


def flatten_params(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from flatten_params(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def torch_key(path) -> str:
  *head, last = [str(p) for p in path]
  return ".".join(head + [_RENAME.get(last, last)]) if head else last


def encoder_to_state_dict(params: dict, copy: bool = True) -> dict[str, np.ndarray]:
  """Nested encoder params (numpy or jax leaves) -> {official key: numpy array}."""
  out = {}
  for path, value in flatten_params(params):
    key = torch_key(path)
    value = to_torch_layout(key, np.asarray(value))
    out[key] = np.ascontiguousarray(value) if copy else value
    if key.endswith("attn.relative_position_bias_table"):
      ws = int(round((np.sqrt(value.shape[0]) + 1) / 2))
      out[key.replace("relative_position_bias_table", "relative_position_index")] = window_bias_index(ws)
  return out


def state_dict_shapes(params: dict) -> dict[str, tuple]:
  """{official key: PyTorch shape} of nested params (arrays or ShapeDtypeStructs); no copies."""
  zeros = nest_params({p: np.broadcast_to(np.float32(0), np.shape(v)) for p, v in flatten_params(params)})
  return {k: tuple(v.shape) for k, v in encoder_to_state_dict(zeros, copy=False).items()}


def nest_params(flat: dict) -> dict:
  out = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def state_dict_to_encoder(state_dict: dict, template: dict, strict: bool = True):
  """{official key: array} -> nested params shaped like `template` (the initialised encoder's
  params, `nnx.to_pure_dict(nnx.state(encoder, nnx.Param))`); keys the checkpoint lacks keep
  the template's values (only allowed with strict=False).

  Returns (params, report) with report = {'missing': [...], 'unexpected': [...], 'loaded': n}.
  Raises CheckpointError on a shape mismatch, a wrong buffer, or (strict) any missing or
  unexpected key, naming the keys.
  """
  expected = {torch_key(p): (p, v) for p, v in flatten_params(template)}
  buffers = {k for k in state_dict if k.endswith("relative_position_index")}
  unexpected = sorted(set(state_dict) - set(expected) - buffers)
  missing = sorted(set(expected) - set(state_dict))
  bad_shapes, bad_buffers = [], []
  for k in sorted(buffers):
    table = k.replace("relative_position_index", "relative_position_bias_table")
    if table not in expected:
      unexpected.append(k)
    elif not np.array_equal(np.asarray(state_dict[k]), window_bias_index(int(np.sqrt(np.shape(state_dict[k])[0])))):
      bad_buffers.append(k)
  flat, loaded = {}, 0
  for key, (path, ref) in expected.items():
    if key not in state_dict:
      value = np.asarray(ref)
    else:
      value = from_torch_layout(key, np.asarray(state_dict[key]))
      if tuple(value.shape) != tuple(np.shape(ref)):
        want = to_torch_layout(key, np.broadcast_to(np.float32(0), np.shape(ref))).shape
        bad_shapes.append(f"{key}: checkpoint {tuple(np.shape(state_dict[key]))}, model expects {tuple(want)}")
        continue
      value = value.astype(np.float32)
      loaded += 1
    flat[path] = value
  params = nest_params(flat)
  problems = []
  if bad_shapes:
    problems.append("shape mismatch: " + "; ".join(bad_shapes[:8])
                    + (f" ... ({len(bad_shapes)} keys in all)" if len(bad_shapes) > 8 else ""))
  if bad_buffers:
    problems.append(f"relative_position_index differs from the 7x7 window index: {bad_buffers[:4]}")
  if strict and missing:
    problems.append(f"missing keys: {missing[:8]}" + (f" ... ({len(missing)} in all)" if len(missing) > 8 else ""))
  if strict and unexpected:
    problems.append(f"unexpected keys: {unexpected[:8]}" + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 8 else ""))
  if problems:
    raise CheckpointError("checkpoint does not fit the encoder: " + " | ".join(problems))
  return params, {"missing": missing, "unexpected": unexpected, "loaded": loaded}


# ----------------------------------------------------------------------------------------------
# Official checkpoint files
# ----------------------------------------------------------------------------------------------
def read_state_dict(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads `.pth`/`.pt`/`.bin` (torch) or `.safetensors` as {key: numpy}; unwraps
  `state_dict`/`model` and strips `module.`; every key kept."""
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint file {path!r} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      sd = load_file(path)
    except Exception as e:
      raise CheckpointError(f"{path!r} is not a readable safetensors file ({e})") from None
  else:
    import torch
    try:
      obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
      hint = "" if trust_pickle else " (if it is a checkpoint you trust that holds other Python objects, pass --trust-pickle)"
      raise CheckpointError(f"{path!r} is not a readable PyTorch checkpoint: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}{hint}") from None
    for wrapper in ("state_dict", "model"):
      if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
        obj = obj[wrapper]
        break
    if not isinstance(obj, dict) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
      raise CheckpointError(f"{path!r} holds no state_dict (a dict of tensors, possibly under "
                            f"'state_dict' or 'model')")
    sd = {k: v.detach().cpu().numpy() for k, v in obj.items()}
  return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def read_encoder_state_dict(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """`read_state_dict`, keeping only `encoder.*` or `backbone.*` of full-model checkpoints
  (prefix removed)."""
  sd = read_state_dict(path, trust_pickle)
  for prefix in ("encoder.", "backbone."):
    if any(k.startswith(prefix) for k in sd):
      sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
      break
  return sd

# The global blocks' decomposed relative-position tables (ViT+RVSA); the original's detection
# backbones have none (models/vit.py, global_rel_pos).
GLOBAL_REL_POS_KEYS = ("full_attn_rel_pos_h", "full_attn_rel_pos_w")


def adapt_to_image_size(sd: dict, img_size: int, patch_size: int = 16) -> dict:
  """MTP's finetune loading (MTP_SPEC §5.1): drop the MAE cls entry of pos_embed, resize pos_embed
  and every `full_attn_rel_pos_{h,w}` bicubically (PyTorch's align_corners=False, in numpy:
  `mtp_jax.checkpoints.resize`) to the new grid. Tables already of the new size are untouched."""
  sd = dict(sd)
  grid = img_size // patch_size
  if "pos_embed" in sd:
    pe = np.asarray(sd["pos_embed"], np.float32)
    extra = 1 if "cls_token" in sd else 0
    pe = pe[:, extra:]
    old = int(round(np.sqrt(pe.shape[1])))
    if old * old != pe.shape[1]:
      raise CheckpointError(f"pos_embed of {pe.shape[1]} tokens is not a square grid")
    if old != grid:
      pe = bicubic_resize(pe[0].reshape(old, old, -1), (grid, grid)).reshape(1, grid * grid, -1)
    sd["pos_embed"] = pe
  sd.pop("cls_token", None)
  for k in [k for k in sd if k.endswith(GLOBAL_REL_POS_KEYS)]:
    r = np.asarray(sd[k], np.float32)
    if r.shape[0] != 2 * grid - 1:
      sd[k] = bicubic_resize(r, (2 * grid - 1, r.shape[1]))
  return sd


# The encoders' first layers, the only ones that see the input bands: ViT's patch embedding and
# InternImage's first stem convolution.
INPUT_CONV_KEYS = ("patch_embed.proj.weight", "patch_embed.conv1.weight")


def input_conv_key(sd: dict) -> str | None:
  """The key of the encoder's first (band-reading) convolution in state dict `sd`, if any."""
  return next((k for k in INPUT_CONV_KEYS if k in sd), None)


def adapt_input_bands(sd: dict, in_chans: int, rgb_bands=()) -> tuple[dict, str]:
  """(sd with the first convolution's weight (ViT's `patch_embed.proj.weight` (D, 3, p, p),
  InternImage's `patch_embed.conv1.weight` (C/2, 3, 3, 3)) turned into (D, in_chans, ...), the
  rule used) for a multispectral model started from an RGB checkpoint:

    rgb_bands (r, g, b) given: the RGB kernels go to those input bands, every other band's kernel
        is 0, so the first layer answers the image's RGB bands exactly as the checkpoint did;
    rgb_bands empty: timm's `adapt_input_conv`, the RGB kernels repeated over the bands
        (band i gets kernel i mod 3) and scaled by 3 / in_chans.

  A checkpoint already of `in_chans` bands is returned unchanged (rule ''); one of another count
  than 3 is refused."""
  key = input_conv_key(sd)
  if key is None or np.shape(sd[key])[1] == in_chans:
    return sd, ""
  w = np.asarray(sd[key], np.float32)
  if w.shape[1] != 3:
    raise CheckpointError(f"{key} has {w.shape[1]} input bands and the model "
                          f"{in_chans}: only an RGB checkpoint (3) can be adapted")
  sd = dict(sd)
  if rgb_bands:
    rgb_bands = tuple(int(b) for b in rgb_bands)
    if len(rgb_bands) != 3 or len(set(rgb_bands)) != 3 or not all(0 <= b < in_chans for b in rgb_bands):
      raise CheckpointError(f"model.rgb_bands {rgb_bands} must be 3 different band indices in [0, {in_chans})")
    out = np.zeros((w.shape[0], in_chans, *w.shape[2:]), np.float32)
    out[:, list(rgb_bands)] = w
    sd[key] = out
    return sd, f"RGB kernels on input bands {rgb_bands}, zero elsewhere"
  sd[key] = w[:, [i % 3 for i in range(in_chans)]] * (3.0 / in_chans)
  return sd, f"RGB kernels repeated over {in_chans} bands, scaled by 3/{in_chans} (timm)"


def infer_image_size(sd: dict, patch_size: int = 16) -> int | None:
  """Pretraining image size from pos_embed (sqrt N) or full_attn_rel_pos_h (2 Hp - 1)."""
  if "pos_embed" in sd:
    n = sd["pos_embed"].shape[1] - (1 if "cls_token" in sd else 0)
    return int(round(np.sqrt(n))) * patch_size
  for k, v in sd.items():
    if k.endswith("full_attn_rel_pos_h"):
      return (v.shape[0] + 1) // 2 * patch_size
  return None


def write_state_dict(sd: dict, path: str):
  """Writes `.safetensors` (safetensors) or `.pth` (torch.save of tensors)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in sd.items()}, path)
  else:
    import torch
    torch.save({k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}, path)
