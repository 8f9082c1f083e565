"""Semantic-segmentation confusion matrix and IoU (host side, numpy)."""

import numpy as np


def confusion_matrix(labels, preds, num_classes: int, ignore_index: int = 255) -> np.ndarray:
  """(C, C) int64 counts, rows = ground truth, columns = prediction; `ignore_index` pixels skipped."""
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  preds = np.asarray(preds).reshape(-1).astype(np.int64)
  keep = labels != ignore_index
  return np.bincount(labels[keep] * num_classes + preds[keep],
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf: np.ndarray) -> dict:
  """Per-class IoU (NaN for classes absent from both labels and predictions), mIoU, overall accuracy."""
  tp = np.diag(conf).astype(np.float64)
  union = conf.sum(0) + conf.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
  total = conf.sum()
  return {"iou": iou, "miou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
          "accuracy": float(tp.sum() / total) if total else float("nan")}
