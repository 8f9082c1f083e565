"""Rotated-box detection mAP, DOTA task-1 protocol (DOTA_devkit `dota_evaluation_task1.voc_eval`).

Per class, over the whole dataset:
1. every detection of the class, from all images, sorted by score (descending; ties keep image
   order, then the order within the image: a stable sort, where the devkit's quicksort is not);
2. each detection is compared with the ground truth of the same image
   and class with the largest polygon IoU (exact intersection of the two rotated rectangles);
   IoU > `iou_thr` (strictly, as the devkit) and that object not matched before -> true positive;
   already matched -> false positive (a duplicate); IoU <= `iou_thr` -> false positive;
   best match a *difficult* object -> neither (difficult objects are ignored: they are not
   counted in the recall denominator and detecting them is not penalised);
3. precision/recall over the sorted list; AP = VOC07 11-point interpolated precision
   (`use_07_metric=True`, the DOTA default) or the VOC12 area under the monotone envelope.
mAP = mean AP over the classes that have at least one non-difficult object; a class without any
has AP NaN and is left out (mmrotate's `eval_rbbox_map` does the same).

Boxes are DESIGN.md's le90 rotated boxes: (cx, cy, w, h, angle) in pixels and radians, y down.
"""

import numpy as np

from mtp_jax.metrics.per_image import PerImageEvaluator
from mtp_jax.ops.boxes import poly_to_hbox, rbox_to_poly


# ----------------------------------------------------------------------------------------------
# Polygon IoU of two convex quadrilaterals
# ----------------------------------------------------------------------------------------------
def polygon_area(poly) -> float:
  """Shoelace area of a (K, 2) polygon (absolute value)."""
  x, y = poly[:, 0], poly[:, 1]
  return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _clip(subject: np.ndarray, a, b, orientation: float) -> np.ndarray:
  """Sutherland-Hodgman: the part of `subject` on the inner side of the directed edge a->b."""
  if len(subject) == 0:
    return subject
  side = orientation * ((b[0] - a[0]) * (subject[:, 1] - a[1]) - (b[1] - a[1]) * (subject[:, 0] - a[0]))
  out = []
  for i in range(len(subject)):
    p, q, sp, sq = subject[i], subject[(i + 1) % len(subject)], side[i], side[(i + 1) % len(subject)]
    if sp >= 0:
      out.append(p)
    if (sp >= 0) != (sq >= 0):
      out.append(p + (q - p) * (sp / (sp - sq)))
  return np.asarray(out, np.float64).reshape(-1, 2)


def convex_polygon_iou(p, q) -> float:
  """IoU of two convex polygons (K, 2) (any vertex order); 0 when the union has no area."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  area_p, area_q = polygon_area(p), polygon_area(q)
  if area_p <= 0 or area_q <= 0:
    return 0.0
  signed = np.dot(q[:, 0], np.roll(q[:, 1], -1)) - np.dot(q[:, 1], np.roll(q[:, 0], -1))
  inter = p
  for i in range(len(q)):
    inter = _clip(inter, q[i], q[(i + 1) % len(q)], np.sign(signed))
  area = polygon_area(inter) if len(inter) >= 3 else 0.0
  return float(area / (area_p + area_q - area))


# ----------------------------------------------------------------------------------------------
# AP from precision/recall
# ----------------------------------------------------------------------------------------------
def voc_ap(recall, precision, use_07_metric: bool = True) -> float:
  """VOC07 11-point AP (mean of the best precision at recall >= 0, 0.1, ..., 1) or VOC12 area AP."""
  recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
  if use_07_metric:
    points = [precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in np.arange(0.0, 1.1, 0.1)]
    return float(np.sum(points) / 11.0)
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.concatenate([[0.0], precision, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  changes = np.flatnonzero(mrec[1:] != mrec[:-1])
  return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


# ----------------------------------------------------------------------------------------------
# dota_map
# ----------------------------------------------------------------------------------------------
def _check_inputs(detections, annotations, num_classes):
  """One ValueError naming the image (and class) of the first malformed input."""
  if len(detections) != len(annotations):
    raise ValueError(f"dota_map: {len(detections)} images of detections but {len(annotations)} of annotations")
  for i, (dets, ann) in enumerate(zip(detections, annotations)):
    if len(dets) != num_classes:
      raise ValueError(f"dota_map: image {i} has detections for {len(dets)} classes, expected {num_classes}")
    for c, d in enumerate(dets):
      d = np.asarray(d)
      if d.size and (d.ndim != 2 or d.shape[1] != 6):
        raise ValueError(f"dota_map: detections[{i}][{c}] must be (N, 6) [cx, cy, w, h, angle, score], "
                         f"got shape {d.shape}")
    rboxes, labels = np.asarray(ann["rboxes"]), np.asarray(ann["labels"]).reshape(-1)
    if rboxes.size and (rboxes.ndim != 2 or rboxes.shape[1] != 5):
      raise ValueError(f"dota_map: annotations[{i}]['rboxes'] must be (M, 5), got shape {rboxes.shape}")
    rboxes = rboxes.reshape(-1, 5)
    if len(rboxes) != len(labels):
      raise ValueError(f"dota_map: annotations[{i}] has {len(rboxes)} rboxes but {len(labels)} labels")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
      raise ValueError(f"dota_map: annotations[{i}] has label {int(outside[0])} outside [0, {num_classes})")


def dota_map(detections, annotations, iou_thr: float = 0.5, use_07_metric: bool = True,
             num_classes: int | None = None) -> dict:
  """DOTA task-1 mAP (module docstring).

  detections[i][c]: (N, 6) array [cx, cy, w, h, angle, score] of image i and class c.
  annotations[i]: {"rboxes": (M, 5), "labels": (M,) ints in [0, C), "difficult": (M,) bool, optional}.
  num_classes: C, by default the length of detections[0].
  Returns {"map": float, "ap": (C,) per-class AP (NaN: no object), "num_objects": (C,) non-difficult
  object counts, "num_detections": (C,), "recall": (C,) final recall}.
  """
  num_classes = num_classes if num_classes is not None else (len(detections[0]) if detections else 0)
  _check_inputs(detections, annotations, num_classes)
  gt_polys, gt_labels, gt_difficult, gt_hboxes = [], [], [], []
  for ann in annotations:
    rboxes = np.asarray(ann["rboxes"], np.float64).reshape(-1, 5)
    polys = rbox_to_poly(rboxes)
    gt_polys.append(polys)
    gt_hboxes.append(poly_to_hbox(polys))
    gt_labels.append(np.asarray(ann["labels"], np.int64).reshape(-1))
    gt_difficult.append(np.asarray(ann.get("difficult", np.zeros(len(rboxes), bool)), bool).reshape(-1))

  ap = np.full(num_classes, np.nan)
  num_objects = np.zeros(num_classes, np.int64)
  num_dets = np.zeros(num_classes, np.int64)
  final_recall = np.full(num_classes, np.nan)
  for c in range(num_classes):
    num_objects[c] = sum(int(np.sum((lab == c) & ~dif)) for lab, dif in zip(gt_labels, gt_difficult))
    rows = [(i, np.asarray(d[c], np.float64).reshape(-1, 6)) for i, d in enumerate(detections)]
    image_of = np.concatenate([np.full(len(r), i) for i, r in rows]) if rows else np.zeros(0, int)
    dets = np.concatenate([r for _, r in rows]) if rows else np.zeros((0, 6))
    num_dets[c] = len(dets)
    order = np.argsort(-dets[:, 5], kind="stable")
    matched = [np.zeros(int(np.sum(lab == c)), bool) for lab in gt_labels]
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for rank, d in enumerate(order):
      i = image_of[d]
      in_class = np.flatnonzero(gt_labels[i] == c)
      best, best_j = -np.inf, -1
      if len(in_class):
        poly = rbox_to_poly(dets[d, :5])
        x1, y1, x2, y2 = poly_to_hbox(poly)
        boxes = gt_hboxes[i][in_class]
        overlap = ((np.minimum(boxes[:, 2], x2) - np.maximum(boxes[:, 0], x1) > 0)
                   & (np.minimum(boxes[:, 3], y2) - np.maximum(boxes[:, 1], y1) > 0))
        for j in np.flatnonzero(overlap):
          iou = convex_polygon_iou(poly, gt_polys[i][in_class[j]])
          if iou > best:
            best, best_j = iou, j
      if best > iou_thr:
        if gt_difficult[i][in_class[best_j]]:
          continue
        if matched[i][best_j]:
          fp[rank] = 1
        else:
          tp[rank], matched[i][best_j] = 1, True
      else:
        fp[rank] = 1
    if num_objects[c] == 0:
      continue
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / num_objects[c]
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap[c] = voc_ap(recall, precision, use_07_metric)
    final_recall[c] = recall[-1] if len(recall) else 0.0
  has_objects = num_objects > 0
  return {"map": float(np.mean(ap[has_objects])) if has_objects.any() else float("nan"), "ap": ap,
          "num_objects": num_objects, "num_detections": num_dets, "recall": final_recall}


class DotaEvaluator(PerImageEvaluator):
  """add(image_id, detections_per_class, annotation) per image (`dota_map`'s arguments), then
  result() -> {"map", "ap_per_class", "num_objects", "images"}."""

  def __init__(self, num_classes: int, class_names=None, iou_thr: float = 0.5, use_07_metric: bool = True):
    super().__init__()
    self.num_classes, self.iou_thr, self.use_07_metric = num_classes, iou_thr, use_07_metric
    self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]

  def result(self) -> dict:
    detections, annotations = self.columns() or ([], [])
    r = dota_map(detections, annotations, self.iou_thr, self.use_07_metric, self.num_classes)
    return {"map": r["map"], "ap_per_class": dict(zip(self.class_names, r["ap"].tolist())),
            "num_objects": dict(zip(self.class_names, r["num_objects"].tolist())),
            "images": len(self.images)}
