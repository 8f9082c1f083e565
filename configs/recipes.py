"""The finetuning recipes the configs in configs/finetune/ share, and their ':arg' options.

Not a config (no get_config): a config file loads it by path, as configs/ is not an installed
package,

    from mtp_jax.config import sibling_module
    recipes = sibling_module(__file__, "../recipes.py")

    def get_config(arg=None):
      options = recipes.finetune_options(arg)
      c = recipes.finetune_defaults("eurosat", "cls")
      ...                                   # the dataset's size, batch, schedule
      return recipes.apply_finetune_options(c, options)

Everything here is keys of `mtp_jax.config.pretrain_defaults` (the schema) set to MTP's finetuning
values (docs/fidelity.md). What depends on the task comes from the task's class
(mtp_jax/tasks/: `objects`, `native_size`, `smoke`), so a new task needs no line here.
"""

import ml_collections

from mtp_jax import tasks as tasks_lib
from mtp_jax.config import pretrain_defaults


def finetune_defaults(dataset: str, task: str) -> ml_collections.ConfigDict:
  """The keys of `pretrain_defaults` set for finetuning `task` on `dataset` with MTP's shared
  recipe (docs/fidelity.md): ViT-B + RVSA, drop path 0.3, AdamW (0.9, 0.999), weight
  decay 0.05, layer decay 0.9 with the official layer ids, no gradient clipping (no mmengine
  finetune config of the original sets clip_grad: pretraining's clip of 5 is pretraining's
  alone), linear warmup then cosine to 0. The
  pretraining tasks are off and `task` is on; a dataset's config sets its size, batch,
  schedule and `model.encoder_init` (the MTP checkpoint to start from)."""
  c = pretrain_defaults()
  for name in c.tasks:
    c.tasks[name].enabled = name == task
  c.data.dataset = dataset
  c.data.subsets = (dataset,)
  c.model.encoder = "vit_b_rvsa"
  c.model.drop_path_rate = 0.3
  c.optimizer.lr = 6e-5
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.999
  c.optimizer.weight_decay = 0.05
  c.optimizer.layer_decay = 0.9
  c.optimizer.grad_clip_norm = 0.0
  if tasks_lib.TASKS[task].objects:   # objects packed per training image (loop logs data/<dataset>/dropped_by_cap)
    c.data.max_instances = ml_collections.ConfigDict({dataset: 1000})
  return c


def detection_finetune_defaults(dataset: str, *, image_size: int, batch: int, steps_per_epoch: int,
                                epochs: int, decay_epochs: tuple, task: str = "rd") -> ml_collections.ConfigDict:
  """MTP's detection finetuning (MTP_SPEC §5.2): Oriented R-CNN (§3.3; task 'rd') or Faster
  R-CNN ('hd') on ViT-B + RVSA with mmdet's decoder init, AdamW lr 1e-4, 500 warmup steps, mmdet's
  step schedule (x 0.1 at `decay_epochs`); schedule lengths in steps of `batch` images. The
  encoder's global blocks have no relative-position tables, as the original's detection
  backbones.

  Ours, for static shapes (the original has neither cap): a training image packs at most
  `data.max_instances[dataset]` objects (1,000 unless the config says; the objects past it are
  dropped and counted in the `data/<dataset>/dropped_by_cap` metric), and the test-time NMS takes
  at most `tasks.<rd|hd>.max_candidates` (proposal, class) pairs above the score threshold, the
  highest-scoring ones (mmdet's multiclass_nms keeps them all)."""
  c = finetune_defaults(dataset, task)
  # mmengine's Runner calls init_weights() before the backbone checkpoint loads, so finetuned
  # decoders start from mmdet's init_cfg (MTP's pretraining code never calls it: 'mtp' there).
  c.tasks[task].init = "mmdet"
  # The original's detection backbones (vit_rvsa_mtp_branches.py) have no relative-position
  # tables in their global blocks: a checkpoint's tables are dropped on loading (and listed).
  c.model.encoder_overrides.global_rel_pos = False
  c.data.image_size = image_size
  c.data.batch_per_subset = batch
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_steps = 500
  c.optimizer.schedule = "step"
  c.optimizer.decay_steps = tuple(e * steps_per_epoch for e in decay_epochs)
  c.train.num_steps = epochs * steps_per_epoch
  c.train.checkpoint_every = steps_per_epoch
  c.train.log_every = 50
  c.eval.batch_per_subset = 8
  return c


def segmentation_finetune_defaults(dataset: str, *, image_size: int, eval_image_size: int,
                                   slide_stride: int) -> ml_collections.ConfigDict:
  """MTP's semantic-segmentation finetuning (MTP_SPEC §5.2; LoveDA, SpaceNetv1): UperNet of 512
  channels, batch 8 of `image_size` crops, 80,000 steps (1,500 of linear warmup, then cosine to
  0), checkpoints every 8,000 and evaluations every 16,000 steps; whole images evaluated on a
  canvas of `eval_image_size` px by slide inference, windows of `image_size` every
  `slide_stride` px."""
  c = finetune_defaults(dataset, "ss")
  c.data.image_size = image_size
  c.data.batch_per_subset = 8
  c.tasks.ss.channels = 512
  c.train.num_steps = 80_000
  c.optimizer.warmup_steps = 1_500
  c.train.checkpoint_every = 8_000
  c.train.log_every = 100
  c.eval.image_size = eval_image_size
  c.eval.slide_window, c.eval.slide_stride = image_size, slide_stride
  c.eval.batch_per_subset = 8
  c.eval.every_steps = 16_000
  return c


FINETUNE_OPTIONS = ("smoke", "frozen", "internimage")

# The toy InternImage of `:smoke+internimage` (and of the tests): InternImage-XL's structure
# (post-norm, layer scale, offset scale 2, 16 channels per DCNv3 group) at width 16, 5 blocks.
INTERN_IMAGE_SMOKE = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))


def finetune_options(arg) -> set:
  """The ':arg' options of a finetune config (configs/finetune/*.py):

  smoke   a tiny ViT+RVSA (3 blocks of width 64, patch 8, block 2 global) at 64 px (change
          detection: at the release's tile size unless data.resize), batch 8,
          30 steps, lr 1e-3, no RandAugment, the task's toy sizes (`Task.smoke`: UperNet of 32
          channels, UNet decoder 64/32/32/16, an Oriented R-CNN or Faster R-CNN of 32/64
          channels with 2 x stride anchors (RetinaNet: 2 stacked convs, octave base 1)) and 32
          objects per image,
          slide windows of 64 px every 48 on the dataset's own canvas: checks a dataset's whole
          pipeline in minutes on a CPU
  frozen  the encoder frozen (model.freeze_encoder): linear probing / frozen-backbone finetuning
  internimage  InternImage-XL instead of ViT-B + RVSA, with its recipe (docs/fidelity.md): drop
          path 0.2, lr 2e-5 for classification, segmentation and change detection (detection
          keeps its 1e-4: the original gives InternImage no other), and no layer decay.
          Deliberate, as the original: its finetune configs ask for 0.94 over the 39 blocks, but
          their optimizer constructor (a copy of pretraining's) matches only the pretraining
          names `encoder.patch_embed` / `encoder.levels`, so every finetune parameter
          (`backbone.*`) gets lr scale 1. `--set optimizer.layer_decay=0.94` applies the decay
          for real;
          start it from an InternImage pretraining workdir (model.encoder_init). With smoke, a
          toy InternImage (INTERN_IMAGE_SMOKE) at the smoke's lr
  """
  options = set(filter(None, (arg or "").split("+")))
  unknown = options - set(FINETUNE_OPTIONS)
  if unknown:
    raise ValueError(f"unknown option(s) {sorted(unknown)}; known: {', '.join(FINETUNE_OPTIONS)}")
  return options


def apply_finetune_options(c, options: set):
  """`c` with the finetune options applied (see finetune_options)."""
  enabled = {n: tasks_lib.TASKS[n] for n in tasks_lib.enabled(c)}
  objects = any(t.objects for t in enabled.values())   # detection
  if "internimage" in options:
    c.model.encoder = "intern_image_xl"
    if "global_rel_pos" in c.model.encoder_overrides:   # a ViT+RVSA keyword
      del c.model.encoder_overrides["global_rel_pos"]
    c.model.drop_path_rate = 0.2
    c.optimizer.layer_decay = 1.0   # Deliberate: the original's 0.94 matched no finetune name
    if not objects:
      c.optimizer.lr = 2e-5
  if "smoke" in options:
    # Change-detection pairs are evaluated whole: the smoke keeps the release's tile size, or
    # resizes them (data.resize) to 64.
    native = any(t.native_size for t in enabled.values())
    c.data.image_size = c.data.image_size if native and not c.data.get("resize") else 64
    if c.data.get("resize"):
      c.data.resize = 64
    c.data.batch_per_subset = 8
    c.data.shuffle_window = 64
    c.data.rand_augment = 0   # 30 steps learn too little through it; its ops have their own tests
    if "internimage" in options:
      c.model.encoder_overrides.update(INTERN_IMAGE_SMOKE)
    else:
      c.model.encoder = "vit_t_rvsa"
      c.model.encoder_overrides.update(dict(embed_dim=64, depth=3, num_heads=2, patch_size=8,
                                            out_indices=(0, 1, 2, 2)))
    c.model.drop_path_rate = 0.1
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 3
    c.optimizer.epoch_steps = 3 if c.optimizer.epoch_steps else 0   # 10 epochs of 3 steps
    c.train.num_steps = 30
    c.train.log_every = 5
    c.train.checkpoint_every = 1_000
    c.eval.batch_per_subset = 8
    c.eval.every_steps = 0
    c.eval.report_images = 3
    for name, task in enabled.items():   # the task's toy sizes (heads for the 64-px images)
      c.tasks[name].update(task.smoke)
    if objects:   # 32 objects per image, the step decays inside 30 steps
      (subset,) = c.data.subsets
      c.data.max_instances[subset] = 32
      c.optimizer.decay_steps = (20, 27) if c.optimizer.schedule == "step" else ()
    if c.eval.slide_window:   # slide windows of the smoke's input size, on the dataset's canvas
      c.eval.slide_window, c.eval.slide_stride = 64, 48
  if "frozen" in options:
    c.model.freeze_encoder = True
  return c
