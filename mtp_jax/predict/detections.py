"""Detections of a scene from its tiles: shifted to scene pixels, pooled, and merged across tiles.

Each tile's valid detections (score over the head's test threshold, fixed-size outputs of
Task.predict_outputs) move to scene pixels by the tile's top-left corner. Objects inside an
overlap are found by several tiles, and objects across a tile border partly by each: per class,
greedy NMS by descending score over the whole scene keeps one. Rotated boxes: exact rotated IoU
> 0.1 suppresses (mmrotate's merge of DOTA patches, `mtp_jax.metrics.patch_merge`); horizontal
boxes: IoU > 0.5 (mmdet's test-time NMS). Host memory: the pooled valid detections (28 bytes
each for rotated boxes), never a tile.

Instance segmentation's masks (the heads' (K, 28, 28) probabilities in box frames) are pasted
into the tile as mmdet pastes them (`mtp_jax.metrics.mask_paste`, threshold 0.5) and kept as the
polygon of their largest outer contour (through the boundary pixels' centres, in scene pixels),
which follows its box through the merge.
"""

import cv2
import numpy as np

from mtp_jax.metrics.mask_paste import paste_masks
from mtp_jax.metrics.patch_merge import MERGE_IOU, greedy_nms, nms_rotated_host

HBOX_MERGE_IOU = 0.5


def nms_horizontal_host(boxes: np.ndarray, scores: np.ndarray, iou_thr: float) -> np.ndarray:
  """Kept indices of greedy NMS on (N, 4) x1, y1, x2, y2 by descending score (ties: input order);
  areas as (x2 - x1) * (y2 - y1) (mmcv's nms without the +1 offset)."""
  boxes = boxes.astype(np.float64)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

  def suppressed(i, rest):
    iw = np.clip(np.minimum(boxes[rest, 2], boxes[i, 2]) - np.maximum(boxes[rest, 0], boxes[i, 0]), 0, None)
    ih = np.clip(np.minimum(boxes[rest, 3], boxes[i, 3]) - np.maximum(boxes[rest, 1], boxes[i, 1]), 0, None)
    inter = iw * ih
    return rest[inter / np.maximum(area[i] + area[rest] - inter, 1e-12) > iou_thr]
  return greedy_nms(scores, suppressed)


def mask_polygon(mask: np.ndarray):
  """(N, 2) float x, y of the largest outer contour of a boolean mask (pixel centres), or None."""
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  if not contours:
    return None
  best = max(contours, key=cv2.contourArea)
  if len(best) < 3:
    return None
  return best.reshape(-1, 2).astype(np.float64) + 0.5


class DetectionMerger:
  """kind: "rboxes" (le90 cx, cy, w, h, angle) or "hboxes" (x1, y1, x2, y2), scene pixels."""

  def __init__(self, kind: str, num_classes: int, iou_thr: float | None = None, tile_size: int = 0):
    """tile_size: the tiles' side in pixels (where instance masks are pasted)."""
    if kind not in ("rboxes", "hboxes"):
      raise ValueError(f"kind {kind!r} is not 'rboxes' or 'hboxes'")
    self.kind, self.num_classes, self.tile_size = kind, num_classes, tile_size
    self.iou_thr = iou_thr if iou_thr is not None else (MERGE_IOU if kind == "rboxes" else HBOX_MERGE_IOU)
    self._boxes, self._scores, self._labels, self._polygons = [], [], [], []

  def add(self, tile, outputs: dict, index: int):
    """Row `index` of a tile batch's outputs ({kind: (n, K, d), scores, labels, valid})."""
    valid = np.asarray(outputs["valid"][index], bool)
    boxes = np.asarray(outputs[self.kind][index], np.float64)[valid].copy()
    if "masks" in outputs:   # instance masks: pasted in the tile, kept as polygons in scene pixels
      size = self.tile_size or outputs["masks"].shape[-1]
      masks = paste_masks(np.asarray(outputs["masks"][index], np.float32)[valid],
                          np.asarray(outputs[self.kind][index], np.float32)[valid], size, size)
      for m in masks:
        polygon = mask_polygon(m)
        self._polygons.append(None if polygon is None else polygon + [tile.x, tile.y])
    if self.kind == "rboxes":
      boxes[:, 0] += tile.x
      boxes[:, 1] += tile.y
    else:
      boxes[:, [0, 2]] += tile.x
      boxes[:, [1, 3]] += tile.y
    self._boxes.append(boxes)
    self._scores.append(np.asarray(outputs["scores"][index], np.float64)[valid])
    self._labels.append(np.asarray(outputs["labels"][index], np.int64)[valid])

  def pooled(self) -> dict:
    """Every tile's detections in scene pixels, before merging."""
    d = 5 if self.kind == "rboxes" else 4
    out = {"boxes": np.concatenate(self._boxes) if self._boxes else np.zeros((0, d)),
           "scores": np.concatenate(self._scores) if self._scores else np.zeros((0,)),
           "labels": np.concatenate(self._labels) if self._labels else np.zeros((0,), np.int64)}
    if self._polygons:
      out["polygons"] = np.empty(len(self._polygons), dtype=object)
      out["polygons"][:] = self._polygons
    return out

  def result(self) -> dict:
    """{"boxes", "scores", "labels"[, "polygons"]} merged per class, by descending score, and
    "before_merge": how many tile detections were pooled."""
    pooled = self.pooled()
    keep = []
    for c in range(self.num_classes):
      idx = np.flatnonzero(pooled["labels"] == c)
      if not len(idx):
        continue
      if self.kind == "rboxes":
        dets = np.concatenate([pooled["boxes"][idx], pooled["scores"][idx, None]], 1)
        kept = nms_rotated_host(dets, self.iou_thr)
      else:
        kept = nms_horizontal_host(pooled["boxes"][idx], pooled["scores"][idx], self.iou_thr)
      keep.append(idx[kept])
    keep = np.concatenate(keep) if keep else np.zeros((0,), np.int64)
    keep = keep[np.argsort(-pooled["scores"][keep], kind="stable")]
    return {**{k: v[keep] for k, v in pooled.items()}, "before_merge": len(pooled["scores"])}
