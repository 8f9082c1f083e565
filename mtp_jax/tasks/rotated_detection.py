"""Task `rd`: Oriented R-CNN rotated object detection (MTP_SPEC §3.3, le90), its evaluation and
report.

Ground truth per subset: `rboxes` (b, M_s, 5) le90 (cx, cy, w, h, angle) pixels/radians y down,
`labels` (b, M_s) object classes 0..C-1, `rbox_valid` (b, M_s). The head (mtp_jax/models/heads/
oriented_rcnn.py) returns the four loss components of each subset, logged as
`rd/<subset>/{rpn_cls, rpn_bbox, cls, bbox}`.

Evaluation: DOTA task-1 mAP (VOC07 11-point, IoU > 0.5; `mtp_jax.metrics.dota_map`) per subset
over the evaluated split, against the FULL ground truth of each image (the evaluation reader
packs every instance, never the training cap); objects flagged difficult (finetuning releases)
are ignored, as the DOTA devkit does, unless `ignore_difficult` is False: DIOR-R's evaluation in
the original (mmrotate 1.x's DIORDataset) ignores none, so its config counts them. Detections and ground truth are in pixels of the evaluated
image (longer side resized to the training size, MTP_SPEC §3.4 validation).
With `merge_patches` (DOTA, cut into patches by the converter), each patch's detections are
mapped back onto its source image and merged by rotated NMS (IoU 0.1), and each source image is
scored against its whole annotation in source pixels (`mtp_jax.metrics.patch_merge`), the
protocol of mmrotate's merged DOTA evaluation and of the online server.
The DOTA Task1 submission is written per subset to `<workdir>/report/dota_task1/<subset>/`
(Task1_<class name>.txt and Task1.zip), and with `submission = 'fair1m'` also FAIR1M's XMLs to
`<workdir>/report/fair1m_xml/<subset>/` (mtp_jax/metrics/submissions.py): ids and pixels of the
source images when merged, else of the evaluated images.
"""

import dataclasses
import os

import ml_collections
import numpy as np

from mtp_jax.metrics import drawing, patch_merge, submissions
from mtp_jax.metrics.per_image import PerImageEvaluator
from mtp_jax.metrics.rotated_detection import DotaEvaluator
from mtp_jax.models.detection.roi_head import RoIConfig
from mtp_jax.models.detection.rpn import RPNConfig
from mtp_jax.models.heads.oriented_rcnn import OrientedRCNN
from mtp_jax.parallel.sharding import local_rows
from mtp_jax.tasks.base import TwoStageDetectionTask


class RotatedDetection(TwoStageDetectionTask):
  name = "rd"
  title = "Oriented R-CNN rotated detection"
  headline_name = "rotated mAP"
  prediction = "rboxes"
  pretraining = True
  data_options = {"rotate_prob": "rotates detection images"}
  # A small Oriented R-CNN, anchors of 2 x stride for the smoke's 64-px images.
  smoke = dict(neck_channels=32, fc_channels=64, anchor_scale=2.0, rpn_samples=64, train_proposals=256,
               test_proposals=256, rcnn_samples=64, max_detections=100, max_candidates=1000)

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """MTP's Oriented R-CNN (§3.3); the sizes are fields so that toy runs can shrink them."""
    c = super().default_config()
    c.update({
        "train_proposals": 2000,       # per level before NMS (0.8) and kept after it, training
        "test_proposals": 2000,        # the same at test time
        "max_detections": 2000,        # per image after rotated NMS (0.1), score > 0.05
        "merge_patches": False,        # score merged source images (datasets cut into patches)
        "submission": "dota",          # also write FAIR1M's XML submission: 'fair1m'
        "ignore_difficult": True,      # mAP ignores objects flagged difficult (DOTA devkit)
    })
    return c

  @classmethod
  def check_config(cls, task_config):
    if task_config.submission not in ("dota", "fair1m"):
      return f"submission {task_config.submission!r} is not 'dota' or 'fair1m'"
    return super().check_config(task_config)

  def _head_configs(self):
    """(RPNConfig, RoIConfig): MTP's Oriented R-CNN with this block's sizes."""
    t = self.task_config
    rpn = RPNConfig()
    rpn = dataclasses.replace(
        rpn, num_samples=t.rpn_samples, anchors=dataclasses.replace(rpn.anchors, scales=(t.anchor_scale,)),
        train_proposals=dataclasses.replace(rpn.train_proposals, nms_pre=t.train_proposals,
                                            max_per_img=t.train_proposals),
        test_proposals=dataclasses.replace(rpn.test_proposals, nms_pre=t.test_proposals,
                                           max_per_img=t.test_proposals))
    roi = dataclasses.replace(RoIConfig(), num_samples=t.rcnn_samples, max_per_img=t.max_detections,
                              max_candidates=t.max_candidates)
    return rpn, roi

  def build_head(self, in_channels, *, rngs, dtype=None):
    rpn, roi = self._head_configs()
    return OrientedRCNN(in_channels, self.num_classes, rpn=rpn, roi=roi,
                        channels=self.task_config.neck_channels,
                        fc_channels=self.task_config.fc_channels, init=self.task_config.init,
                        rngs=rngs, dtype=dtype)

  def fields(self, train: bool) -> tuple:
    # Evaluation needs no ground truth on the device: it is scored on the host.
    return ("rboxes", "labels", "rbox_valid") if train else ()

  def head_gt(self, gt):
    return {"boxes": gt["rboxes"], "labels": gt["labels"], "valid": gt["rbox_valid"]}

  # ---- evaluation ------------------------------------------------------------------------------
  def evaluator(self):
    return _DotaEvaluation(self)

  # ---- numbers and report ----------------------------------------------------------------------
  def headline(self, result):
    return float(result["map"])

  def scalars(self, result):
    return {"map": result["map"]}

  def per_class(self, result):
    return "AP", result["ap_per_class"]

  def summary(self, result):
    objects = sum(result["num_objects"].values())
    return (f"Rotated detection: DOTA mAP (VOC07, IoU 0.5) {100 * result['map']:.2f} over "
            f"{result['images']} images, {objects} objects.")

  def paint(self, gt_panel, pred_panel, example, prediction):
    keep = example["rbox_valid"].astype(bool)
    gt_panel = drawing.draw_rboxes(gt_panel, example["rboxes"][keep], colour=(255, 255, 255))
    shown = prediction["valid"] & (prediction["scores"] >= self.task_config.report_score)
    pred_panel = drawing.draw_rboxes(pred_panel, prediction["rboxes"][shown],
                                     labels=prediction["labels"][shown])
    return gt_panel, pred_panel

  def write_outputs(self, workdir, evaluator):
    return evaluator.write_submissions(os.path.join(workdir, "report"),
                                       fair1m=self.task_config.submission == "fair1m")

  # Official full-model keys (see SemanticSegmentation.official_keys).
  official_keys = (("neck", "rotdetdecoder.neck"), ("rpn_head", "rotdetdecoder.rpn_head"),
                   ("roi_head", "rotdetdecoder.roi_head.bbox_head"),
                   ("predictors/<s>/fc_cls", "rotdetroiboxhead_fc_cls<s>"),
                   ("predictors/<s>/fc_reg", "rotdetroiboxhead_fc_reg<s>"))


def detections_per_class(rboxes, scores, labels, valid, num_classes: int) -> list:
  """One image's fixed-size detections -> [(N_c, 6) [cx, cy, w, h, angle, score] per class]."""
  rboxes, scores, labels = np.asarray(rboxes, np.float64), np.asarray(scores), np.asarray(labels)
  valid = np.asarray(valid, bool)
  return [np.concatenate([rboxes[valid & (labels == c)], scores[valid & (labels == c)][:, None]], 1)
          for c in range(num_classes)]


class _DotaEvaluation:
  """Per subset, a DotaEvaluator of the images this process evaluated, gathered at the end; with
  merge_patches, of the source images their patches merge into (module docstring)."""

  def __init__(self, task: RotatedDetection):
    self.task = task
    self.merge = bool(task.task_config.merge_patches)
    self.ignore_difficult = bool(task.task_config.ignore_difficult)
    self.evaluators = {s: DotaEvaluator(task.num_classes[s], task.class_names[s]) for s in task.subsets}
    self.patches = {s: PerImageEvaluator() for s in task.subsets}
    self._gathered = False

  def add(self, sums: dict, per_image: dict, raw: dict):
    del sums
    for s, outputs in per_image.items():
      dets = {k: local_rows(v) for k, v in outputs.items()}
      ex = raw[s]
      for i in np.flatnonzero(ex["is_real"]):
        per_class = detections_per_class(dets["rboxes"][i], dets["scores"][i], dets["labels"][i],
                                         dets["valid"][i], self.task.num_classes[s])
        if self.merge:
          if "patch_origin" not in ex:
            raise ValueError(f"tasks.rd.merge_patches: the {s} examples carry no patch_origin "
                             "(not a dataset cut into patches)")
          moved = [patch_merge.to_source(d, ex["patch_origin"][i], ex["patch_scale"][i]) for d in per_class]
          self.patches[s].add(str(ex["image_id"][i]), str(ex["source_id"][i]), moved)
          continue
        keep = ex["rbox_valid"][i].astype(bool)
        annotation = {"rboxes": ex["rboxes"][i][keep].astype(np.float64), "labels": ex["labels"][i][keep]}
        if "difficult" in ex and self.ignore_difficult:
          annotation["difficult"] = ex["difficult"][i][keep]
        self.evaluators[s].add(str(ex["image_id"][i]), per_class, annotation)

  def _merge(self, s):
    """The gathered patches of subset s merged into its DotaEvaluator of source images."""
    split = self.task.eval_config.split
    sources = patch_merge.load_sources(os.path.join(self.task.data_config.dir, s, split))
    patches = self.patches[s]
    ordered = [patches.images[p] for p in sorted(patches.images)]
    merged = patch_merge.merge_patches(ordered, self.task.num_classes[s])
    for source in sorted(merged):
      if source not in sources:
        raise ValueError(f"patches of {source!r} were evaluated, but {s}/{split}/"
                         "sources.json does not hold that image")
      a = sources[source]
      keys = ("rboxes", "labels", "difficult") if self.ignore_difficult else ("rboxes", "labels")
      self.evaluators[s].add(source, merged[source], {k: a[k] for k in keys})

  def results(self) -> dict:
    if not self._gathered:   # a collective: every process calls results() once
      for s in self.task.subsets:
        if self.merge:
          self.patches[s].gather()
          self._merge(s)
        else:
          self.evaluators[s].gather()
      self._gathered = True
    return {s: e.result() for s, e in self.evaluators.items()}

  def write_submissions(self, folder: str, fair1m: bool = False) -> dict:
    """Per subset, the DOTA Task1 files and Task1.zip under `<folder>/dota_task1/<subset>` (and
    with fair1m the FAIR1M XMLs and test.zip under `<folder>/fair1m_xml/<subset>`) of the
    evaluated (merged) images (mtp_jax/metrics/submissions.py); {"<subset>": Task1 folder}."""
    out = {}
    for s, e in self.evaluators.items():
      images = {image_id: values[0] for image_id, values in e.images.items()}
      out[s] = os.path.dirname(submissions.write_dota_task1(os.path.join(folder, "dota_task1", s), images,
                                                            self.task.class_names[s]))
      if fair1m:
        submissions.write_fair1m_xml(os.path.join(folder, "fair1m_xml", s), images, self.task.class_names[s])
    return out
