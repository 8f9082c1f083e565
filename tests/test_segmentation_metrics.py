"""Confusion-matrix metrics against hand-computed matrices: IoU, mIoU, accuracy, F1, change
detection, classification; the ignore index and padded images really left out; device (CLU,
jitted, sharded) equals host; merging beyond int32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtp_jax.errors import DataError
from mtp_jax.metrics.segmentation import (ConfusionMatrix, change_detection_scores, classification_scores,
                                          confusion_matrix, segmentation_scores)

# 3 classes; class 2 never appears; two pixels are 255 (ignored) with predictions that would count.
LABELS = np.array([[0, 0, 0, 1, 1], [1, 1, 1, 0, 255], [1, 0, 0, 255, 1]])
PREDS = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 2], [1, 0, 0, 1, 1]])
# rows = ground truth, columns = prediction, counted by hand from the arrays above
HAND = np.array([[5, 1, 0],
                 [1, 6, 0],
                 [0, 0, 0]])


def test_confusion_matrix_by_hand_and_ignore_index():
  np.testing.assert_array_equal(confusion_matrix(LABELS, PREDS, 3), HAND)
  changed = PREDS.copy()
  changed[LABELS == 255] = 0        # predictions on ignored pixels change nothing
  np.testing.assert_array_equal(confusion_matrix(LABELS, changed, 3), HAND)
  with pytest.raises(DataError, match=r"2 label\(s\) outside \[0, 3\)"):
    confusion_matrix(LABELS, PREDS, 3, ignore_index=7)   # 255 is then a real, out-of-range label


def test_segmentation_scores_by_hand():
  s = segmentation_scores(HAND)
  np.testing.assert_allclose(s["iou"][:2], [5 / (5 + 1 + 1), 6 / (6 + 1 + 1)])
  assert np.isnan(s["iou"][2])                                  # absent class: left out of the mean
  assert s["miou"] == pytest.approx((5 / 7 + 6 / 8) / 2)
  assert s["overall_accuracy"] == pytest.approx(11 / 13)
  np.testing.assert_allclose(s["accuracy"][:2], [5 / 6, 6 / 7])  # per class = recall
  np.testing.assert_allclose(s["precision"][:2], [5 / 6, 6 / 7])
  p, r = 5 / 6, 5 / 6
  assert s["fscore"][0] == pytest.approx(2 * p * r / (p + r))


def test_background_is_a_class_like_any_other():
  # SAMRS: background is class 0 after the uint8 +1 wrap (MTP_SPEC §3.4); it is in the mIoU.
  conf = np.array([[90, 10], [0, 0]])
  s = segmentation_scores(conf)
  assert s["iou"][0] == pytest.approx(0.9) and s["iou"][1] == 0.0 and s["miou"] == pytest.approx(0.45)


def test_change_detection_f1_of_the_changed_class_by_hand():
  conf = np.array([[50, 10],    # unchanged: 50 right, 10 predicted changed
                   [5, 35]])    # changed: 5 missed, 35 found
  c = change_detection_scores(conf)
  assert c["precision"] == pytest.approx(35 / 45) and c["recall"] == pytest.approx(35 / 40)
  assert c["f1"] == pytest.approx(2 * 35 / (45 + 40)) and c["iou"] == pytest.approx(35 / 50)
  assert c["overall_accuracy"] == pytest.approx(85 / 100)
  assert change_detection_scores(np.array([[10, 0], [3, 0]]))["f1"] == 0.0   # nothing found: 0


def test_classification_scores_by_hand():
  labels, preds = np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 2, 2])
  c = classification_scores(confusion_matrix(labels, preds, 3))
  assert c["overall_accuracy"] == pytest.approx(4 / 6)
  np.testing.assert_allclose(c["per_class_accuracy"], [1 / 2, 2 / 3, 1.0])
  np.testing.assert_array_equal(c["confusion"], [[1, 1, 0], [0, 2, 1], [0, 0, 1]])


def test_device_metric_equals_host_under_jit_on_a_sharded_batch():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, (8, 16, 16)).astype(np.uint8)
  labels[:, :3] = 255
  preds = rng.integers(0, 5, (8, 16, 16)).astype(np.int32)
  real = np.array([True] * 6 + [False] * 2)   # padded images of a last batch
  mesh = Mesh(np.array(jax.devices()), ("data",))
  shard = NamedSharding(mesh, PartitionSpec("data"))
  args = [jax.device_put(x, shard) for x in (labels, preds, real)]
  fn = jax.jit(lambda l, p, m: ConfusionMatrix.from_model_output(labels=l, predictions=p, num_classes=5, mask=m),
               out_shardings=NamedSharding(mesh, PartitionSpec()))
  metric = fn(*args).to_host()
  np.testing.assert_array_equal(metric.compute(), confusion_matrix(labels[real], preds[real], 5))
  assert metric.matrix.dtype == np.int64
  # A label outside [0, C) that is not ignored is an error on the host, not silently dropped.
  bad = fn(jnp.full((8, 16, 16), 9, jnp.uint8), args[1], args[2]).to_host()
  with pytest.raises(DataError, match="outside"):
    bad.compute()


def test_host_merge_does_not_overflow_int32():
  big = ConfusionMatrix(matrix=np.full((2, 2), 2**31 - 1, np.int64), bad_labels=np.int64(0))
  merged = big.merge(big)
  assert merged.compute()[0, 0] == 2 * (2**31 - 1)
