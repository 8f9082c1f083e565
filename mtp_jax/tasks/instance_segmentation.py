"""Task `is`: Mask R-CNN instance segmentation (MTP_SPEC §3.3), its evaluation and report.

Ground truth per subset (reader fields): `hboxes` (b, M_s, 4) x1, y1, x2, y2 pixels, `labels`
(b, M_s) object classes 0..C-1, `valid` (b, M_s) (the box / mask is usable) and `mask_crops`
(b, M_s, R, R) uint8, each instance's mask cropped to its box (`mtp_jax/ops/mask_targets.py`;
full (M, S, S) masks would cost M x S x S bytes per image on the device). The head
(mtp_jax/models/heads/mask_rcnn.py) returns five loss components per subset, logged as
`is/<subset>/{rpn_cls, rpn_bbox, cls, bbox, mask}`.

Evaluation (§3.6): COCO bbox and segm AP (pycocotools COCOeval, IoU 0.50:0.95, 100 detections)
per subset over the valid split, against the FULL ground truth of each image (the evaluation
reader packs every instance; its masks come as COCO RLEs in the evaluated geometry, field
`mask_rles`). Each detection's 28x28 mask is pasted into the evaluated image on the host (mmdet
`_do_paste_mask`, threshold 0.5) and kept as an RLE. Boxes and masks are in pixels of the evaluated
image (longer side resized to the training size, MTP_SPEC §3.4 validation). The headline is segm
AP ("is mask AP", the number the MTP average uses). Per subset the standard COCO files are
written: `<workdir>/report/coco/<subset>_gt.json` (the full ground truth), `<subset>_bbox.json`
and `<subset>_segm.json` (results, image ids as in the gt file).
"""

import dataclasses
import os

import ml_collections
import numpy as np

from mtp_jax.metrics import drawing
from mtp_jax.metrics.coco import CocoEvaluator, coco_ap
from mtp_jax.metrics.mask_paste import masks_to_rles, paste_masks
from mtp_jax.models.detection.mask_head import MaskConfig
from mtp_jax.models.detection.roi_head import RoIConfig
from mtp_jax.models.detection.rpn import ProposalConfig, RPNConfig
from mtp_jax.models.heads.mask_rcnn import MaskRCNN
from mtp_jax.parallel.sharding import local_rows
from mtp_jax.tasks.base import TwoStageDetectionTask

COCO_DIR = os.path.join("report", "coco")

# The RPN proposals of MTP's Mask R-CNN box stages (mask_rcnn_box_configs), also Faster R-CNN's.
MASK_RCNN_PROPOSALS = {
    "train_pre_nms": 2000,         # RPN proposals per level before NMS (0.7), training
    "train_proposals": 1000,       # ... kept after it
    "test_pre_nms": 1000,          # the same at test time
    "test_proposals": 1000,
}


class InstanceSegmentation(TwoStageDetectionTask):
  name = "is"
  title = "Mask R-CNN instance segmentation"
  headline_name = "mask AP"
  prediction = "hboxes"
  needs_masks = True
  pretraining = True

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """MTP's Mask R-CNN (§3.3); the sizes are fields so that toy runs can shrink them. Final NMS
    at IoU 0.5 (max_detections 100)."""
    c = super().default_config()
    c.update(MASK_RCNN_PROPOSALS)
    c.mask_channels = 256              # FCN mask head convs
    return c

  def _head_configs(self):
    return mask_rcnn_box_configs(self.task_config)

  def build_head(self, in_channels, *, rngs, dtype=None):
    rpn, roi = self._head_configs()
    t = self.task_config
    return MaskRCNN(in_channels, self.num_classes, rpn=rpn, roi=roi,
                    mask=MaskConfig(conv_channels=t.mask_channels), channels=t.neck_channels,
                    fc_channels=t.fc_channels, init=t.init, rngs=rngs, dtype=dtype)

  def fields(self, train: bool) -> tuple:
    # Evaluation needs no ground truth on the device: it is scored on the host.
    return ("hboxes", "labels", "valid", "mask_crops") if train else ()

  def head_gt(self, gt):
    return {"boxes": gt["hboxes"], "labels": gt["labels"], "valid": gt["valid"],
            "mask_crops": gt["mask_crops"]}

  # ---- evaluation ------------------------------------------------------------------------------
  def evaluator(self):
    return _CocoEvaluation(self)

  # ---- numbers and report ----------------------------------------------------------------------
  def headline(self, result):
    return float(result["segm"]["AP"])

  def scalars(self, result):
    return {"mask_ap": result["segm"]["AP"], "mask_ap50": result["segm"]["AP50"],
            "bbox_ap": result["bbox"]["AP"], "bbox_ap50": result["bbox"]["AP50"]}

  def per_class(self, result):
    return "mask AP", result["segm"]["ap_per_class"]

  def class_table(self, result):
    return (["mask AP", "box AP"],
            [result["segm"]["ap_per_class"], result["bbox"]["ap_per_class"]])

  def summary(self, result):
    return (f"Instance segmentation: COCO mask AP {100 * result['segm']['AP']:.2f} "
            f"(AP50 {100 * result['segm']['AP50']:.2f}), box AP {100 * result['bbox']['AP']:.2f}"
            f" over {result['images']} images, {result['objects']} objects.")

  def paint(self, gt_panel, pred_panel, example, prediction):
    keep = example["valid"].astype(bool)
    size = gt_panel.shape[:2]
    gt_masks = _decode_rles(example["mask_rles"][keep], size) if "mask_rles" in example else None
    gt_panel = drawing.draw_instances(gt_panel, example["hboxes"][keep], gt_masks,
                                      colour=(255, 255, 255))
    shown = prediction["valid"] & (prediction["scores"] >= self.task_config.report_score)
    boxes = prediction["hboxes"][shown]
    masks = paste_masks(prediction["masks"][shown], boxes, *size, threshold=MaskConfig().mask_thr)
    pred_panel = drawing.draw_instances(pred_panel, boxes, masks, labels=prediction["labels"][shown])
    return gt_panel, pred_panel

  def write_outputs(self, workdir, evaluator):
    return evaluator.write_coco(os.path.join(workdir, COCO_DIR))

  # Official full-model keys (see SemanticSegmentation.official_keys).
  official_keys = (("neck", "inssegdecoder.neck"), ("rpn_head", "inssegdecoder.rpn_head"),
                   ("roi_head", "inssegdecoder.roi_head.bbox_head"),
                   ("mask_head", "inssegdecoder.roi_head.mask_head"),
                   ("predictors/<s>/fc_cls", "inssegroiboxhead_fc_cls<s>"),
                   ("predictors/<s>/fc_reg", "inssegroiboxhead_fc_reg<s>"),
                   ("mask_predictors/<s>/conv_logits", "inssegroimaskhead_conv<s>"))


def mask_rcnn_box_configs(t, **roi_overrides):
  """(RPNConfig, RoIConfig): MTP's Mask R-CNN box stages (§3.3) with the sizes of task block `t`
  (this task's, or Faster R-CNN's, which shares its fields); roi_overrides change the R-CNN."""
  rpn = RPNConfig.mask_rcnn()
  rpn = dataclasses.replace(
      rpn, num_samples=t.rpn_samples,
      anchors=dataclasses.replace(rpn.anchors, scales=(t.anchor_scale,)),
      train_proposals=ProposalConfig(t.train_pre_nms, t.train_proposals, 0.7, 0.0),
      test_proposals=ProposalConfig(t.test_pre_nms, t.test_proposals, 0.7, 0.0))
  roi = RoIConfig.mask_rcnn(num_samples=t.rcnn_samples, max_per_img=t.max_detections,
                            max_candidates=t.max_candidates, **roi_overrides)
  return rpn, roi


def _decode_rles(counts, size) -> np.ndarray:
  from pycocotools import mask as mask_utils
  if not len(counts):
    return np.zeros((0, *size), bool)
  rles = [{"size": list(size), "counts": c} for c in counts]
  return np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool)


class _CocoEvaluation:
  """Per subset, one COCO evaluator of the images this process evaluated (boxes and masks),
  gathered at the end and scored twice (bbox, segm)."""

  def __init__(self, task: InstanceSegmentation):
    self.task = task
    self.evaluators = {s: CocoEvaluator(task.num_classes[s], task.class_names[s]) for s in task.subsets}
    self._gathered = False

  def add(self, sums: dict, per_image: dict, raw: dict):
    del sums
    thr = MaskConfig().mask_thr
    for s, outputs in per_image.items():
      dets = {k: local_rows(v) for k, v in outputs.items()}
      ex = raw[s]
      size = ex["image"].shape[1:3]
      for i in np.flatnonzero(ex["is_real"]):
        keep = ex["valid"][i].astype(bool)
        annotation = {"hboxes": ex["hboxes"][i][keep].astype(np.float64),
                      "labels": ex["labels"][i][keep],
                      "rles": [{"size": list(size), "counts": c} for c in ex["mask_rles"][i][keep]],
                      "height": size[0], "width": size[1]}
        shown = dets["valid"][i]
        boxes = dets["hboxes"][i][shown].astype(np.float64)
        masks = paste_masks(dets["masks"][i][shown], boxes, *size, threshold=thr)  # probabilities
        detection = {"hboxes": boxes, "scores": dets["scores"][i][shown],
                     "labels": dets["labels"][i][shown], "rles": masks_to_rles(masks)}
        self.evaluators[s].add(str(ex["image_id"][i]), detection, annotation)

  def results(self) -> dict:
    if not self._gathered:   # a collective: every process calls results() once
      for e in self.evaluators.values():
        e.gather()
      self._gathered = True
    out = {}
    for s, e in self.evaluators.items():
      ids = sorted(e.images)
      detections, annotations = e.columns() or ([], [])
      out[s] = {t: coco_ap(detections, annotations, e.num_classes, t, e.max_dets, e.class_names,
                           image_ids=ids) for t in ("bbox", "segm")}
      out[s]["images"] = len(ids)
      out[s]["objects"] = int(sum(len(a["labels"]) for a in annotations))
    return out

  def write_coco(self, folder: str) -> dict:
    """The COCO gt / bbox / segm json files of every subset (module docstring); {name: path}."""
    out = {}
    for s, e in self.evaluators.items():
      out.update(e.write_files(folder, s))
    return out
