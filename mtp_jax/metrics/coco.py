"""COCO box and mask AP through pycocotools' COCOeval (not re-implemented).

Used for instance segmentation (MTP pretraining's `is` task: segm AP) and horizontal detection
(DIOR, Xview: AP50, MTP_SPEC.md §5.2). Inputs are plain arrays in DESIGN.md conventions:

  annotations[i] = {"hboxes": (M, 4) x1, y1, x2, y2 pixels, "labels": (M,) in [0, C),
                    "masks": optional (M, H, W) binary, "iscrowd": optional (M,) bool,
                    "height": H, "width": W}
  detections[i]  = {"hboxes": (N, 4), "scores": (N,), "labels": (N,), "masks": optional (N, H, W)}

Conventions (as mmdet's CocoMetric): category id = label + 1; a ground-truth area is its mask
area when masks are given, else its box area (COCOeval's small/medium/large split uses it); boxes
go to COCO as [x, y, w, h]; at most `max_dets` (100) detections per image are scored. Per-class AP
is the mean of COCOeval's precision over IoU 0.50:0.95, recall and the class (area all, 100 dets).
"""

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mtp_jax.metrics.per_image import PerImageEvaluator

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _rle(mask) -> dict:
  rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle


def _xywh(box) -> list:
  x1, y1, x2, y2 = (float(v) for v in box)
  return [x1, y1, x2 - x1, y2 - y1]


def to_coco(detections, annotations, num_classes: int, iou_type: str = "bbox"):
  """(ground-truth dataset dict, result list) in COCO json form; image id = index + 1."""
  images, gts, results = [], [], []
  for i, ann in enumerate(annotations):
    image_id = i + 1
    images.append({"id": image_id, "height": int(ann["height"]), "width": int(ann["width"])})
    boxes = np.asarray(ann["hboxes"], np.float64).reshape(-1, 4)
    crowd = np.asarray(ann.get("iscrowd", np.zeros(len(boxes), bool)), bool).reshape(-1)
    for k, (box, label) in enumerate(zip(boxes, np.asarray(ann["labels"]).reshape(-1))):
      g = {"id": len(gts) + 1, "image_id": image_id, "category_id": int(label) + 1,
           "bbox": _xywh(box), "iscrowd": int(crowd[k])}
      if "masks" in ann:
        g["segmentation"] = _rle(ann["masks"][k])
        g["area"] = float(mask_utils.area(g["segmentation"]))
      else:
        g["area"] = float((box[2] - box[0]) * (box[3] - box[1]))
      if iou_type == "segm" and "segmentation" not in g:
        raise ValueError(f"coco_ap(iou_type='segm'): annotations[{i}] has no masks")
      gts.append(g)
  for i, det in enumerate(detections):
    boxes = np.asarray(det["hboxes"], np.float64).reshape(-1, 4)
    for k, (box, score, label) in enumerate(zip(boxes, np.asarray(det["scores"]).reshape(-1),
                                                np.asarray(det["labels"]).reshape(-1))):
      r = {"image_id": i + 1, "category_id": int(label) + 1, "score": float(score), "bbox": _xywh(box)}
      if iou_type == "segm":
        if "masks" not in det:
          raise ValueError(f"coco_ap(iou_type='segm'): detections[{i}] has no masks")
        r["segmentation"] = _rle(det["masks"][k])
      results.append(r)
  dataset = {"images": images, "annotations": gts,
             "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
  return dataset, results


def coco_ap(detections, annotations, num_classes: int, iou_type: str = "bbox", max_dets: int = 100,
            class_names=None, verbose: bool = False) -> dict:
  """COCOeval on the given arrays (module docstring). iou_type: 'bbox' or 'segm'.

  Returns {"AP", "AP50", ... (STAT_NAMES, fractions; -1 where COCOeval has no data),
  "ap_per_class": {name: AP}, "ap50_per_class": {name: AP50}}.
  """
  if iou_type not in ("bbox", "segm"):
    raise ValueError(f"coco_ap: iou_type must be 'bbox' or 'segm', not {iou_type!r}")
  if len(detections) != len(annotations):
    raise ValueError(f"coco_ap: {len(detections)} images of detections but {len(annotations)} of annotations")
  names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
  dataset, results = to_coco(detections, annotations, num_classes, iou_type)
  quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
  with quiet:
    gt = COCO()
    gt.dataset = dataset
    gt.createIndex()
    dt = gt.loadRes(results) if results else COCO()
    if not results:   # loadRes refuses an empty list; COCOeval scores no detections as AP 0
      dt.dataset = {"images": dataset["images"], "annotations": [], "categories": dataset["categories"]}
      dt.createIndex()
    ev = COCOeval(gt, dt, iou_type)
    ev.params.maxDets = [1, 10, max_dets]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  out = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
  precision = ev.eval["precision"]   # (iou thresholds, recall, class, area, max dets)
  per_class, per_class50 = {}, {}
  for k, name in enumerate(names):
    p, p50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]
    per_class[name] = float(p[p > -1].mean()) if np.any(p > -1) else float("nan")
    per_class50[name] = float(p50[p50 > -1].mean()) if np.any(p50 > -1) else float("nan")
  out["ap_per_class"], out["ap50_per_class"] = per_class, per_class50
  return out


class CocoEvaluator(PerImageEvaluator):
  """add(image_id, detection, annotation) per image (`coco_ap`'s per-image dicts), then
  result() -> `coco_ap`'s dict."""

  def __init__(self, num_classes: int, class_names=None, iou_type: str = "bbox", max_dets: int = 100):
    super().__init__()
    self.num_classes, self.iou_type, self.max_dets = num_classes, iou_type, max_dets
    self.class_names = class_names

  def result(self) -> dict:
    detections, annotations = self.columns() or ([], [])
    return coco_ap(detections, annotations, self.num_classes, self.iou_type, self.max_dets, self.class_names)
