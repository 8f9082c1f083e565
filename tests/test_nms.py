"""NMS against a straightforward greedy reference (numpy + shapely), ties and classes included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shapely

from mtp_jax.ops import box_iou_rotated, nms, nms_rotated, rbox_to_poly

# One compilation per shape: the threshold is traced, max_outputs and tile_size are static.
run_rotated = jax.jit(nms_rotated, static_argnames=("max_outputs", "tile_size"))
run_horizontal = jax.jit(nms, static_argnames=("max_outputs", "tile_size"))


def greedy_reference(polygons, scores, threshold, classes=None, valid=None):
  """Textbook greedy NMS: visit by decreasing score (ties: lower index first), keep unless a kept
  box of the same class overlaps with IoU > threshold. IoU exact in float64 by shapely."""
  n = len(scores)
  classes = np.zeros(n, int) if classes is None else classes
  valid = np.ones(n, bool) if valid is None else valid
  order = sorted(range(n), key=lambda i: (-scores[i], i))
  kept = []
  for i in order:
    if not valid[i]:
      continue
    ok = True
    for j in kept:
      if classes[j] != classes[i]:
        continue
      inter = shapely.area(shapely.intersection(polygons[i], polygons[j]))
      union = shapely.area(polygons[i]) + shapely.area(polygons[j]) - inter
      if union > 0 and inter / union > threshold:
        ok = False
        break
    if ok:
      kept.append(i)
  return kept


def _clustered_rboxes(rng, n):
  centres = rng.uniform(0, 300, (max(n // 8, 1), 2))
  c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 6, (n, 2))
  wh = rng.uniform(8, 40, (n, 2))
  return np.c_[c, wh.max(1), wh.min(1), rng.uniform(-np.pi / 2, np.pi / 2, n)].astype(np.float32)


def _as_list(indices, count):
  indices, count = np.asarray(indices), int(count)
  assert (indices[count:] == -1).all()
  return indices[:count].tolist()


def _far_from_threshold(boxes, threshold):
  """True if no pair's IoU is within 1e-5 of the threshold (float32 vs float64 could differ)."""
  iou = np.asarray(jax.jit(box_iou_rotated)(boxes, boxes))
  return not (np.abs(iou - threshold) < 1e-5).any()


@pytest.mark.parametrize("seed", range(4))
def test_rotated_nms_equals_greedy_reference(seed):
  rng = np.random.default_rng(seed)
  n = 300
  boxes = _clustered_rboxes(rng, n)
  scores = rng.choice(np.linspace(0, 1, 40), n).astype(np.float32)     # many exact ties
  classes = rng.integers(0, 3, n) if seed % 2 else np.zeros(n, int)
  threshold = [0.1, 0.3, 0.5, 0.7][seed]
  polys = shapely.polygons(rbox_to_poly(boxes.astype(np.float64)))
  want = greedy_reference(polys, scores, threshold, classes)
  got = _as_list(*run_rotated(boxes, scores, threshold, max_outputs=n, classes=classes, tile_size=64))
  assert _far_from_threshold(boxes, threshold)
  assert got == want
  assert 5 < len(got) < n   # the case really suppresses something and keeps something


def test_horizontal_nms_equals_greedy_reference_with_padding_and_truncation():
  rng = np.random.default_rng(7)
  n = 400
  xy = rng.uniform(0, 200, (n, 2))
  boxes = np.c_[xy, xy + rng.uniform(5, 50, (n, 2))].astype(np.float32)
  scores = rng.choice(np.linspace(0, 1, 50), n).astype(np.float32)
  valid = rng.uniform(size=n) > 0.2
  polys = shapely.box(*boxes.T)
  want = greedy_reference(polys, scores, 0.5, valid=valid)
  got = _as_list(*run_horizontal(boxes, scores, 0.5, max_outputs=n, valid=valid, tile_size=64))
  assert got == want
  idx, count = run_horizontal(boxes, scores, 0.5, max_outputs=10, valid=valid, tile_size=64)
  assert int(count) == 10 and np.asarray(idx).tolist() == want[:10]


def test_batched_vmap_and_degenerate_inputs():
  rng = np.random.default_rng(3)
  boxes = np.stack([_clustered_rboxes(rng, 100) for _ in range(3)])
  scores = rng.uniform(size=(3, 100)).astype(np.float32)
  idx, count = run_rotated(boxes, scores, 0.3, max_outputs=50, tile_size=32)
  assert idx.shape == (3, 50) and count.shape == (3,)
  for i in range(3):
    one_idx, one_count = run_rotated(boxes[i], scores[i], 0.3, max_outputs=50, tile_size=32)
    np.testing.assert_array_equal(idx[i], one_idx)
    assert int(count[i]) == int(one_count)
  # Identical boxes: only the best survives; nothing valid: nothing kept.
  same = np.tile([[10, 10, 8, 4, 0.3]], (5, 1)).astype(np.float32)
  assert _as_list(*run_rotated(same, jnp.arange(5.0), 0.5, max_outputs=5)) == [4]
  assert _as_list(*run_rotated(same, jnp.arange(5.0), 0.5, max_outputs=5, valid=jnp.zeros(5, bool))) == []
  with pytest.raises(ValueError, match=r"\(\.\.\., N, 5\)"):
    nms_rotated(np.zeros((4, 4)), np.zeros(4), 0.5, 2)


# ----------------------------------------------------------------------------------------------
# The detectors' test paths against their plain formulations

def _greedy_on_matrix(iou, scores, threshold, classes, valid, max_outputs):
  """Textbook greedy NMS (decreasing score, ties by index) on a precomputed IoU matrix."""
  kept = []
  for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
    if valid[i] and not any(classes[j] == classes[i] and iou[j, i] > threshold for j in kept):
      kept.append(i)
  return kept[:max_outputs]


def _plain_detections(cls_score, bbox_pred, proposals, proposal_valid, image_size, cfg):
  """mmrotate `_predict_by_feat_single` + `multiclass_nms` for one image: every (proposal, class)
  pair above score_thr, greedy class-aware NMS over all of them (IoU by `box_iou_rotated`)."""
  scores = np.asarray(jax.nn.softmax(cls_score, -1))
  boxes = np.asarray(cfg.coder.decode(proposals, bbox_pred, max_shape=image_size))
  num_classes = scores.shape[1] - 1
  pairs = np.argwhere((scores[:, :num_classes] > cfg.score_thr) & np.asarray(proposal_valid)[:, None])
  cand_boxes, cand_labels = boxes[pairs[:, 0]], pairs[:, 1]
  cand_scores = scores[pairs[:, 0], pairs[:, 1]]
  iou = np.asarray(jax.jit(box_iou_rotated)(cand_boxes, cand_boxes))
  keep = _greedy_on_matrix(iou, cand_scores, cfg.nms_iou_thr, cand_labels, np.ones(len(pairs), bool),
                           cfg.max_per_img)
  return cand_boxes[keep], cand_scores[keep], cand_labels[keep], len(pairs)


def test_rotated_detections_equal_the_plain_formulation():
  """`detections` (candidates capped, NMS stopped at the last candidate) returns exactly the
  boxes, scores and labels of the plain rule, with several candidates per proposal."""
  from mtp_jax.models.detection.roi_head import RoIConfig, detections
  rng = np.random.default_rng(11)
  p, c = 120, 6
  proposals = _clustered_rboxes(rng, p)
  proposal_valid = rng.uniform(size=p) < 0.9
  cls_score = rng.normal(0, 2, (p, c + 1)).astype(np.float32)
  bbox_pred = rng.normal(0, 0.3, (p, 5)).astype(np.float32)
  cfg = RoIConfig(max_per_img=250, max_candidates=400, nms_tile=64)
  out = jax.tree.map(np.asarray, jax.jit(detections, static_argnames=("image_size", "cfg"))(
      cls_score[None], bbox_pred[None], proposals[None], proposal_valid[None], (300, 300), cfg))
  boxes, scores, labels, count = _plain_detections(cls_score, bbox_pred, proposals, proposal_valid,
                                                   (300, 300), cfg)
  assert 80 < count < 400 and 20 < len(scores) < 250   # several tiles; max_per_img does not bind
  k = len(scores)
  assert out["valid"][0].tolist() == [True] * k + [False] * (250 - k)
  assert int(out["num_candidates"][0]) == count
  np.testing.assert_array_equal(out["rboxes"][0, :k], boxes)
  np.testing.assert_array_equal(out["scores"][0, :k], scores)
  np.testing.assert_array_equal(out["labels"][0, :k], labels)
  assert (out["labels"][0, k:] == -1).all() and (out["scores"][0, k:] == 0).all()
