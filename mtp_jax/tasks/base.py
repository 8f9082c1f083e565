"""The task protocol: everything one task owns, in one place (DESIGN.md §3.1).

A task (pretraining: ss, is, rd; finetuning: cls, cd, hd) is a subclass of `Task` in its own
module. It has two faces, each read by its own side of the system:
- `TaskModel`, facing the model, the step and prediction: its head (`build_head`: shared trunk +
  per-subset predictors), the example fields it reads on the device (`fields`), its loss
  components (`losses`), and its device outputs for evaluation (`eval_outputs`) and prediction
  (`predict_outputs`);
- `TaskEvaluation`, facing evaluation and the report: its host-side evaluator, headline, scalars,
  per-class table, report text and pictures, and result files.
`Task` adds its config block (`default_config`, `check_config`) and what it declares to the rest
of the system instead of being asked by name (`pretraining`, `dates`, `objects`, `native_size`,
`data_options`, `smoke`). A task is built from the config blocks it reads (`config.tasks[name]`,
`config.data`, `config.eval`), never the whole tree. The model, the step, evaluation, the report,
the config and the recipes iterate over the enabled tasks and name none of them.

Batch layout on the device (mtp_jax/train/batching.py): images of all subsets interleaved,
(b*G, S, S, 3) with image i of subset g at row i*G + g, so the encoder runs once; ground truth
per subset, `{subset: {field: (b, ...)}}`, each array sharded on its batch axis (subsets may pad
to different instance counts M_s). Encoder features keep the interleaved rows; a head takes a
subset's rows with `mtp_jax.models.interleave.subset_rows`.

Class counts: `num_classes[subset]` is always the number of OBJECT classes, never counting
background; `mtp_jax.models.classes.with_background` is the one place that adds it.
"""

import ml_collections

from mtp_jax.models.classes import with_background  # noqa: F401 (re-exported by mtp_jax.tasks)


class TaskModel:
  """What a task gives the model, the step and prediction: its head, the example fields it reads on
  the device, its losses and its device outputs (for evaluation and for prediction).

  name: the key under config.tasks and in metric names (`<name>/<subset>/<component>`).
  needs_masks: the input pipeline must decode instance masks (costly, so only when a task asks).
  """

  name = ""
  needs_masks = False   # the reader decodes instance masks (mask_crops, mask_rles) for this task
  multi_scale = True    # reads the encoder's fpn outputs (strides 4-32); False: the raw stride-16 maps

  def build_head(self, in_channels, *, rngs, dtype=None):
    """The head module (shared trunk + per-subset predictors) on the encoder's 4 feature maps."""
    raise NotImplementedError

  def fields(self, train: bool) -> tuple:
    """Example fields (data_pipelines/samrs/reader.py) this task reads on the device."""
    raise NotImplementedError

  def normalizers(self, gt: dict) -> dict:
    """Whole-batch loss normalisers computed before the batch is split into micro-batches
    ({} when the task normalises inside its own loss, as the R-CNN heads do)."""
    del gt
    return {}

  def losses(self, head, features, gt: dict, *, train: bool, key, normalizers: dict) -> dict:
    """{'<subset>/<component>': unweighted scalar}; features: the encoder's 4 interleaved maps."""
    raise NotImplementedError

  def eval_outputs(self, head, features, gt: dict, image_size):
    """(sums, per_image): sums are reduced over the global batch (replicated on every device),
    per_image leaves have the batch as their first axis ({subset: (b, ...)}, sharded)."""
    raise NotImplementedError

  # Tasks with per-pixel outputs can be evaluated by slide inference (mtp_jax/models/slide.py):
  # they set `slides` and implement dense_logits / eval_from_logits, with
  # eval_outputs = eval_from_logits(dense_logits(...)).
  slides = False

  def dense_logits(self, head, features, image_size) -> dict:
    """{subset: (b, H, W, K) logits at image_size} (slides only)."""
    raise NotImplementedError

  def eval_from_logits(self, logits: dict, gt: dict):
    """(sums, per_image) of eval_outputs from dense logits {subset: (b, H, W, K)} (slides only)."""
    raise NotImplementedError

  # Prediction (python -m mtp_jax.predict: tiles of large scenes, mtp_jax/predict/) ----------
  # What the task's per-tile output is, so that the scene tiler knows how to merge tiles:
  #   "dense"   {subset: (b, S, S, K) float32 logits at the tile size}, averaged in overlaps;
  #   "rboxes"  {subset: {"rboxes" (b, N, 5) le90, "scores", "labels", "valid" (b, N)}}, merged
  #             by rotated NMS across tiles (likewise "hboxes" (b, N, 4) x1, y1, x2, y2, and
  #             instance segmentation's "masks" (b, N, 28, 28) probabilities in box frames);
  #   "label"   {subset: (b, C) class probabilities}, one per tile.
  prediction = ""

  def predict_outputs(self, head, features, image_size) -> dict:
    """Per-tile outputs of `prediction`'s kind (above); no ground truth, fixed shapes."""
    raise NotImplementedError


class TaskEvaluation:
  """What a task gives evaluation and the report: its host-side evaluator, its numbers (headline,
  scalars, per-class table), report text and pictures, and its result files.

  title: what it is, for messages. headline_name: its headline metric, for tables.
  Both faces read what `Task.__init__` sets (subsets, class_names, num_classes, the config blocks):
  they are the two halves of one task object, not objects of their own.
  """

  title = ""
  headline_name = ""

  def evaluator(self):
    """A fresh host-side evaluator: add(sums, per_image, raw) per batch, with the eval step's
    global outputs (per_image batch-sharded: take this process's rows with
    `sharding.local_rows`, which line up with `raw`, this process's host batches {subset:
    example arrays}); results() -> {subset: result}, a collective every process calls once."""
    raise NotImplementedError

  def headline(self, result: dict) -> float:
    raise NotImplementedError

  def scalars(self, result: dict) -> dict:
    """{metric: value} written as eval/<subset>/<task>/<metric> (the headline first)."""
    raise NotImplementedError

  def per_class(self, result: dict):
    """(label, {class name: value}) for the per-class table and bar chart, or None."""
    return None

  def class_table(self, result: dict):
    """(column headers, [{class name: value} per column]) of the report's per-class table."""
    per_class = self.per_class(result)
    return ([per_class[0]], [per_class[1]]) if per_class else None

  def summary(self, result: dict) -> str:
    """One line of report text under the subset's heading."""
    return f"{self.title}: {self.headline_name} {100 * self.headline(result):.2f}."

  def report_pictures(self, subset: str, result: dict) -> dict:
    """{name: (H, W, 3) uint8} extra pictures of this task (beyond the per-class bars)."""
    del subset, result
    return {}

  def paint(self, gt_panel, pred_panel, example: dict, prediction):
    """Draws this task's ground truth / prediction of one image onto the two report panels
    ((S, S, 3) uint8, returned as new arrays). prediction: this task's per-image outputs.
    Tasks paint in loss-sum order (ss, is, rd), starting from two copies of the image: a task
    whose output is a map (ss) replaces the panels, the others draw on top."""
    return gt_panel, pred_panel

  def write_outputs(self, workdir: str, evaluator) -> dict:
    """Writes task-specific result files (e.g. DOTA submissions) under workdir; {name: path}."""
    del workdir, evaluator
    return {}

  def output_names(self, subset: str) -> list:
    """Names of the outputs' classes (dense tasks: index k of the logits, background included)."""
    return list(self.class_names[subset])


class Task(TaskModel, TaskEvaluation):
  """Base class of a task: its two faces (TaskModel, TaskEvaluation), its config block and what it
  declares; subclasses set the class attributes and implement the methods."""

  # What the task declares to the rest of the system (config validation, the data checks, the
  # prediction tiler, the recipes in configs/), so that none of them names a task:
  pretraining = False   # one of MTP's pretraining tasks: its headline enters the MTP average (MTP_SPEC §3.6)
  dates = 1             # images per example (change detection: 2 dates of one place)
  objects = False       # examples carry object lists, at most data.max_instances per training image
  native_size = False   # examples enter at their converted size (padded, never resized) unless data.resize
  # {data key: what it does}: data settings only this task's datasets use; a dataset whose
  # tasks declare none of them must leave the key 0 (data_pipelines/sources.py check_bands).
  data_options = {}
  # Toy sizes of this task's config block for smoke runs (configs/recipes.py ':smoke').
  smoke = {}

  def __init__(self, task_config, data_config, eval_config, class_names: dict):
    """task_config: this task's block (`config.tasks[name]`); data_config, eval_config: the run's
    `config.data` and `config.eval` blocks; class_names: {subset: object class names} (no
    background), whose counts are num_classes[subset]."""
    self.task_config = task_config
    self.data_config = data_config
    self.eval_config = eval_config
    self.subsets = tuple(class_names)
    if self.subsets != tuple(data_config.subsets):
      raise ValueError(f"{self.name}: classes given for subsets {self.subsets}, but the batch "
                       f"interleaves data.subsets {tuple(data_config.subsets)} in that order")
    self.class_names = {s: list(n) for s, n in class_names.items()}
    self.num_classes = {s: len(n) for s, n in self.class_names.items()}

  # ---- config ----------------------------------------------------------------------------------
  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The task's config block: `enabled`, `weight` (1 in the original, MTP_SPEC §3.2) + its own."""
    return ml_collections.ConfigDict({"enabled": False, "weight": 1.0})

  @classmethod
  def check_config(cls, task_config) -> str | None:
    """'<key> ...: what is wrong' for an invalid value of this task's block, else None."""
    del task_config
    return None



class TwoStageDetectionTask(Task):
  """What the two-stage detection tasks (is: Mask R-CNN, rd: Oriented R-CNN) share: the `init`
  choice, the per-subset losses of a `TwoStageDetector` head (normalised by its own sample
  counts, so no batch-wide normalisers) and its fixed-size predictions, scored on the host (no
  ground truth on the device at evaluation). A subclass names its ground truth with `head_gt`."""

  objects = True

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The keys every two-stage detector's block has, with MTP's values (§3.3); a subclass adds
    its own and changes the values that differ."""
    c = super().default_config()
    c.update({
        "neck_channels": 256,          # FPN outputs (5 levels, strides 4..64)
        "anchor_scale": 8.0,           # anchor side = scale x stride (x ratio terms), mmdet's 8
        "fc_channels": 1024,           # Shared2FC
        "rpn_samples": 256,            # anchors sampled per image for the RPN loss (half positive)
        "rcnn_samples": 512,           # RoIs sampled per image (a quarter positive)
        "max_detections": 100,         # per image after the final NMS, score > 0.05
        "max_candidates": 10000,       # (proposal, class) pairs entering that NMS (static shapes)
        "init": "mtp",                 # 'mtp': the inits MTP really starts from; 'mmdet': init_cfg
        "report_score": 0.3,           # detections drawn in the report pictures
    })
    return c

  @classmethod
  def check_config(cls, task_config):
    if task_config.init not in ("mtp", "mmdet"):
      return f"init {task_config.init!r} is not 'mtp' or 'mmdet'"
    return None

  def head_gt(self, gt: dict) -> dict:
    """One subset's reader fields -> the head's ground truth {"boxes", "labels", "valid", ...}."""
    raise NotImplementedError

  def losses(self, head, features, gt, *, train, key, normalizers):
    del train, normalizers   # the R-CNN losses normalise by their own sample counts (avg_factor)
    size = (self.data_config.image_size,) * 2
    boxes = {s: self.head_gt(g) for s, g in gt.items()}
    per_subset = head.losses(features, boxes, subsets=self.subsets, image_size=size, key=key)
    return {f"{s}/{c}": v for s, parts in per_subset.items() for c, v in parts.items()}

  def eval_outputs(self, head, features, gt, image_size):
    del gt
    return {}, self.predict_outputs(head, features, image_size)

  def predict_outputs(self, head, features, image_size):
    return head.predict(features, subsets=self.subsets, image_size=tuple(image_size))
