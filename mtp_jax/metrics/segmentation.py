"""Confusion-matrix metrics: semantic segmentation, scene classification, change detection.

One accumulator serves all three: `ConfusionMatrix`, a CLU metric computed on device inside the
jitted evaluation step (rows = ground truth, columns = prediction). Under jit over a sharded batch
the counts are reduced across every device and process by XLA, so each process holds the global
matrix. Counts of one batch are int32 on device (a batch has < 2**31 pixels); merge them on the
host with `ConfusionMatrix.to_host()` (int64), since a whole dataset can exceed 2**31 pixels.

Protocols (mmseg `IoUMetric`, which MTP's segmentation and change-detection numbers come from):
- pixels whose label is `ignore_index` (255: padding) are skipped;
- SAMRS pretraining: background is class 0 (the uint8 +1 wrap, MTP_SPEC.md §3.4) and is a class
  like any other: it is in the matrix and in the mIoU;
- a class absent from both labels and predictions has IoU NaN and is left out of the mean;
- precision = TP / predicted, recall = TP / labelled, F1 = 2PR / (P + R) (mmseg `mFscore`),
  computed as 2TP / (labelled + predicted): a class that is labelled but never predicted (or
  predicted but never labelled) gets F1 0 where mmseg's 0/0 gives NaN.
"""

import flax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from mtp_jax.errors import DataError


def confusion_matrix(labels, preds, num_classes: int, ignore_index: int = 255) -> np.ndarray:
  """Host version of `ConfusionMatrix`: (C, C) int64, rows = ground truth, columns = prediction.

  Raises DataError for a label outside [0, C) that is not `ignore_index`.
  """
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  preds = np.asarray(preds).reshape(-1).astype(np.int64)
  keep = labels != ignore_index
  bad = keep & ((labels < 0) | (labels >= num_classes))
  if bad.any():
    raise DataError(f"{int(bad.sum())} label(s) outside [0, {num_classes}) and not the ignore "
                    f"index {ignore_index}, e.g. {int(labels[bad][0])}")
  return np.bincount(labels[keep] * num_classes + np.clip(preds[keep], 0, num_classes - 1),
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
  """CLU metric: `matrix` (C, C) counts and `bad_labels`, labels outside [0, C) (not ignored).

      batch = ConfusionMatrix.from_model_output(labels=y, predictions=p, num_classes=C)  # in jit
      total = batch.to_host() if total is None else total.merge(batch.to_host())
      scores = segmentation_scores(total.compute())
  """

  matrix: jnp.ndarray
  bad_labels: jnp.ndarray

  @classmethod
  def from_model_output(cls, *, labels, predictions, num_classes: int, ignore_index: int = 255,
                        mask=None, **_):
    """labels, predictions: integer arrays of one shape; mask (optional, broadcastable to it):
    False drops the element (e.g. padded images)."""
    labels = jnp.asarray(labels).astype(jnp.int32)
    keep = labels != ignore_index
    if mask is not None:
      keep = keep & jnp.broadcast_to(jnp.asarray(mask, bool).reshape(
          mask.shape + (1,) * (labels.ndim - jnp.ndim(mask))), labels.shape)
    in_range = (labels >= 0) & (labels < num_classes)
    preds = jnp.clip(jnp.asarray(predictions).astype(jnp.int32), 0, num_classes - 1)
    index = jnp.where(keep & in_range, labels * num_classes + preds, 0).reshape(-1)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(
        (keep & in_range).reshape(-1).astype(jnp.int32))
    return cls(matrix=counts.reshape(num_classes, num_classes),
               bad_labels=jnp.sum(keep & ~in_range).astype(jnp.int32))

  def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
    return type(self)(matrix=self.matrix + other.matrix, bad_labels=self.bad_labels + other.bad_labels)

  def to_host(self) -> "ConfusionMatrix":
    """The same counts as numpy int64 (for summing over a dataset)."""
    return type(self)(matrix=np.asarray(self.matrix, np.int64), bad_labels=np.asarray(self.bad_labels, np.int64))

  def compute(self) -> np.ndarray:
    """The (C, C) matrix; raises DataError if any label was outside [0, C)."""
    if int(self.bad_labels):
      raise DataError(f"{int(self.bad_labels)} label(s) outside [0, {self.matrix.shape[0]}) "
                      "that are not the ignore index")
    return np.asarray(self.matrix)


def _ratio(num, den):
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanmean(x) -> float:
  x = np.asarray(x, np.float64)
  return float(np.nanmean(x)) if np.any(~np.isnan(x)) else float("nan")


def segmentation_scores(conf) -> dict:
  """mmseg `IoUMetric` numbers of a (C, C) confusion matrix.

  Per class (arrays of C, NaN where undefined): iou, accuracy (= recall), precision, recall,
  fscore. Means: miou, macc, mfscore (NaN classes left out). overall_accuracy (aAcc) = correct
  pixels / all counted pixels.
  """
  conf = np.asarray(conf, np.int64)
  tp = np.diag(conf)
  labelled, predicted = conf.sum(1), conf.sum(0)
  iou = _ratio(tp, labelled + predicted - tp)
  precision, recall = _ratio(tp, predicted), _ratio(tp, labelled)
  fscore = _ratio(2 * tp, labelled + predicted)   # = 2PR / (P + R) wherever both are defined
  total = conf.sum()
  return {"iou": iou, "accuracy": recall, "precision": precision, "recall": recall, "fscore": fscore,
          "miou": _nanmean(iou), "macc": _nanmean(recall), "mfscore": _nanmean(fscore),
          "overall_accuracy": float(tp.sum() / total) if total else float("nan")}


def classification_scores(conf) -> dict:
  """Scene classification from a (C, C) confusion matrix of image labels: overall_accuracy
  (top-1 OA, the number MTP reports), per_class_accuracy (C,), mean_accuracy, confusion."""
  s = segmentation_scores(conf)
  return {"overall_accuracy": s["overall_accuracy"], "per_class_accuracy": s["accuracy"],
          "mean_accuracy": s["macc"], "confusion": np.asarray(conf, np.int64)}


def change_detection_scores(conf, changed_class: int = 1) -> dict:
  """Change detection (open-cd/mmseg, MTP_SPEC.md §5.2): precision, recall, F1 and IoU of the
  `changed` class, plus overall accuracy, from a (2, 2) (or (C, C)) pixel confusion matrix."""
  s = segmentation_scores(conf)
  return {"precision": float(s["precision"][changed_class]), "recall": float(s["recall"][changed_class]),
          "f1": float(s["fscore"][changed_class]), "iou": float(s["iou"][changed_class]),
          "overall_accuracy": s["overall_accuracy"]}


class ConfusionTotals:
  """A task's host evaluator over `ConfusionMatrix` sums: add() merges each batch's matrices
  (identical on every process, so no gathering) in int64; results() -> {subset:
  numbers(subset, (C, C) int64 matrix)}, the task's own numbers."""

  def __init__(self, numbers):
    self.numbers, self.totals = numbers, {}

  def add(self, sums: dict, per_image: dict, raw: dict):
    del per_image, raw
    for s, matrix in sums.items():
      host = matrix.to_host()
      self.totals[s] = host if s not in self.totals else self.totals[s].merge(host)

  def results(self) -> dict:
    return {s: self.numbers(s, np.asarray(total.compute(), np.int64)) for s, total in self.totals.items()}
