"""Task `hd`: horizontal object detection (MTP_SPEC §5.2) with Faster R-CNN (DIOR) or RetinaNet
(Xview, `detector='retinanet'`: mtp_jax/models/heads/retinanet.py), its evaluation and report.

Faster R-CNN: MTP's Mask R-CNN box stages without the mask branch (mmdet faster_rcnn_r50_fpn: FPN 256,
RPN with DeltaXYWH, RoIAlign 7x7, Shared2FC 1024, class-specific DeltaXYWH), the two-stage
detector the pretraining tasks share (`mtp_jax/models/detection/two_stage.py`), with
`instance_segmentation.mask_rcnn_box_configs` and the R-CNN's low-quality matching off (MTP's
DIOR config). Ground truth per subset: `hboxes` (b, M_s, 4) x1, y1, x2, y2 pixels, `labels`
(b, M_s) object classes 0..C-1, `valid` (b, M_s). Loss components per subset, logged as
`hd/<subset>/{rpn_cls, rpn_bbox, cls, bbox}` (RetinaNet: `{cls, bbox}`, focal and L1).

Evaluation: COCO box AP through pycocotools (`mtp_jax.metrics.coco`), headline AP50 (mmdet's
`bbox_mAP_50`, the number MTP reports), at most 100 detections per image, against every object of
each evaluated image (the evaluation reader packs them all), in pixels of the evaluated image
(longer side resized to the input size). Objects flagged difficult count like the others (MTP's
DIOR evaluation goes through COCO files, which hold no such flag). The COCO gt and result files
are written to `<workdir>/report/coco/<subset>_{gt,bbox}.json`.
"""

import dataclasses
import os

import ml_collections
import numpy as np

from mtp_jax.metrics import drawing
from mtp_jax.metrics.coco import CocoEvaluator
from mtp_jax.models.detection.two_stage import TwoStageDetector
from mtp_jax.models.heads.retinanet import RETINA_ANCHORS, RetinaConfig, RetinaNet
from mtp_jax.parallel.sharding import local_rows
from mtp_jax.tasks.base import TwoStageDetectionTask
from mtp_jax.tasks.instance_segmentation import MASK_RCNN_PROPOSALS, mask_rcnn_box_configs

COCO_DIR = os.path.join("report", "coco")


class HorizontalDetection(TwoStageDetectionTask):
  name = "hd"
  title = "Horizontal detection (Faster R-CNN or RetinaNet)"
  headline_name = "box AP50"
  prediction = "hboxes"
  data_options = {"rotate_prob": "rotates detection images"}
  # A small Faster R-CNN (or RetinaNet), anchors of 2 x stride for the smoke's 64-px images.
  smoke = dict(neck_channels=32, fc_channels=64, anchor_scale=2.0, rpn_samples=64, train_pre_nms=256,
               train_proposals=128, test_pre_nms=256, test_proposals=128, rcnn_samples=64,
               max_candidates=1000, octave_base_scale=1.0, stacked_convs=2)

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """MTP's Faster R-CNN for DIOR (§5.2); the sizes are fields so that toy runs can shrink them.
    Final NMS at IoU 0.5 (max_detections 100)."""
    c = super().default_config()
    c.update(MASK_RCNN_PROPOSALS)
    c.update({
        "detector": "faster_rcnn",     # or 'retinanet' (its own: octave_base_scale, stacked_convs)
        "octave_base_scale": 4.0,      # RetinaNet anchors: side = this x 2^(i/3) x stride, i = 0, 1, 2
        "stacked_convs": 4,
    })
    return c

  @classmethod
  def check_config(cls, task_config):
    if task_config.detector not in ("faster_rcnn", "retinanet"):
      return f"detector {task_config.detector!r} is not 'faster_rcnn' or 'retinanet'"
    return super().check_config(task_config)

  def build_head(self, in_channels, *, rngs, dtype=None):
    t = self.task_config
    if t.detector == "retinanet":
      anchors = dataclasses.replace(RETINA_ANCHORS, scales=tuple(t.octave_base_scale * 2.0 ** (i / 3) for i in range(3)))
      cfg = RetinaConfig(anchors=anchors, stacked_convs=t.stacked_convs, max_per_img=t.max_detections)
      return RetinaNet(in_channels, self.num_classes, cfg=cfg, channels=t.neck_channels, rngs=rngs, dtype=dtype)
    rpn, roi = mask_rcnn_box_configs(self.task_config, match_low_quality=False)
    return TwoStageDetector(in_channels, self.num_classes, rpn=rpn, roi=roi, channels=t.neck_channels,
                            fc_channels=t.fc_channels, init=t.init, rngs=rngs, dtype=dtype)

  def fields(self, train: bool) -> tuple:
    return ("hboxes", "labels", "valid") if train else ()

  def head_gt(self, gt):
    return {"boxes": gt["hboxes"], "labels": gt["labels"], "valid": gt["valid"]}

  def evaluator(self):
    return _BoxEvaluation(self)

  def headline(self, result):
    return float(result["AP50"])

  def scalars(self, result):
    return {"ap50": result["AP50"], "ap": result["AP"], "ap75": result["AP75"]}

  def per_class(self, result):
    return "AP50", result["ap50_per_class"]

  def class_table(self, result):
    return ["AP50", "AP"], [result["ap50_per_class"], result["ap_per_class"]]

  def summary(self, result):
    return (f"Horizontal detection: COCO box AP50 {100 * result['AP50']:.2f} (AP {100 * result['AP']:.2f})"
            f" over {result['images']} images, {result['objects']} objects.")

  def paint(self, gt_panel, pred_panel, example, prediction):
    keep = example["valid"].astype(bool)
    gt_panel = drawing.draw_instances(gt_panel, example["hboxes"][keep], colour=(255, 255, 255))
    shown = prediction["valid"] & (prediction["scores"] >= self.task_config.report_score)
    pred_panel = drawing.draw_instances(pred_panel, prediction["hboxes"][shown], labels=prediction["labels"][shown])
    return gt_panel, pred_panel

  def write_outputs(self, workdir, evaluator):
    return evaluator.write_coco(os.path.join(workdir, COCO_DIR))


class _BoxEvaluation:
  """Per subset, a COCO box evaluator of the images this process evaluated, gathered at the end."""

  def __init__(self, task: HorizontalDetection):
    self.task = task
    self.evaluators = {s: CocoEvaluator(task.num_classes[s], task.class_names[s]) for s in task.subsets}
    self._gathered = False

  def add(self, sums: dict, per_image: dict, raw: dict):
    del sums
    for s, outputs in per_image.items():
      dets = {k: local_rows(v) for k, v in outputs.items()}
      ex = raw[s]
      h, w = ex["image"].shape[1:3]
      for i in np.flatnonzero(ex["is_real"]):
        keep = ex["valid"][i].astype(bool)
        shown = dets["valid"][i]
        self.evaluators[s].add(
            str(ex["image_id"][i]),
            {"hboxes": dets["hboxes"][i][shown].astype(np.float64), "scores": dets["scores"][i][shown],
             "labels": dets["labels"][i][shown]},
            {"hboxes": ex["hboxes"][i][keep].astype(np.float64), "labels": ex["labels"][i][keep],
             "height": h, "width": w})

  def results(self) -> dict:
    if not self._gathered:   # a collective: every process calls results() once
      for e in self.evaluators.values():
        e.gather()
      self._gathered = True
    out = {}
    for s, e in self.evaluators.items():
      out[s] = e.result()
      out[s]["images"] = len(e.images)
      out[s]["objects"] = int(sum(len(v[1]["labels"]) for v in e.images.values()))
    return out

  def write_coco(self, folder: str) -> dict:
    out = {}
    for s, e in self.evaluators.items():
      out.update(e.write_files(folder, s))
    return out
