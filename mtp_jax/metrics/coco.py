"""COCO box and mask AP through pycocotools' COCOeval (not re-implemented).

Used for instance segmentation (an MTP pretraining task: segm AP) and horizontal detection
(DIOR, Xview: AP50, MTP_SPEC.md §5.2). Inputs are plain arrays in DESIGN.md conventions:

  annotations[i] = {"hboxes": (M, 4) x1, y1, x2, y2 pixels, "labels": (M,) in [0, C),
                    "masks": optional (M, H, W) binary, or "rles": optional M COCO RLEs,
                    "iscrowd": optional (M,) bool, "height": H, "width": W,
                    "image_id": optional str (the image's stem)}
  detections[i]  = {"hboxes": (N, 4), "scores": (N,), "labels": (N,),
                    "masks": optional (N, H, W), or "rles": optional N COCO RLEs}

An RLE is a dict {"size": [H, W], "counts": str | bytes (compressed) | list (uncompressed)} or the
compressed counts alone (str or bytes; the size is the image's). With RLEs, nothing dense is held
for more than one mask at a time, so a whole split's masks fit in memory.

Image ids: COCO ids are 1..N in sorted order of the images' own ids (the `image_ids` argument, else
every annotation's "image_id", else the list order), and "file_name" is that id as a string; the
numbering therefore does not depend on how images were split over processes (COCOeval breaks
score ties between images by id order, so this matters for AP).

Conventions (as mmdet's CocoMetric): category id = label + 1; a ground-truth area is its mask
area when masks are given, else its box area (COCOeval's small/medium/large split uses it); boxes
go to COCO as [x, y, w, h]; at most `max_dets` (100) detections per image are scored. Per-class AP
is the mean of COCOeval's precision over IoU 0.50:0.95, recall and the class (area all, 100 dets).
"""

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mtp_jax.metrics.coco_files import to_coco, write_coco_files
from mtp_jax.metrics.per_image import PerImageEvaluator

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_ap(detections, annotations, num_classes: int, iou_type: str = "bbox", max_dets: int = 100,
            class_names=None, verbose: bool = False, image_ids=None) -> dict:
  """COCOeval on the given arrays (module docstring). iou_type: 'bbox' or 'segm'; image_ids: the
  images' own ids (optional, `coco_image_ids`).

  Returns {"AP", "AP50", ... (STAT_NAMES, fractions; -1 where COCOeval has no data),
  "ap_per_class": {name: AP}, "ap50_per_class": {name: AP50}}.
  """
  if iou_type not in ("bbox", "segm"):
    raise ValueError(f"coco_ap: iou_type must be 'bbox' or 'segm', not {iou_type!r}")
  if len(detections) != len(annotations):
    raise ValueError(f"coco_ap: {len(detections)} images of detections but {len(annotations)} of annotations")
  names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
  dataset, results = to_coco(detections, annotations, num_classes, iou_type, names, image_ids)
  return coco_eval(dataset, results, iou_type, max_dets, names, verbose)


def coco_eval(dataset: dict, results: list, iou_type: str = "bbox", max_dets: int = 100, class_names=None,
              verbose: bool = False) -> dict:
  """`coco_ap`'s dict from COCO json objects (`to_coco`'s pair, or the same loaded from files)."""
  names = (list(class_names) if class_names is not None
           else [c["name"] for c in sorted(dataset["categories"], key=lambda c: c["id"])])
  # COCO.loadRes and COCOeval add keys to the dicts they are given ("area", "ignore" ...): copies
  dataset = {**dataset, "annotations": [dict(a) for a in dataset["annotations"]]}
  results = [dict(r) for r in results]
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
  """add(image_id, detection, annotation) per image (`coco_ap`'s per-image dicts; image_id: the
  image's own id, e.g. its file stem, which also numbers the COCO images), then result() ->
  `coco_ap`'s dict, or write_files(folder, subset) -> the COCO json files (`coco_files`)."""

  def __init__(self, num_classes: int, class_names=None, iou_type: str = "bbox", max_dets: int = 100):
    super().__init__()
    self.num_classes, self.iou_type, self.max_dets = num_classes, iou_type, max_dets
    self.class_names = class_names

  def result(self) -> dict:
    detections, annotations = self.columns() or ([], [])
    return coco_ap(detections, annotations, self.num_classes, self.iou_type, self.max_dets, self.class_names,
                   image_ids=sorted(self.images))

  def write_files(self, folder: str, subset: str) -> dict:
    """`coco_files.write_coco_files` of this evaluator's images; {name: path}."""
    ids = sorted(self.images)
    detections, annotations = self.columns() or ([], [])
    names = self.class_names if self.class_names is not None else [str(c) for c in range(self.num_classes)]
    return write_coco_files(folder, subset, ids, annotations, detections, names)
