"""Rotated-box detection mAP, DOTA task-1 protocol (DOTA_devkit `dota_evaluation_task1.voc_eval`).

Per class, over the whole dataset:
1. every detection of the class, from all images, sorted by score (descending; ties keep image
   order, then the order within the image: a stable sort, where the devkit's quicksort is not);
2. each detection is compared with the ground truth of the same image and class with the
   largest rotated IoU, among the objects whose enclosing horizontal box overlaps the detection's
   with positive width and height (the devkit's pre-filter, less its +1 pixel: the objects that
   only the +1 admits have IoU 0, so never match); the IoU is the exact one of
   `mtp_jax.ops.iou.box_iou_rotated`, on numpy float64 rboxes (one call per class, on the
   candidate pairs of all images, made before the matching);
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
from mtp_jax.ops.iou import box_iou_rotated


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


_PAIRS_PER_CALL = 1 << 16   # bounds the host IoU's working set (~0.6 kB a pair: 40 MiB)


def _hbox_overlap(hboxes1, hboxes2):
  """(N, 4), (M, 4) horizontal boxes (x1, y1, x2, y2) -> (N, M) bool: their intersection has
  positive width and height (the candidate pre-filter of the module docstring)."""
  h1, h2 = hboxes1[:, None, :], hboxes2[None, :, :]
  width = np.minimum(h1[..., 2], h2[..., 2]) - np.maximum(h1[..., 0], h2[..., 0])
  height = np.minimum(h1[..., 3], h2[..., 3]) - np.maximum(h1[..., 1], h2[..., 1])
  return (width > 0) & (height > 0)


def _pair_iou(rboxes1, rboxes2):
  """Exact IoU of corresponding (P, 5) float64 rboxes, a few `box_iou_rotated` calls in all."""
  chunks = [box_iou_rotated(rboxes1[k:k + _PAIRS_PER_CALL], rboxes2[k:k + _PAIRS_PER_CALL],
                            aligned=True) for k in range(0, len(rboxes1), _PAIRS_PER_CALL)]
  return np.concatenate(chunks + [np.zeros(0)])


def _first_best(pair_det, pair_gt, iou, num_dets):
  """Per detection, the largest IoU over its candidate pairs and that pair's object; equal maxima
  go to the lowest object index (the devkit's argmax). -inf and 0 for a detection without any."""
  best, best_j = np.full(num_dets, -np.inf), np.zeros(num_dets, np.int64)
  if len(iou) == 0:
    return best, best_j
  order = np.lexsort((pair_gt, -iou, pair_det))          # by detection, IoU down, object up
  dets = pair_det[order]
  first = order[np.r_[True, dets[1:] != dets[:-1]]]
  best[pair_det[first]], best_j[pair_det[first]] = iou[first], pair_gt[first]
  return best, best_j


def _candidate_pairs(det_hboxes, counts, gt_hboxes):
  """Pre-filtered (detection, object) pairs of the same image.

  det_hboxes: (D, 4) enclosing boxes of the detections, image after image, counts[i] of image i;
  gt_hboxes: per image, the (M_i, 4) enclosing boxes of its objects.
  Returns (pair_det (P,) indices into the D detections, pair_gt (P,) indices into the image's
  objects), detection-major with objects ascending.
  """
  starts = np.cumsum([0] + list(counts))
  found = [np.nonzero(_hbox_overlap(det_hboxes[start:stop], hboxes))
           for start, stop, hboxes in zip(starts[:-1], starts[1:], gt_hboxes)]
  pair_det = np.concatenate([d + start for (d, _), start in zip(found, starts)] + [np.zeros(0, int)])
  pair_gt = np.concatenate([g for _, g in found] + [np.zeros(0, int)])
  return pair_det, pair_gt


def _class_matches(c, detections, gt_rboxes, gt_hboxes, gt_labels):
  """Class c's detections of all images, concatenated in image order, with their best matches.

  The candidate pairs of every image are gathered first and their IoU is computed by one aligned
  `box_iou_rotated` call (numpy float64; `_pair_iou`), never once per pair.
  Returns (dets (D, 6), image_of (D,), best IoU (D,), best object (D,) as an index into the
  image's class-c objects, in_class: per image the indices of its class-c objects).
  """
  rows = [np.asarray(d[c], np.float64).reshape(-1, 6) for d in detections]
  in_class = [np.flatnonzero(lab == c) for lab in gt_labels]
  image_of = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
  dets = np.concatenate(rows + [np.zeros((0, 6))])
  pair_det, pair_gt = _candidate_pairs(poly_to_hbox(rbox_to_poly(dets[:, :5])), map(len, rows),
                                       [h[idx] for h, idx in zip(gt_hboxes, in_class)])
  class_rboxes = np.concatenate([r[idx] for r, idx in zip(gt_rboxes, in_class)] + [np.zeros((0, 5))])
  gt_starts = np.cumsum([0] + [len(idx) for idx in in_class])
  iou = _pair_iou(dets[pair_det, :5], class_rboxes[gt_starts[image_of[pair_det]] + pair_gt])
  best, best_j = _first_best(pair_det, pair_gt, iou, len(dets))
  return dets, image_of, best, best_j, in_class


def dota_map(detections, annotations, iou_thr: float = 0.5, use_07_metric: bool = True,
             num_classes: int | None = None) -> dict:
  """DOTA task-1 mAP (module docstring).

  detections[i][c]: (N, 6) array [cx, cy, w, h, angle, score] of image i and class c.
  annotations[i]: {"rboxes": (M, 5), "labels": (M,) ints in [0, C), "difficult": (M,) bool, optional}.
  num_classes: C, by default the length of detections[0].
  Per class, the IoU of every candidate (detection, object) pair of every image is one aligned
  `box_iou_rotated` call (numpy float64), made before the sequential matching over the sorted list.
  Returns {"map": float, "ap": (C,) per-class AP (NaN: no object), "num_objects": (C,) non-difficult
  object counts, "num_detections": (C,), "recall": (C,) final recall}.
  """
  num_classes = num_classes if num_classes is not None else (len(detections[0]) if detections else 0)
  _check_inputs(detections, annotations, num_classes)
  gt_rboxes, gt_labels, gt_difficult, gt_hboxes = [], [], [], []
  for ann in annotations:
    rboxes = np.asarray(ann["rboxes"], np.float64).reshape(-1, 5)
    gt_rboxes.append(rboxes)
    gt_hboxes.append(poly_to_hbox(rbox_to_poly(rboxes)))
    gt_labels.append(np.asarray(ann["labels"], np.int64).reshape(-1))
    gt_difficult.append(np.asarray(ann.get("difficult", np.zeros(len(rboxes), bool)), bool).reshape(-1))

  ap = np.full(num_classes, np.nan)
  num_objects = np.zeros(num_classes, np.int64)
  num_dets = np.zeros(num_classes, np.int64)
  final_recall = np.full(num_classes, np.nan)
  for c in range(num_classes):
    num_objects[c] = sum(int(np.sum((lab == c) & ~dif)) for lab, dif in zip(gt_labels, gt_difficult))
    dets, image_of, best, best_j, in_class = _class_matches(c, detections, gt_rboxes, gt_hboxes, gt_labels)
    num_dets[c] = len(dets)
    order = np.argsort(-dets[:, 5], kind="stable")
    matched = [np.zeros(len(idx), bool) for idx in in_class]
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for rank, d in enumerate(order):
      i, j = image_of[d], best_j[d]
      if best[d] > iou_thr:
        if gt_difficult[i][in_class[i][j]]:
          continue
        if matched[i][j]:
          fp[rank] = 1
        else:
          tp[rank], matched[i][j] = 1, True
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
            "num_detections": dict(zip(self.class_names, r["num_detections"].tolist())),
            "images": len(self.images)}
