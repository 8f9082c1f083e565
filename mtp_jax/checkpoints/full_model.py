"""The whole pretraining model <-> the official MTP full-model `state_dict` (MTP_SPEC §3.6).

The official `Iter_*_pretrn_model.pth` holds `state_dict = MutliTaskPretrnFramework.state_dict()`
(`MTP:Multi-Task_Pretrain/models.py`, saved as `model.module.state_dict()`, so no `module.`):
  encoder.*                                  the encoder (keys of MTP_SPEC §1.6, `torch_convert`)
  semsegdecoder.decode_head.*                mmseg UPerHead: psp_modules.{i}.1.{conv,bn}, bottleneck,
                                             lateral_convs.{i}, fpn_convs.{i}, fpn_bottleneck (each
                                             ConvModule: conv without bias + SyncBN `bn` with
                                             running_mean / running_var / num_batches_tracked),
                                             and its own conv_seg (num_classes=1: (1, 256, 1, 1))
  semseghead_{k}.1.{weight,bias}             Sequential(Dropout2d, Conv2d(256, C_ss)) per subset
  {inssegdecoder,rotdetdecoder}.neck.*       mmdet FPN: lateral_convs.{i}.conv, fpn_convs.{i}.conv
  {...}.rpn_head.{rpn_conv,rpn_cls,rpn_reg}  RPN convs (3 anchors; 4 / 6 deltas)
  {...}.roi_head.bbox_head.shared_fcs.{0,1}  Shared2FC Linears (MTP comments out the head's own
                                             fc_cls / fc_reg, so there are none)
  inssegdecoder.roi_head.mask_head.convs.{i}.conv, .upsample   FCNMaskHead (conv_logits commented
                                             out); upsample = ConvTranspose2d, weight (in, out, 2, 2)
  inssegroiboxhead_fc_cls{k}, inssegroiboxhead_fc_reg{k}   Linear(1024, C+1), Linear(1024, 4 C)
  inssegroimaskhead_conv{k}                  Conv2d(256, C, 1)
  rotdetroiboxhead_fc_cls{k}, rotdetroiboxhead_fc_reg{k}   Linear(1024, C+1), Linear(1024, 5)
k = 1, 2, 3 are the model's subsets in `data.subsets` order (MTP: sota, sior, fast). The RoI
extractors, losses, coders and the data preprocessor (non-persistent mean/std buffers) hold no
state. The twin `mtp_jax.torch_twin.mtp_decoders.MTPFramework` has exactly this key set.

Our tree (the union of the model's nnx.Param and nnx.BatchStat pure dicts, `model_state_tree`):
`encoder/...` and `heads/{ss,is,rd}/...`. Each task declares its part of the layout on its class
(`official_keys`: our module -> official prefix, in the official order; `official_unused`: the
official classifiers it does not have), which gives these rules:
  heads/ss/semsegdecoder/X           -> semsegdecoder.decode_head.X (psp_modules.{i} -> .{i}.1)
  heads/ss/semseghead/<s>/conv_seg   -> semseghead_{k}.1
  heads/{is,rd}/{neck,rpn_head}/X    -> {inssegdecoder,rotdetdecoder}.{neck,rpn_head}.X
  heads/{is,rd}/roi_head/X           -> ....roi_head.bbox_head.X
  heads/is/mask_head/X               -> inssegdecoder.roi_head.mask_head.X
  heads/{is,rd}/predictors/<s>/fc_cls|fc_reg -> {inssegroi,rotdetroi}boxhead_fc_cls{k}|_fc_reg{k}
  heads/is/mask_predictors/<s>/conv_logits   -> inssegroimaskhead_conv{k}
  leaves kernel/scale -> weight, mean -> running_mean, var -> running_var; Linear (in, out) ->
  (out, in); Conv HWIO -> OIHW; the 2x2 deconv `upsample` (2, 2, in, out) -> (in, out, 2, 2).
Class-specific `fc_reg` (Mask R-CNN): ours holds class c's 4 deltas at [4c, 4c + 4), the mmdet
layout ([c0 dx, dy, dw, dh, c1 ...], `bbox_pred.view(n, -1, 4)`), so no permutation is needed.

Official parameters our model does not have (Deliberate, written on export, shape-checked and
dropped on import, listed in the import report under 'dropped_unused'):
- `semsegdecoder.decode_head.conv_seg.{weight,bias}` ((1, C, 1, 1), (1,)): UPerHead's own
  classifier, built by mmseg with num_classes=1 and never called by MTP. Exported as zeros.
- `<bn>.num_batches_tracked` (int64 scalar) of every SyncBN: unused with momentum 0.1. Exported as
  `num_batches_tracked` (the CLI passes step x number of subsets, the count MTP's per-subset
  decoder calls would have reached; default 0).
Their absence from a checkpoint is not an error, even with strict=True. Likewise the global
blocks' `encoder.blocks.{i}.attn.full_attn_rel_pos_{h,w}` on import into an encoder built
without them (the detection finetunes' `global_rel_pos=False`, as the original's detection
backbones): dropped and listed under 'dropped_unused'.

Tasks (those that declare `official_keys`, in `mtp_jax.tasks.ORDER`): export writes the encoder and the heads the tree has (a ss + rd run has no insseg* keys).
Import loads the encoder and the heads of `tasks` (default: every head of the template). With
strict=True (default) a checkpoint key that has no place is an error, so an official 3-task
checkpoint into a ss-only model needs `tasks=('ss',)` (keys of other tasks are then listed under
'ignored_other_tasks') or strict=False; heads of the template outside `tasks` keep their values
('kept'), e.g. a fresh head to finetune.
"""

import functools

import numpy as np

from mtp_jax.checkpoints import torch_convert as tc
from mtp_jax.errors import CheckpointError

_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


@functools.lru_cache(maxsize=None)
def _layouts() -> dict:
  """{task: (official_keys, official_unused)} of the tasks that declare official full-model keys,
  in `mtp_jax.tasks.ORDER` (ss, is, rd)."""
  from mtp_jax import tasks  # noqa: PLC0415 (the task modules pull in the models; full_model does not)
  classes = {n: tasks.TASKS[n] for n in tasks.ORDER if n in tasks.TASKS}
  return {n: (tuple(c.official_keys), dict(getattr(c, "official_unused", {})))
          for n, c in classes.items() if getattr(c, "official_keys", ())}


def official_tasks() -> tuple:
  """The tasks that have heads in the official full model, in its order."""
  return tuple(_layouts())


def _groups(task: str) -> list:
  """The official top-level names of a task's keys, as key prefixes in the official module order
  ('semsegdecoder.', 'semseghead_'): each rule's first component up to its first wildcard."""
  out = []
  for _, official in _layouts()[task][0]:
    first = official.split(".")[0]
    cut = min((first.index(c) for c in "<*" if c in first), default=None)
    group = first + "." if cut is None else first[:cut]
    if group not in out:
      out.append(group)
  return out


def task_of_key(key: str) -> str | None:
  """'encoder', 'ss', 'is', 'rd' or None for an official full-model key."""
  if key.startswith("encoder."):
    return "encoder"
  return next((t for t in _layouts() if key.startswith(tuple(_groups(t)))), None)


def _join(parts) -> str:
  parts = [str(p) for p in parts]
  return ".".join(parts[:-1] + [_LEAF.get(parts[-1], parts[-1])])


def head_key(path, subsets) -> str:
  """Official key of the head leaf at `path` = ('heads', task, module, ...): the first of the
  task's `official_keys` rules whose module pattern starts the path, the rest joined on."""
  p = [str(x) for x in path]
  if len(p) < 4 or p[0] != "heads" or p[1] not in _layouts():
    raise CheckpointError(f"no official name for {'/'.join(p)}")
  rest = p[2:]
  for ours, official in _layouts()[p[1]][0]:
    pattern = ours.split("/")
    if len(rest) <= len(pattern) or any(q not in ("*", "<s>") and q != r for q, r in zip(pattern, rest)):
      continue
    for q, r in zip(pattern, rest):
      if q == "<s>" and r not in subsets:
        raise CheckpointError(f"{'/'.join(p)}: subset {r!r} is not one of {list(subsets)}")
      if q in ("*", "<s>"):
        official = official.replace(q, r if q == "*" else str(list(subsets).index(r) + 1), 1)
    return official + "." + _join(rest[len(pattern):])
  raise CheckpointError(f"no official name for {'/'.join(p)}")


def _is_deconv(path) -> bool:
  return len(path) >= 2 and str(path[-2]) == "upsample" and str(path[-1]) == "kernel"


def to_torch(path, value: np.ndarray) -> np.ndarray:
  leaf = str(path[-1])
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 0, 1) if _is_deconv(path) else value.transpose(3, 2, 0, 1)
  return value


def from_torch(path, value: np.ndarray) -> np.ndarray:
  leaf = str(path[-1])
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 0, 1) if _is_deconv(path) else value.transpose(2, 3, 1, 0)
  return value


def _unused_entries(heads: dict, task: str, head_keys) -> dict:
  """{official key: (shape, dtype)} of the official tensors of `task` that we do not have: the
  task's `official_unused` 1-class 1x1 classifiers, and every BatchNorm's num_batches_tracked."""
  out = {}
  for prefix, module in _layouts()[task][1].items():
    node = heads[task]
    for part in module.split("/"):
      node = node[part]
    channels = int(np.shape(node["kernel"])[-1])
    out[prefix + ".weight"] = ((1, channels, 1, 1), np.float32)
    out[prefix + ".bias"] = ((1,), np.float32)
  for key in head_keys:
    if key.endswith(".running_mean"):
      out[key[:-len("running_mean")] + "num_batches_tracked"] = ((), np.int64)
  return out


def _rank(key: str) -> tuple:
  """Module order of the official framework (the twin's `state_dict()` order)."""
  groups = ["encoder."] + [g for t in _layouts() for g in _groups(t)]
  return next((i for i, g in enumerate(groups) if key.startswith(g)), len(groups)), key.split(".")[0]


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
def model_state_tree(params: dict, batch_stats: dict | None = None) -> dict:
  """One nested dict from the pure dicts of nnx.Param and nnx.BatchStat (disjoint leaves)."""
  out = {}
  for tree in (params, batch_stats or {}):
    for path, value in tc.flatten_params(tree):
      node = out
      for p in path[:-1]:
        node = node.setdefault(p, {})
      if path[-1] in node:
        raise ValueError(f"{'/'.join(map(str, path))} is both a parameter and a batch statistic")
      node[path[-1]] = value
  return out


def split_like(tree: dict, reference: dict) -> dict:
  """The part of `tree` at the paths of `reference` (e.g. the params or batch_stats half)."""
  flat = dict(tc.flatten_params(tree))
  return tc.nest_params({path: flat[path] for path, _ in tc.flatten_params(reference)})


def model_to_state_dict(state_tree: dict, subsets, *, num_batches_tracked: int = 0,
                        copy: bool = True) -> dict[str, np.ndarray]:
  """The model's tree (`model_state_tree`) -> {official full-model key: numpy array}, in the
  official module order; keys of tasks the tree has no head for are omitted."""
  subsets = tuple(subsets)
  unknown = sorted(set(state_tree) - {"encoder", "heads"})
  if unknown:
    raise CheckpointError(f"no official name for the model's top-level entries {unknown}")
  out = {"encoder." + k: v for k, v in tc.encoder_to_state_dict(state_tree["encoder"], copy).items()}
  heads = state_tree.get("heads", {})
  extra = sorted(set(heads) - set(official_tasks()))
  if extra:
    raise CheckpointError(f"no official names for the heads {extra}")
  for task in (t for t in official_tasks() if t in heads):
    keys = []
    for path, value in tc.flatten_params(heads[task]):
      path = ("heads", task) + tuple(path)
      key = head_key(path, subsets)
      value = to_torch(path, np.asarray(value))
      out[key] = np.ascontiguousarray(value) if copy else value
      keys.append(key)
    for key, (shape, dtype) in _unused_entries(heads, task, keys).items():
      out[key] = (np.full(shape, num_batches_tracked, dtype) if dtype == np.int64
                  else np.zeros(shape, dtype))
  return dict(sorted(out.items(), key=lambda kv: _rank(kv[0])))


def state_dict_shapes(state_tree: dict, subsets) -> dict[str, tuple]:
  """{official key: PyTorch shape} of a tree of arrays or ShapeDtypeStructs; no copies."""
  zeros = tc.nest_params({p: np.broadcast_to(np.float32(0), np.shape(v))
                          for p, v in tc.flatten_params(state_tree)})
  return {k: tuple(np.shape(v)) for k, v in model_to_state_dict(zeros, subsets, copy=False).items()}


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------
class _Import:
  """One import of an official full-model state dict into a template (`state_dict_to_model`):
  the encoder, then each head, then the keys nobody took; its lists become the report."""

  def __init__(self, sd: dict, template: dict, subsets, tasks):
    self.sd, self.subsets = sd, tuple(subsets)
    self.heads = template.get("heads", {})
    known = official_tasks()
    self.model_tasks = tuple(t for t in known if t in self.heads)
    self.explicit = tasks is not None
    self.tasks = self.model_tasks if tasks is None else tuple(tasks)
    if set(self.tasks) - set(self.model_tasks):
      raise CheckpointError(f"tasks {sorted(set(self.tasks) - set(self.model_tasks))} have no head "
                            f"in the model (it has {list(self.model_tasks)})")
    unknown = sorted(set(template) - {"encoder", "heads"} | set(self.heads) - set(known))
    if unknown:
      raise CheckpointError(f"no official name for the model's entries {unknown}")
    self.flat, self.loaded_paths, self.consumed = {}, set(), set()
    self.missing, self.unexpected, self.bad_shapes = [], [], []
    self.dropped, self.kept, self.ignored = [], [], []

  def encoder(self, template: dict):
    """torch_convert does the work; mis-shaped keys are taken out first, so that every problem is
    reported together and strict=False can keep the template's value."""
    enc_sd = {k[len("encoder."):]: v for k, v in self.sd.items() if k.startswith("encoder.")}
    enc_shapes = tc.state_dict_shapes(template)
    for k in sorted(set(enc_sd) & set(enc_shapes)):
      if tuple(np.shape(enc_sd[k])) != enc_shapes[k]:
        self.bad_shapes.append(f"encoder.{k}: checkpoint {tuple(np.shape(enc_sd[k]))}, model expects {enc_shapes[k]}")
        del enc_sd[k]
    # (raises, strict or not, on a relative_position_index that is not the 7x7 window index)
    params, report = tc.state_dict_to_encoder(enc_sd, template, strict=False)
    mis_shaped = {m.split(":")[0] for m in self.bad_shapes}
    self.missing += ["encoder." + k for k in report["missing"] if "encoder." + k not in mis_shaped]
    # An encoder built without the global blocks' relative-position tables (the original's
    # detection backbones) drops a checkpoint's tables: listed under 'dropped_unused', no error.
    rel_pos = [k for k in report["unexpected"] if k.endswith(tc.GLOBAL_REL_POS_KEYS)]
    self.unexpected += ["encoder." + k for k in report["unexpected"] if k not in rel_pos]
    self.dropped += ["encoder." + k for k in rel_pos]
    self.consumed |= {"encoder." + k for k in enc_sd}
    self.loaded_paths |= {("encoder",) + tuple(p) for p, _ in tc.flatten_params(template)
                          if tc.torch_key(p) in enc_sd and tc.torch_key(p) not in report["missing"]}
    self.flat.update({("encoder",) + tuple(p): v for p, v in tc.flatten_params(params)})

  def head(self, task: str):
    """A head of the template: loaded if `task` is one of `tasks`, else kept as it is."""
    keys = []
    for path, ref in tc.flatten_params(self.heads[task]):
      full = ("heads", task) + tuple(path)
      key = head_key(full, self.subsets)
      keys.append(key)
      self.flat[full] = ref
      if task not in self.tasks:
        self.kept.append(key)
      elif key not in self.sd:
        self.missing.append(key)
      else:
        self.consumed.add(key)
        value = from_torch(full, np.asarray(self.sd[key]))
        if tuple(value.shape) != tuple(np.shape(ref)):
          want = to_torch(full, np.broadcast_to(np.float32(0), np.shape(ref))).shape
          self.bad_shapes.append(f"{key}: checkpoint {tuple(np.shape(self.sd[key]))}, model expects {tuple(want)}")
          continue
        self.flat[full] = value.astype(getattr(ref, "dtype", np.float32))
        self.loaded_paths.add(full)
    if task in self.tasks:
      for key, (shape, _) in _unused_entries(self.heads, task, keys).items():
        if key in self.sd:
          self.consumed.add(key)
          if tuple(np.shape(self.sd[key])) != shape:
            self.bad_shapes.append(f"{key}: checkpoint {tuple(np.shape(self.sd[key]))}, official shape {shape}")
          else:
            self.dropped.append(key)

  def leftovers(self):
    """Keys nobody took: other tasks' (ignored when `tasks` was given) or unexpected."""
    for key in sorted(set(self.sd) - self.consumed):
      if key.startswith("encoder."):
        continue   # already in `unexpected` (from the encoder's report) or consumed
      owner = task_of_key(key)
      if self.explicit and owner in official_tasks() and owner not in self.tasks:
        self.ignored.append(key)
      else:
        self.unexpected.append(key)

  def report(self, strict: bool) -> dict:
    problems = []
    if strict and self.missing:
      problems.append(f"missing keys ({len(self.missing)}): {self.missing}")
    if strict and self.unexpected:
      hint = ""
      others = sorted({task_of_key(k) for k in self.unexpected} & (set(official_tasks()) - set(self.tasks)))
      if others:
        hint = (f" (keys of tasks {others} that the model does not load: pass tasks= the tasks "
                f"to load, or strict=False)")
      problems.append(f"unexpected keys ({len(self.unexpected)}){hint}: {self.unexpected}")
    if self.bad_shapes:
      problems.append(f"shape mismatch ({len(self.bad_shapes)}): " + "; ".join(self.bad_shapes))
    if strict and problems:
      raise CheckpointError("checkpoint does not fit the model: " + " | ".join(problems))
    return {"loaded": len(self.loaded_paths), "missing": self.missing, "unexpected": self.unexpected,
            "shape_mismatch": self.bad_shapes, "dropped_unused": self.dropped,
            "ignored_other_tasks": self.ignored, "kept": self.kept, "problems": problems}


def convert_to_model(sd: dict, template: dict, subsets, strict: bool, tasks):
  """(tree, report, paths loaded): `state_dict_to_model` plus the paths whose values came from
  `sd` (the rest are the template's)."""
  run = _Import(sd, template, subsets, tasks)
  run.encoder(template["encoder"])
  for task in run.model_tasks:
    run.head(task)
  run.leftovers()
  report = run.report(strict)
  return tc.nest_params(run.flat), report, run.loaded_paths


def state_dict_to_model(sd: dict, template: dict, subsets, strict: bool = True, tasks=None):
  """{official full-model key: array} -> a tree shaped like `template` (`model_state_tree` of the
  model's current values: parameters and batch statistics; where nothing is loaded the
  template's value stays).

  tasks: the heads to load (default: all of the template's); see the module docstring.
  Returns (tree, report): report = {'loaded': n, 'missing', 'unexpected', 'shape_mismatch',
  'dropped_unused', 'ignored_other_tasks', 'kept', 'problems'}. strict=True raises a
  CheckpointError naming every missing and unexpected key and every shape mismatch;
  strict=False loads what fits and reports the rest.
  """
  tree, report, _ = convert_to_model(sd, template, subsets, strict, tasks)
  return tree, report


# ----------------------------------------------------------------------------------------------
# Files (starting a train state from one: mtp_jax/checkpoints/sources.py)
# ----------------------------------------------------------------------------------------------
def read_full_checkpoint(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """A full-model `.pth`/`.safetensors` as {key: numpy}: `state_dict`/`model` unwrapped and
  `module.` stripped, prefixes (`encoder.`, ...) kept (torch_convert.read_encoder_state_dict keeps
  only the encoder)."""
  return tc.read_state_dict(path, trust_pickle)


def write_full_checkpoint(sd: dict, path: str):
  """`.safetensors` or `.pth` (torch.save of tensors); 0-d tensors (num_batches_tracked) stay 0-d."""
  tc.write_state_dict(sd, path)
