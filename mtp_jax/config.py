"""Config defaults (the schema of every known key), loading of config files, and overrides.

A config file is Python: `configs/<...>/<name>.py` defines `get_config(arg=None)` returning an
`ml_collections.ConfigDict`, usually `pretrain_defaults()` with some fields changed (the
finetuning recipes that configs share live in configs/recipes.py, not here). Every key of the
result must exist in the defaults: a misspelt key fails with the closest known names, before any
work starts. Overrides from the command line (`--set train.num_steps=10`) obey the same rule.

`pretrain_defaults()` is the schema: every key with its default value, the reference of
`validate`. Its values are the paper's pretraining settings and it stays here, not in configs/:
the schema needs a value per key, pretraining is the experiment that uses every key, and the
finetuning recipes are written as changes to it. Each task's block is its module's
`Task.default_config`.
"""

import ast
import difflib
import importlib.util
import os

import ml_collections

from mtp_jax.errors import ConfigError

SUBSET_NAMES = ("sota", "sior", "fast")


def pretrain_defaults() -> ml_collections.ConfigDict:
  """All pretraining keys with the paper's values (MTP_SPEC §3), locked against new keys.

  Long because it is the schema: one line per key, each with where its value comes from."""
  c = ml_collections.ConfigDict()
  c.seed = 2023                       # the original's seed (§3.2)
  # Every task (§3.1, §5), each with its loss weight (1 in the original, §3.2) and the fields its
  # module defines (mtp_jax/tasks/<task>.py, Task.default_config). A task runs when enabled.
  from mtp_jax import tasks as tasks_lib  # noqa: PLC0415 (pulls in jax)
  c.tasks = ml_collections.ConfigDict({name: task.default_config() for name, task in tasks_lib.TASKS.items()})

  c.data = ml_collections.ConfigDict()
  # The experiment's data source (data_pipelines/sources.py): 'samrs' (pretraining) or a
  # finetuning dataset converted by `python -m data_pipelines.convert <dataset>` (then
  # data.subsets is (dataset,), one subset named as the dataset).
  c.data.dataset = "samrs"
  c.data.dir = ""                     # converted TFRecords (python -m data_pipelines.convert ...)
  c.data.subsets = SUBSET_NAMES
  # Per-band pixel mean / std that normalise the images on the device (RGB of §3.4 by default).
  c.data.mean = (123.675, 116.28, 103.53)
  c.data.std = (58.395, 57.12, 57.375)
  c.data.bands = ()                   # band indices to keep from multi-band images (): all
  c.data.image_size = 448             # S (§3.4)
  c.data.resize = 0                   # change detection: pairs resized to this first (0: as converted)
  c.data.rand_augment = 0             # scene classification: RandAugment ops per image (MTP: 2); 0 off
  c.data.rotate_prob = 0.0            # rotated-detection finetuning: mmrotate's RandomRotate probability
  c.data.batch_per_subset = 32        # GLOBAL images per subset per step: 96 in all (§3.2)
  # Independent reader streams (0: one per process). The global batch is the concatenation of
  # the streams' batches, so fixing it (to the process count of a multi-host run) reproduces
  # that run's batches, and its data-iterator state, on any number of processes.
  c.data.num_streams = 0
  c.data.max_instances = ml_collections.ConfigDict({"sota": 256, "sior": 128, "fast": 256})
  c.data.shuffle_window = 1024
  # Training augmentation (§3.4; data_pipelines/samrs/augment.py). rot90 is ours, off as in MTP.
  c.data.augment = ml_collections.ConfigDict({
      "flip_prob": 0.75, "rot90": False, "resize_range": (0.5, 2.0), "photometric": True,
      "max_crop_redraws": 10})
  # Corrupt TFRecords are skipped and counted; above this fraction the run stops with an error.
  c.data.max_corrupt_fraction = 0.01
  # Input pipeline off the step's critical path (docs/benchmarks.md, input pipeline): grain worker
  # processes per subset and reader stream that parse, decode and augment (0: in the training
  # process; a run resumes only with the count it was checkpointed with), and device batches read
  # ahead by a background thread while the step runs (0: none).
  c.data.num_workers = 0
  c.data.prefetch = 2

  c.model = ml_collections.ConfigDict()
  c.model.encoder = "vit_b"
  c.model.encoder_overrides = ml_collections.ConfigDict()  # e.g. depth=4 for tiny runs
  c.model.drop_path_rate = 0.1        # pretraining (§1.1)
  # Activations' dtype: 'auto' is bfloat16 on TPUs and GPUs and float32 on the CPU (where XLA
  # emulates bfloat16 slowly); parameters, losses and optimizer state stay float32.
  c.model.compute_dtype = "auto"
  c.model.remat = False               # activation checkpointing per encoder block
  # The encoder's blocks as one lax.scan over repeats of the block pattern (RVSA: `interval`
  # blocks): compile time flat in depth (ViT-L 224 px on CPU: 24.0 s -> 15.5 s) for a slower CPU
  # step (6.8 s -> 9.8 s); same parameters, maths and random draws (docs/benchmarks.md).
  c.model.scan_blocks = False
  # Encoder initialisation for a fresh run (not a resume): '' (random), an official / MAE PyTorch
  # checkpoint (.pth, .safetensors; keys the encoder lacks, e.g. MAE's cls_token, are dropped and
  # RVSA parameters MAE lacks keep their init, as the original's strict=False load, §3.5), or a
  # folder written by `python -m mtp_jax.import_torch`.
  c.model.encoder_init = ""
  # A model of more bands than RGB started from an RGB checkpoint: the input bands (of the model,
  # after data.bands) that are red, green and blue get the checkpoint's kernels and the others
  # 0; () repeats the RGB kernels over the bands, scaled (timm). torch_convert.adapt_input_bands.
  c.model.rgb_bands = ()
  # Whole-model initialisation for a fresh run: an official MTP full-model checkpoint
  # (`Iter_*_pretrn_model.pth`, or ours from `python -m mtp_jax.export --full`) loaded strictly
  # into the encoder and the heads of the enabled tasks (MTP_SPEC §3.6); the checkpoint's other
  # tasks are ignored. Official files pickle their optimizer: `model.full_init_trust_pickle=True`.
  c.model.full_init = ""
  c.model.full_init_trust_pickle = False
  # Frozen encoder (linear probing / frozen-backbone protocols, as GEO-Bench and PANGAEA
  # evaluate foundation models): only the heads train; the encoder stays bit-identical.
  c.model.freeze_encoder = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 6e-5               # AdamW (§3.5)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.05     # not on 1-D parameters, biases or pos_embed
  c.optimizer.warmup_steps = 0        # the original has no warmup
  # 'cosine' to 0 over train.num_steps, or 'step': lr x decay_factor at each of decay_steps
  # (mmdet's MultiStepLR, MTP's detection finetuning; mtp_jax/train/optimizer.py)
  c.optimizer.schedule = "cosine"
  # Cosine once per epoch of this many steps (mmengine's by_epoch=True, MTP's classification and
  # change-detection finetuning): the lr holds for an epoch (warmup still rises every step).
  # 0: the cosine moves every step.
  c.optimizer.epoch_steps = 0
  c.optimizer.decay_steps = ()
  c.optimizer.decay_factor = 0.1
  c.optimizer.grad_clip_norm = 5.0    # global-norm clipping before AdamW; 0: none
  # Layer-wise lr decay (§3.5): lr x rate^(L + 1 - layer id) with patch_embed/pos_embed id 0,
  # block i id i + 1, everything else L + 1. The original's config asks for 0.9 in pretraining,
  # but its constructor matched no parameter name, so every lr scale was 1 (§7.1): the paper's
  # pretraining numbers come from 1.0, the default here. 0.9 applies the decay for real.
  c.optimizer.layer_decay = 1.0
  c.optimizer.grad_accum_steps = 1    # micro-batches per step (the batch is split k ways)
  # A step whose loss or gradients are not finite leaves parameters, optimizer and BatchNorm
  # state untouched; it is counted in the `nonfinite_steps` metric.
  c.optimizer.skip_nonfinite = True

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 80_000          # cosine to 0 over these steps
  c.train.log_every = 50
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3         # the last N checkpoints ...
  c.train.keep_every = 0              # ... plus every checkpoint at a multiple of this (0: none)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_per_subset = 8         # images per subset per evaluation batch (global)
  c.eval.max_batches = 0              # 0: the whole valid split
  c.eval.report_images = 4            # images per subset in the report PNG (from the first batch)
  c.eval.every_steps = 0              # also evaluate every N training steps (0: only at the end)
  c.eval.split = "valid"              # the converted split evaluated (valid, or test where converted)
  # Finetuning segmentation: images are evaluated whole, unresized, padded to a canvas of
  # eval.image_size px (0: data.image_size); with eval.slide_window > 0, by mmseg's slide
  # inference (windows of that size every eval.slide_stride px, logits averaged).
  c.eval.image_size = 0
  c.eval.slide_window = 0
  c.eval.slide_stride = 0
  # Change detection with data.resize: score at the labels' converted size, this many px (the
  # logits resized back to it, as mmseg does when labels load after the resize: MTP's OSCD at
  # 96 px); 0: score the labels resized with the images.
  c.eval.label_size = 0

  c.mesh = ml_collections.ConfigDict()
  # Devices as (data, fsdp, tensor) (the axes are fixed: parallel/sharding.py MESH_AXES); one
  # entry may be -1 (all remaining devices). The batch is split over data x fsdp. (-1, 1, 1):
  # pure data parallelism; (1, -1, 1): FSDP (parameters and optimizer state split over all
  # devices); (1, -1, 2): FSDP with tensor-parallel heads/MLP.
  c.mesh.shape = (-1, 1, 1)
  # Devices the mesh spans in a one-process job: 0 = all of them, k = the first k (e.g. one
  # device of a simulated 8-device CPU). Multi-process jobs always use every device.
  c.mesh.num_devices = 0
  # Logical parameter axis -> mesh axis (None: replicated). Mesh axes of size 1 are ignored, and
  # a dimension that the mesh axis does not divide stays whole (mtp_jax/parallel/sharding.py).
  c.sharding_rules = (("embed", "fsdp"), ("mlp", "tensor"), ("qkv", "tensor"),
                      ("conv_in", None), ("conv_out", "fsdp"))
  c.lock()
  c.model.encoder_overrides.unlock()  # free-form: any build_encoder keyword
  return c


def _key_paths(cfg, prefix=""):
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict) and not path.endswith("encoder_overrides"):
      yield from _key_paths(value, path + ".")
    else:
      yield path


def validate(config, defaults=None):
  """Raises ConfigError if `config` holds keys that `defaults` lacks, or invalid values."""
  _check_keys(config, defaults or pretrain_defaults())
  _check_tasks(config)
  _check_training(config)
  _check_data_source(config)
  _check_eval_windows(config)
  _check_model_inputs(config)
  return config


def _check_keys(config, defaults):
  """Raises ConfigError naming the keys of `config` that `defaults` lacks, with the closest known ones."""
  known = set(_key_paths(defaults))
  # data.max_instances holds one entry per subset: a finetuning dataset's own name is known too
  known |= {f"data.max_instances.{s}" for s in config.data.subsets}
  unknown = [k for k in _key_paths(config) if k not in known]
  if unknown:
    hints = []
    for k in unknown:
      close = difflib.get_close_matches(k, known, n=2)
      hints.append(f"{k!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    raise ConfigError(f"unknown config key(s): {', '.join(hints)}")


def _check_tasks(config):
  """Raises ConfigError for an unknown task, a task block its module refuses, or no enabled task."""
  from mtp_jax import tasks as tasks_lib  # noqa: PLC0415 (pulls in jax)
  runnable = sorted(tasks_lib.TASKS)
  for name in config.tasks:
    if name not in tasks_lib.TASKS:
      raise ConfigError(f"tasks.{name}: unknown task; the tasks are {runnable}")
  for name in tasks_lib.TASKS:
    problem = tasks_lib.TASKS[name].check_config(config.tasks[name])
    if problem:
      raise ConfigError(f"tasks.{name}.{problem}")
  if not tasks_lib.enabled(config):
    raise ConfigError(f"no task is enabled in config.tasks; the tasks that run now are {runnable}")


def _check_training(config):
  """Raises ConfigError for an invalid mesh shape, optimizer setting or eval.label_size."""
  from mtp_jax import tasks as tasks_lib  # noqa: PLC0415 (pulls in jax)
  if len(config.mesh.shape) != 3:
    raise ConfigError(f"mesh.shape {tuple(config.mesh.shape)} must have 3 entries (data, fsdp, tensor)")
  if config.optimizer.grad_accum_steps < 1:
    raise ConfigError(f"optimizer.grad_accum_steps = {config.optimizer.grad_accum_steps} must be >= 1")
  if config.optimizer.schedule not in ("cosine", "step"):
    raise ConfigError(f"optimizer.schedule {config.optimizer.schedule!r} is not 'cosine' or 'step'")
  # eval.label_size: the labels of pairs resized before the model (a task that declares data.resize)
  resizing = [n for n in tasks_lib.enabled(config) if "resize" in tasks_lib.TASKS[n].data_options]
  if config.eval.label_size and not (config.data.resize and resizing):
    raise ConfigError(f"eval.label_size = {config.eval.label_size} applies to change detection with "
                      "data.resize (pairs resized before the model) only")
  epoch_steps = config.optimizer.epoch_steps
  if not isinstance(epoch_steps, int) or epoch_steps < 0:
    raise ConfigError(f"optimizer.epoch_steps = {epoch_steps!r} must be a whole number of steps >= 0 (0: per step)")
  if epoch_steps and config.optimizer.schedule != "cosine":
    raise ConfigError("optimizer.epoch_steps applies to optimizer.schedule='cosine' only (the step "
                      "schedule's decay_steps already fall on epoch boundaries)")
  if config.optimizer.decay_steps and config.optimizer.schedule != "step":
    raise ConfigError(f"optimizer.decay_steps {tuple(config.optimizer.decay_steps)} apply to "
                      "optimizer.schedule='step' only")
  if config.optimizer.grad_clip_norm < 0:
    raise ConfigError(f"optimizer.grad_clip_norm = {config.optimizer.grad_clip_norm} must be >= 0 (0: no clipping)")
  if not 0 < config.optimizer.layer_decay <= 1:
    raise ConfigError(f"optimizer.layer_decay = {config.optimizer.layer_decay} must be in (0, 1]")


def _check_data_source(config):
  """Raises ConfigError unless data.dataset is known and serves data.subsets, the bands and the tasks."""
  from data_pipelines import sources  # noqa: PLC0415 (pulls in grain)
  from mtp_jax import tasks as tasks_lib  # noqa: PLC0415 (pulls in jax)
  if config.data.dataset not in sources.SOURCES:
    raise ConfigError(f"data.dataset {config.data.dataset!r} is not one of {sorted(sources.SOURCES)}")
  if config.data.dataset == "samrs":
    bad = [s for s in config.data.subsets if s not in SUBSET_NAMES]
    if bad or not config.data.subsets:
      raise ConfigError(f"data.subsets {tuple(config.data.subsets)} must be a non-empty subset of {SUBSET_NAMES}")
  elif tuple(config.data.subsets) != (config.data.dataset,):
    raise ConfigError(f"data.subsets {tuple(config.data.subsets)} must be ({config.data.dataset!r},) "
                      f"for data.dataset {config.data.dataset!r}")
  sources.SOURCES[config.data.dataset].check_bands(config, tasks_lib.data_options())
  supported = sources.SOURCES[config.data.dataset].tasks
  off = [t for t in tasks_lib.enabled(config) if t not in supported]
  if off:
    raise ConfigError(f"tasks {off} are enabled, but data.dataset {config.data.dataset!r} serves "
                      f"only {list(supported)}")


def _check_eval_windows(config):
  """Raises ConfigError unless eval.slide_window/slide_stride/image_size fit data.image_size (pixels)."""
  if config.eval.slide_window and not 0 < config.eval.slide_stride <= config.eval.slide_window:
    raise ConfigError(f"eval.slide_stride {config.eval.slide_stride} must be in (0, eval.slide_window "
                      f"= {config.eval.slide_window}]")
  if config.eval.slide_window and config.eval.slide_window != config.data.image_size:
    raise ConfigError(f"eval.slide_window {config.eval.slide_window} must equal data.image_size "
                      f"{config.data.image_size}: the encoder's position table fixes its input size")
  if (config.eval.image_size and config.eval.image_size != config.data.image_size
      and not config.eval.slide_window):
    raise ConfigError(f"eval.image_size {config.eval.image_size} differs from data.image_size "
                      f"{config.data.image_size}: set eval.slide_window (the encoder's input size is fixed)")


def _check_model_inputs(config):
  """Raises ConfigError for bad input bands (data.mean/std, in_chans), image size or compute dtype."""
  if len(config.data.mean) != len(config.data.std):
    raise ConfigError(f"data.mean has {len(config.data.mean)} bands, data.std {len(config.data.std)}")
  if "in_chans" in config.model.encoder_overrides:
    raise ConfigError("model.encoder_overrides.in_chans: the encoder's input bands are "
                      "len(data.mean); set data.mean / data.std (and data.bands) instead")
  if config.data.image_size % 32:
    raise ConfigError(f"data.image_size {config.data.image_size} must be a multiple of 32")
  if config.model.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
    raise ConfigError(f"model.compute_dtype {config.model.compute_dtype!r} is not auto, float32, bfloat16 or float16")


def load_module(path: str):
  """The Python file at `path`, loaded as a module (a fresh one per call): configs/ is not an
  installed package, so the recipes configs share (configs/recipes.py) are reached by path."""
  path = os.path.normpath(os.path.abspath(path))
  stem = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(f"_mtp_config_{stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def sibling_module(config_file: str, name: str):
  """`load_module` of `name`, a path relative to `config_file`'s folder (a config file passes
  its `__file__`)."""
  return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def sibling_config(config_file: str, name: str, arg=None) -> ml_collections.ConfigDict:
  """get_config(arg) of the config file `name` beside `config_file`, not yet validated: one
  recipe for two configs (a release's RGB and multispectral variants)."""
  return sibling_module(config_file, name).get_config(arg)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]`, calls its get_config(arg), validates the result."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  if not os.access(path, os.R_OK):
    raise ConfigError(f"config file {path!r} is not readable")
  module_spec = importlib.util.spec_from_file_location("_mtp_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path!r} line {e.lineno}: {e.msg}") from None
  except Exception as e:
    raise ConfigError(f"config file {path!r} failed to load: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(arg=None)")
  try:
    config = module.get_config(arg or None) if arg else module.get_config()
  except AttributeError as e:  # a locked ConfigDict refuses a misspelt key here
    raise ConfigError(f"config file {path!r}: {e}") from None
  except Exception as e:
    raise ConfigError(f"config file {path!r}: get_config failed: {type(e).__name__}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path!r}: get_config returned {type(config).__name__}, not a ConfigDict")
  return validate(config)


def apply_overrides(config, overrides) -> ml_collections.ConfigDict:
  """Applies 'a.b=value' strings (value parsed as a Python literal, else kept as a string)."""
  for item in overrides or ():
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
      if part not in node:
        raise ConfigError(f"override {item!r}: unknown config key {key!r}")
      node = node[part]
    if parts[-1] not in node and not key.startswith("model.encoder_overrides."):
      close = difflib.get_close_matches(key, set(_key_paths(config)), n=2)
      raise ConfigError(f"override {item!r}: unknown config key {key!r}"
                        + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    try:
      with config.unlocked():
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"override {item!r}: {e}") from None
  return validate(config)

