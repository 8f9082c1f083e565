"""Detections on the patches of a large image merged back onto it (mmrotate 1.x `DOTAMetric`
with merge_patches=True), and the annotations they are scored against.

A patch's detections (le90 rotated boxes in pixels of the evaluated example) map to the source
image by undoing the evaluation resize (divide centre and sides by the example's patch_scale)
and adding the window's top-left corner (patch_origin); the angle is unchanged. All patches of
a source image are then pooled per class and reduced by greedy rotated NMS: by descending score
(ties in pooling order), a detection suppresses the later ones whose rotated IoU with it exceeds
`iou_thr` (0.1, mmrotate's merge threshold), exact IoU in float64 on the host
(`mtp_jax.ops.iou.box_iou_rotated`). The merged image is scored against the source image's whole
annotation (sources.json of the converted split), so objects that no patch held whole still count.
Ours: each ground-truth quadrilateral is scored as its minimum-area rectangle (the box training
sees, `quad_to_rbox_min_area`); the DOTA devkit intersects the quadrilateral itself. For the
rectangles of DIOR-R, FAIR1M and most of DOTA the two agree.
"""

import json
import os

import numpy as np

from mtp_jax.errors import DataError
from mtp_jax.ops.boxes import poly_to_hbox, quad_to_rbox_min_area, rbox_to_poly
from mtp_jax.ops.iou import box_iou_rotated

MERGE_IOU = 0.1


def to_source(dets: np.ndarray, origin, scale: float) -> np.ndarray:
  """(N, 6) [cx, cy, w, h, angle, score] in example pixels -> the same in source pixels."""
  out = np.array(dets, np.float64).reshape(-1, 6)
  out[:, :4] /= float(scale)
  out[:, :2] += np.asarray(origin, np.float64)
  return out


def greedy_nms(scores: np.ndarray, suppressed) -> np.ndarray:
  """Kept indices of greedy NMS by descending score (ties: input order): each kept index i drops
  the later live indices `suppressed(i, rest)` returns (a subset of `rest`)."""
  order = np.argsort(-np.asarray(scores), kind="stable")
  alive = np.ones(len(order), bool)
  keep = []
  for rank, i in enumerate(order):
    if not alive[i]:
      continue
    keep.append(i)
    rest = order[rank + 1:]
    alive[suppressed(i, rest[alive[rest]])] = False
  return np.asarray(keep, np.int64)


def nms_rotated_host(dets: np.ndarray, iou_thr: float = MERGE_IOU) -> np.ndarray:
  """Indices of the kept rows of (N, 6) detections, by descending score (module docstring)."""
  dets = np.asarray(dets, np.float64).reshape(-1, 6)
  hboxes = poly_to_hbox(rbox_to_poly(dets[:, :5]))

  def suppressed(i, rest):
    near = rest[(np.minimum(hboxes[rest, 2], hboxes[i, 2]) > np.maximum(hboxes[rest, 0], hboxes[i, 0]))
                & (np.minimum(hboxes[rest, 3], hboxes[i, 3]) > np.maximum(hboxes[rest, 1], hboxes[i, 1]))]
    if not len(near):
      return near
    iou = box_iou_rotated(np.repeat(dets[i:i + 1, :5], len(near), 0), dets[near, :5], aligned=True)
    return near[iou > iou_thr]
  return greedy_nms(dets[:, 5], suppressed)


def merge_patches(patches, num_classes: int, iou_thr: float = MERGE_IOU) -> dict:
  """patches: iterable of (source id, [(N_c, 6) per class] in source pixels), in a fixed order.
  Returns {source id: [(K_c, 6) per class]}, each class reduced by `nms_rotated_host`."""
  pooled = {}
  for source, per_class in patches:
    pooled.setdefault(source, [[] for _ in range(num_classes)])
    for c, d in enumerate(per_class):
      pooled[source][c].append(np.asarray(d, np.float64).reshape(-1, 6))
  out = {}
  for source, per_class in pooled.items():
    merged = []
    for parts in per_class:
      d = np.concatenate(parts) if parts else np.zeros((0, 6))
      merged.append(d[nms_rotated_host(d, iou_thr)] if len(d) else d)
    out[source] = merged
  return out


def load_sources(split_dir: str) -> dict:
  """{source id: {"rboxes" (M, 5) le90, "labels" (M,), "difficult" (M,) bool}} of a split cut
  into patches (sources.json, written by the converter)."""
  path = os.path.join(split_dir, "sources.json")
  if not os.path.isfile(path):
    raise DataError(f"{path} is missing: merging patch detections needs the source images' "
                    "annotations, which the converter writes for releases cut into patches "
                    "(reconvert, or set tasks.rd.merge_patches=False)")
  with open(path) as f:
    sources = json.load(f)
  out = {}
  for source, a in sources.items():
    polys = np.asarray(a["polygons"], np.float64).reshape(-1, 4, 2)
    out[source] = {"rboxes": quad_to_rbox_min_area(polys), "labels": np.asarray(a["labels"], np.int64),
                   "difficult": np.asarray(a["difficult"], np.int64) != 0,
                   "width": a["width"], "height": a["height"]}
  return out
