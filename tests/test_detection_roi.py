"""R-CNN second stage (mtp_jax/models/detection/roi_head.py) and the Oriented R-CNN head.

Oracles: numpy transcriptions of mmrotate 1.x `bbox2delta` (DeltaXYWHT, le90, edge_swap, proj_xy)
and of mmdet `BBoxHead.loss` (CE / SmoothL1 with their avg_factors); hand-made boxes whose IoU is
known in closed form (a box slid along its own w-axis by s has IoU (w - s) / (w + s)).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax.models.detection.roi_head import (BoxPredictor, RoIConfig, RoITargets, Shared2FC,
                                               num_candidates_bound, roi_loss, roi_targets,
                                               detections)

STDS = np.array([0.1, 0.1, 0.2, 0.2, 0.1])
targets_jit = jax.jit(roi_targets, static_argnames=("cfg", "num_classes"))
detections_jit = jax.jit(detections, static_argnames=("image_size", "cfg"))
EPS = np.finfo(np.float32).eps


# ----------------------------------------------------------------------------------------------
# numpy oracles

def np_norm_le90(a):
  return (a + np.pi / 2) % np.pi - np.pi / 2


def np_encode(p, g):
  """mmrotate 1.x bbox2delta(le90, edge_swap=True, proj_xy=True), stds (0.1, 0.1, 0.2, 0.2, 0.1)."""
  px, py, pw, ph, pt = np.asarray(p, np.float64)
  gx, gy, gw, gh, gt = np.asarray(g, np.float64)
  if not gw > gh:                                   # RotatedBoxes.regularize_boxes('le90')
    gw, gh, gt = gh, gw, gt + np.pi / 2
  gt = np_norm_le90(gt)
  dx = (np.cos(pt) * (gx - px) + np.sin(pt) * (gy - py)) / pw
  dy = (-np.sin(pt) * (gx - px) + np.cos(pt) * (gy - py)) / ph
  d1, d2 = np_norm_le90(gt - pt), np_norm_le90(gt - pt + np.pi / 2)
  if abs(d1) < abs(d2):
    dt, w, h = d1, gw, gh
  else:
    dt, w, h = d2, gh, gw
  return np.array([dx, dy, np.log(w / pw), np.log(h / ph), dt]) / STDS


def np_roi_loss(cls_score, bbox_pred, labels, label_weights, bbox_targets, bbox_weights, valid):
  """mmdet BBoxHead.loss, class-agnostic: CE avg max(#w>0, 1), SmoothL1(1) avg #sampled RoIs."""
  cls_score = np.asarray(cls_score, np.float64)
  num_classes = cls_score.shape[1] - 1
  logp = cls_score - np.log(np.exp(cls_score).sum(1, keepdims=True))
  ce = -logp[np.arange(len(labels)), labels]
  loss_cls = (ce * label_weights).sum() / (max((label_weights > 0).sum(), 1) + EPS)
  pos = valid & (labels < num_classes)
  if not pos.any():
    return loss_cls, 0.0
  d = np.abs(np.asarray(bbox_pred, np.float64)[pos] - bbox_targets[pos])
  sl1 = np.where(d < 1.0, 0.5 * d * d, d - 0.5) * bbox_weights[pos]
  return loss_cls, sl1.sum() / (valid.sum() + EPS)


def slide(box, s):
  """The box moved by s px along its own w-axis."""
  x, y, w, h, t = box
  return (x + s * math.cos(t), y + s * math.sin(t), w, h, t)


def as_rows(t):
  return {k: np.asarray(v) for k, v in t._asdict().items()}


# ----------------------------------------------------------------------------------------------
# Targets

GT0 = (30.0, 30.0, 20.0, 10.0, 0.3)                  # label 4
GT1 = (70.0, 60.0, 10.0, 16.0, 0.2)                  # label 1, h > w: regularised by the coder
S49 = 20 * (1 - 0.49) / 1.49                          # slide giving IoU 0.49 with GT0
S51 = 20 * (1 - 0.51) / 1.51                          # IoU 0.51


def hand_case():
  gt = jnp.array([GT0, GT1, (0, 0, 0, 0, 0)], jnp.float32)
  labels = jnp.array([4, 1, 0], jnp.int32)
  gt_valid = jnp.array([True, True, False])
  proposals = [GT0,                                   # 0: = gt -> positive, zero target
               slide(GT0, S49),                       # 1: IoU 0.49 -> negative
               slide(GT0, -S51),                      # 2: IoU 0.51 -> positive
               (71.0, 59.0, 15.0, 9.0, -1.3),         # 3: near GT1 (le90 form)
               (71.0, 59.0, 9.0, 15.0, 0.25),         # 4: near GT1, edges swapped
               GT0,                                   # 5: padding (invalid) -> never sampled
               (5.0, 90.0, 8.0, 4.0, 0.0)]            # 6: far -> negative
  valid = jnp.array([True, True, True, True, True, False, True])
  return gt, labels, gt_valid, jnp.array(proposals, jnp.float32), valid


def test_hand_case_assignment_and_targets():
  gt, labels, gt_valid, proposals, valid = hand_case()
  t = as_rows(targets_jit(proposals, valid, gt, labels, gt_valid, jax.random.key(0),
                          cfg=RoIConfig(), num_classes=5))
  assert t["rois"].shape == (512, 5) and t["bbox_targets"].shape == (512, 5)
  # Candidates: gts prepended (rows 0, 1 of [gt; proposals]), then the proposals.
  boxes = np.concatenate([np.asarray(gt), np.asarray(proposals)])
  expected = {0: ("pos", 0), 1: ("pos", 1), 3: ("pos", 0), 4: ("neg", None), 5: ("pos", 0),
              6: ("pos", 1), 7: ("pos", 1), 9: ("neg", None)}
  assert t["valid"].sum() == len(expected) and (t["label_weights"] > 0).sum() == len(expected)
  seen = set()
  for slot in np.nonzero(t["valid"])[0]:
    row = [i for i in expected if i not in seen and np.allclose(boxes[i], t["rois"][slot])]
    assert row, f"sampled roi {t['rois'][slot]} is not a candidate"
    i = row[0]
    seen.add(i)
    kind, g = expected[i]
    assert t["label_weights"][slot] == 1.0
    if kind == "neg":
      assert t["labels"][slot] == 5 and t["gt_index"][slot] == -1
      np.testing.assert_array_equal(t["bbox_targets"][slot], 0.0)
      np.testing.assert_array_equal(t["bbox_weights"][slot], 0.0)
    else:
      assert t["labels"][slot] == int(labels[g]) and t["gt_index"][slot] == g
      np.testing.assert_array_equal(t["bbox_weights"][slot], 1.0)
      np.testing.assert_allclose(t["bbox_targets"][slot], np_encode(boxes[i], np.asarray(gt[g])),
                                 atol=2e-5)
  assert seen == set(expected)
  # Padding slots carry no weight; the gt-as-proposal and identical proposals regress to zero.
  assert not t["label_weights"][~t["valid"]].any() and not t["bbox_weights"][~t["valid"]].any()
  np.testing.assert_allclose(np_encode(boxes[3], boxes[0]), 0.0, atol=1e-6)
  # The 0.51 slide is a pure along-axis shift: dx = S51 / 20 / 0.1, the rest 0.
  np.testing.assert_allclose(np_encode(boxes[5], boxes[0]), [S51 / 20 / 0.1, 0, 0, 0, 0],
                             atol=1e-6)
  # Proposal 4 takes the edge-swap branch: w/h exchanged, dtheta = 0.2 - 0.25.
  np.testing.assert_allclose(np_encode(boxes[7], boxes[1])[2:],
                             [math.log(10 / 9) / 0.2, math.log(16 / 15) / 0.2, -0.05 / 0.1],
                             atol=1e-5)


def _counts(t):
  positive = t["valid"] & (t["labels"] < 5)
  return int(positive.sum()), int((t["valid"] & ~positive).sum())


@pytest.mark.parametrize("num_pos, num_neg, add_gt, expected", [
    (300, 1000, True, (128, 384)),     # capped at int(512 * 0.25) positives
    (10, 1000, True, (11, 501)),       # 10 + the gt itself; negatives fill to 512
    (10, 1000, False, (10, 502)),
    (5, 20, True, (6, 20)),            # too few candidates: the rest is padding
    (0, 40, False, (0, 40)),
])
def test_sample_counts(num_pos, num_neg, add_gt, expected):
  gt = jnp.array([GT0], jnp.float32)
  proposals = np.concatenate([np.tile(GT0, (num_pos, 1)),
                              np.tile((100.0, 100.0, 8.0, 4.0, 0.0), (num_neg, 1))])
  proposals = np.concatenate([proposals, np.tile(GT0, (1320 - len(proposals), 1))])
  valid = np.arange(len(proposals)) < num_pos + num_neg      # the rest: invalid copies of the gt
  t = as_rows(targets_jit(jnp.asarray(proposals, jnp.float32), jnp.asarray(valid), gt,
                          jnp.array([2]), jnp.array([True]), jax.random.key(1),
                          cfg=RoIConfig(add_gt_as_proposals=add_gt), num_classes=5))
  assert _counts(t) == expected
  assert t["valid"].sum() == min(512, sum(expected))
  np.testing.assert_allclose(t["bbox_targets"][t["labels"] < 5], 0.0, atol=2e-5)


def test_no_valid_gt_gives_only_negatives():
  _, _, _, proposals, valid = hand_case()
  t = as_rows(targets_jit(proposals, valid, jnp.zeros((3, 5)), jnp.zeros((3,), jnp.int32),
                          jnp.zeros((3,), bool), jax.random.key(2), cfg=RoIConfig(),
                          num_classes=5))
  assert _counts(t) == (0, int(valid.sum()))
  assert (t["labels"] == 5).all() and not t["bbox_weights"].any()
  # An image without any gt slot at all (M = 0) works the same way.
  t0 = as_rows(targets_jit(proposals, valid, jnp.zeros((0, 5)), jnp.zeros((0,), jnp.int32),
                           jnp.zeros((0,), bool), jax.random.key(2), cfg=RoIConfig(),
                           num_classes=5))
  assert _counts(t0) == (0, int(valid.sum()))


# ----------------------------------------------------------------------------------------------
# Losses

def _hand_targets(rng, n=12, num_classes=4):
  labels = rng.integers(0, num_classes + 1, n)
  labels[:3] = [0, 2, num_classes]
  valid = np.ones(n, bool)
  valid[-3:] = False
  labels[~valid] = num_classes
  positive = valid & (labels < num_classes)
  bbox_targets = np.where(positive[:, None], rng.normal(0, 1.5, (n, 5)), 0.0)
  bbox_weights = np.repeat(positive[:, None], 5, 1).astype(np.float64)
  label_weights = valid.astype(np.float64)
  t = RoITargets(jnp.zeros((n, 5)), jnp.asarray(labels, jnp.int32),
                 jnp.asarray(label_weights, jnp.float32), jnp.asarray(bbox_targets, jnp.float32),
                 jnp.asarray(bbox_weights, jnp.float32), jnp.asarray(valid),
                 jnp.where(jnp.asarray(positive), 0, -1))
  return t, (labels, label_weights, bbox_targets, bbox_weights, valid)


def test_roi_loss_matches_mmdet_formula():
  rng = np.random.default_rng(0)
  t, arrays = _hand_targets(rng)
  cls_score = rng.normal(0, 2, (12, 5))
  bbox_pred = arrays[2] + rng.normal(0, 1.2, (12, 5))      # |diff| on both sides of beta
  out = roi_loss(jnp.asarray(cls_score, jnp.float32), jnp.asarray(bbox_pred, jnp.float32), t)
  want_cls, want_bbox = np_roi_loss(cls_score, bbox_pred, *arrays)
  np.testing.assert_allclose(float(out["cls"]), want_cls, rtol=1e-5)
  np.testing.assert_allclose(float(out["bbox"]), want_bbox, rtol=1e-5)
  # Batched (b, S, ...) inputs are the same sums over the whole batch.
  t2 = jax.tree.map(lambda x: jnp.stack([x, x]), t)
  out2 = roi_loss(jnp.stack([jnp.asarray(cls_score, jnp.float32)] * 2),
                  jnp.stack([jnp.asarray(bbox_pred, jnp.float32)] * 2), t2)
  np.testing.assert_allclose(float(out2["cls"]), want_cls, rtol=1e-5)
  np.testing.assert_allclose(float(out2["bbox"]), want_bbox, rtol=1e-5)


def test_roi_loss_class_specific_and_empty():
  rng = np.random.default_rng(1)
  t, (labels, lw, bt, bw, valid) = _hand_targets(rng)
  per_class = rng.normal(0, 1, (12, 4, 5))
  cls_score = rng.normal(0, 1, (12, 5))
  out = roi_loss(jnp.asarray(cls_score, jnp.float32), jnp.asarray(per_class.reshape(12, 20),
                                                                  jnp.float32), t)
  picked = per_class[np.arange(12), np.minimum(labels, 3)]
  np.testing.assert_allclose(float(out["bbox"]), np_roi_loss(cls_score, picked, labels, lw, bt, bw,
                                                             valid)[1], rtol=1e-5)
  # Nothing sampled: both losses are 0 with finite gradients (mmdet: avg_factor max(., 1)).
  empty = t._replace(label_weights=jnp.zeros(12), valid=jnp.zeros(12, bool),
                     bbox_weights=jnp.zeros((12, 5)))
  loss = lambda c, b: sum(roi_loss(c, b, empty).values())
  value, grads = jax.value_and_grad(loss, (0, 1))(jnp.ones((12, 5)), jnp.ones((12, 5)))
  assert float(value) == 0.0 and all(np.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------
# Test-time multiclass rotated NMS

def _logits(probs):
  return jnp.log(jnp.asarray(probs, jnp.float32))


def test_multiclass_rotated_nms_hand_case():
  base = (30.0, 30.0, 20.0, 10.0, 0.3)
  proposals = jnp.array([base, slide(base, 2.0), slide(base, 1.0), (80.0, 80.0, 12.0, 6.0, 0.0),
                         (50.0, 10.0, 10.0, 6.0, 0.0), base], jnp.float32)
  tiny = 1e-6   # 3 classes + background (index 3)
  probs = [[0.9, tiny, tiny, 0.1 - 2 * tiny],          # class 0 best
           [0.8, tiny, tiny, 0.2 - 2 * tiny],          # class 0, overlaps 0 -> suppressed
           [tiny, 0.7, tiny, 0.3 - 2 * tiny],          # class 1, overlaps 0 -> kept
           [tiny, tiny, 0.04, 0.96 - 2 * tiny],        # below score_thr -> dropped
           [0.2, tiny, 0.3, 0.5 - 2 * tiny],           # two classes of one box -> both kept
           [0.95, tiny, tiny, 0.05 - 2 * tiny]]        # invalid proposal -> ignored
  valid = jnp.array([True, True, True, True, True, False])
  cfg = RoIConfig(max_per_img=6)
  out = jax.tree.map(np.asarray, detections_jit(
      _logits(probs)[None], jnp.zeros((1, 6, 5)), proposals[None], valid[None], (100, 100), cfg))
  assert out["valid"].tolist() == [[True] * 4 + [False] * 2]
  np.testing.assert_allclose(out["scores"][0], [0.9, 0.7, 0.3, 0.2, 0, 0], rtol=1e-5)
  assert out["labels"][0].tolist() == [0, 1, 2, 0, -1, -1]
  want = np.asarray(proposals)[[0, 2, 4, 4]]
  np.testing.assert_allclose(out["rboxes"][0, :4], want, atol=1e-4)
  np.testing.assert_array_equal(out["rboxes"][0, 4:], 0.0)
  assert out["num_candidates"].tolist() == [5]
  # max_per_img keeps the best ones only.
  top2 = detections_jit(_logits(probs)[None], jnp.zeros((1, 6, 5)), proposals[None],
                        valid[None], (100, 100), RoIConfig(max_per_img=2))
  assert np.asarray(top2["labels"]).tolist() == [[0, 1]]


def test_detections_decode_and_candidate_bound():
  """Deltas decode around each proposal, centres clipped to the image; the candidate bound."""
  proposals = jnp.tile(jnp.array([[97.0, 50.0, 20.0, 10.0, 0.0]]), (6, 1))
  deltas = jnp.zeros((6, 5)).at[0, 0].set(2.0)       # +2 * 0.1 * 20 = +4 px, clipped to 99
  deltas = deltas.at[0, 2].set(-5.0)                  # w = 20 e^-1 < h: edge swap on decode
  probs = [[0.6, 0.4 - 2e-6, 1e-6, 1e-6]] + [[0.25] * 4] * 5
  valid = jnp.arange(6) == 0
  out = detections_jit(_logits(probs)[None], deltas[None], proposals[None], valid[None],
                       (100, 100), RoIConfig(max_per_img=6))
  np.testing.assert_allclose(np.asarray(out["rboxes"][0, 0]),
                             [99.0, 50.0, 10.0, 20.0 * math.exp(-1.0), -math.pi / 2], atol=1e-5)
  assert np.asarray(out["labels"][0]).tolist() == [0, 1, -1, -1, -1, -1]
  assert num_candidates_bound(2000, 37, RoIConfig()) == 10000
  assert num_candidates_bound(64, 37, RoIConfig()) == 64 * 20     # 20 = floor(1 / 0.05)
  assert num_candidates_bound(64, 5, RoIConfig()) == 64 * 5


# ----------------------------------------------------------------------------------------------
# Modules

def test_shared2fc_flattens_like_pytorch_and_inits():
  c, r, fc = 3, 7, 8
  trunk = Shared2FC(c, r, fc, rngs=nnx.Rngs(0))
  weight = np.random.default_rng(0).normal(0, 0.05, (fc, c * r * r))   # PyTorch (out, in)
  trunk.shared_fcs[0].kernel[...] = jnp.asarray(weight.T, jnp.float32)
  trunk.shared_fcs[0].bias[...] = jnp.zeros(fc)
  x_nchw = np.random.default_rng(1).normal(0, 1, (4, c, r, r))
  h = np.maximum(x_nchw.reshape(4, -1) @ weight.T, 0)
  w1, b1 = np.asarray(trunk.shared_fcs[1].kernel[...]), np.asarray(trunk.shared_fcs[1].bias[...])
  want = np.maximum(h @ w1 + b1, 0)
  got = trunk(jnp.asarray(x_nchw.transpose(0, 2, 3, 1), jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  # mmdet init_cfg: Xavier uniform, zero bias; predictors: PyTorch default U(+-1/sqrt(fan_in)).
  big = Shared2FC(16, 7, 64, rngs=nnx.Rngs(0))
  k0, xavier = np.asarray(big.shared_fcs[0].kernel[...]), math.sqrt(6 / (16 * 49 + 64))
  assert k0.shape == (16 * 49, 64) and xavier >= np.abs(k0).max() > 0.95 * xavier
  assert not np.asarray(big.shared_fcs[0].bias[...]).any()
  pred = BoxPredictor(1024, 18, 5, rngs=nnx.Rngs(1))
  bound = 1 / math.sqrt(1024)
  biases = []
  for layer, out_dim in ((pred.fc_cls, 19), (pred.fc_reg, 5)):
    kernel, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    assert kernel.shape == (1024, out_dim) and bias.shape == (out_dim,)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    assert np.abs(bias).max() <= bound and np.abs(bias).min() > 0
    biases.append(bias)
  assert np.abs(np.concatenate(biases)).max() > 0.5 * bound   # not mmdet's zero / N(0.01) init


# ----------------------------------------------------------------------------------------------
# The whole head on a tiny configuration

def test_oriented_rcnn_smoke():
  from mtp_jax.models.detection.rpn import ProposalConfig, RPNConfig
  from mtp_jax.models.heads.oriented_rcnn import OrientedRCNN

  size, b = 64, 2
  rpn = RPNConfig(num_samples=32, train_proposals=ProposalConfig(48, 48, 0.8, 0.0),
                  test_proposals=ProposalConfig(48, 48, 0.8, 0.0))
  roi = RoIConfig(num_samples=32, max_per_img=16)
  model = OrientedRCNN([8, 8, 8, 8], {"sota": 3, "fast": 5}, rpn=rpn, roi=roi, channels=16,
                       fc_channels=32, rngs=nnx.Rngs(0))
  assert set(model.predictors) == {"sota", "fast"}
  subsets = ("sota", "fast")
  feats = [jax.random.normal(jax.random.key(i), (b * 2, size // s, size // s, 8))
           for i, s in enumerate((4, 8, 16, 32))]
  box_a = [[24.0, 24.0, 30.0, 24.0, 0.1], [44.0, 40.0, 28.0, 14.0, -0.6], [0, 0, 0, 0, 0]]
  gt = {"sota": {"boxes": jnp.array([box_a, box_a], jnp.float32),
                 "labels": jnp.array([[0, 2, 0], [1, 1, 0]], jnp.int32),
                 # image 1 of sota has no valid gt at all
                 "valid": jnp.array([[True, True, False], [False, False, False]])},
        "fast": {"boxes": jnp.tile(jnp.array([[32.0, 30.0, 36.0, 20.0, 0.4]]), (b, 4, 1)),
                 "labels": jnp.full((b, 4), 4, jnp.int32),
                 "valid": jnp.ones((b, 4), bool)}}                 # every slot valid
  graphdef, state = nnx.split(model)
  traces = []

  def loss_fn(state, feats, gt, key):
    traces.append(1)
    losses = nnx.merge(graphdef, state).losses(feats, gt, subsets=subsets,
                                               image_size=(size, size), key=key)
    return sum(jax.tree.leaves(losses)), losses

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (total, losses), grads = step(state, feats, gt, jax.random.key(3))
  assert {s: set(v) for s, v in losses.items()} == {s: {"rpn_cls", "rpn_bbox", "cls", "bbox"}
                                                    for s in subsets}
  assert all(np.isfinite(float(v)) for v in jax.tree.leaves(losses))
  assert float(losses["fast"]["bbox"]) > 0 and float(losses["sota"]["rpn_bbox"]) > 0
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert np.abs(np.asarray(grads["predictors"]["fast"]["fc_reg"]["kernel"][...])).sum() > 0
  # Another gt count in the same padded shapes: no retrace, other values.
  gt2 = jax.tree.map(lambda x: x, gt)
  gt2["sota"] = dict(gt["sota"], valid=jnp.array([[True, False, False], [True, True, True]]))
  (total2, _), _ = step(state, feats, gt2, jax.random.key(3))
  assert len(traces) == 1 and np.isfinite(float(total2)) and float(total2) != float(total)

  # Prediction (test-time RPN) on the fast rows alone: a batch of one subset.
  pred = jax.jit(lambda st, f: nnx.merge(graphdef, st).predict(f, subsets=("fast",),
                                                               image_size=(size, size)))
  d = jax.tree.map(np.asarray, pred(state, [f[1::2] for f in feats]))["fast"]
  assert d["rboxes"].shape == (b, 16, 5) and d["labels"].dtype == np.int32
  assert d["valid"].dtype == bool and d["scores"].shape == (b, 16) and d["valid"].any()
  assert ((d["labels"] >= 0) & (d["labels"] < 5))[d["valid"]].all()
  assert (d["scores"][d["valid"]] > 0.05).all() and (d["labels"][~d["valid"]] == -1).all()
  assert np.isfinite(d["rboxes"]).all()
