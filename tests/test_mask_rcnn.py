"""Mask R-CNN on the shared two-stage core: the horizontal second stage (class-specific L1 loss,
class-specific decode + multiclass NMS) against numpy transcriptions of mmdet, the mask loss, and
the whole head on a tiny configuration (losses, gradients, one trace, predictions)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax.models.detection.mask_head import MaskConfig, MaskPredictor, mask_loss
from mtp_jax.models.detection.roi_head import RoIConfig, RoITargets, detections, roi_loss
from mtp_jax.models.detection.rpn import ProposalConfig, RPNConfig
from mtp_jax.ops.box_coders import RCNN_CODER

MASK_RCNN = RoIConfig.mask_rcnn()


def test_mask_rcnn_settings_are_mmdet_mask_rcnn():
  rpn, roi = RPNConfig.mask_rcnn(), MASK_RCNN
  assert not rpn.rotated and rpn.bbox_loss == "l1" and rpn.allowed_border < 0
  assert (rpn.pos_iou_thr, rpn.neg_iou_thr, rpn.min_pos_iou, rpn.match_low_quality) == (0.7, 0.3, 0.3, True)
  assert (rpn.num_samples, rpn.pos_fraction) == (256, 0.5)
  assert (rpn.train_proposals.nms_pre, rpn.train_proposals.max_per_img, rpn.train_proposals.nms_iou) == (2000, 1000, 0.7)
  assert (rpn.test_proposals.nms_pre, rpn.test_proposals.max_per_img) == (1000, 1000)
  assert rpn.coder.stds == (1.0, 1.0, 1.0, 1.0)
  assert (roi.pos_iou_thr, roi.neg_iou_thr, roi.min_pos_iou, roi.match_low_quality) == (0.5, 0.5, 0.5, True)
  assert (roi.num_samples, roi.pos_fraction, roi.add_gt_as_proposals) == (512, 0.25, True)
  assert (roi.roi_size, roi.sampling_ratio, roi.featmap_strides) == (7, 0, (4, 8, 16, 32))
  assert roi.coder.stds == (0.1, 0.1, 0.2, 0.2) and not roi.class_agnostic and roi.bbox_loss == "l1"
  assert (roi.score_thr, roi.nms_iou_thr, roi.max_per_img) == (0.05, 0.5, 100)
  assert roi.fc_reg_outputs(18) == 72
  m = MaskConfig()
  assert (m.roi_size, m.mask_size, m.num_convs, m.conv_channels, m.mask_thr) == (14, 28, 4, 256, 0.5)


def test_class_specific_l1_loss_is_mmdet_bbox_head_loss():
  rng = np.random.default_rng(0)
  s, c = 6, 3
  cls_score = rng.normal(size=(s, c + 1)).astype(np.float32)
  bbox_pred = rng.normal(size=(s, 4 * c)).astype(np.float32)
  labels = np.array([0, 2, 1, 3, 3, 3], np.int32)          # 3 positives, 2 negatives, 1 padding
  valid = np.array([1, 1, 1, 1, 1, 0], bool)
  targets = RoITargets(rois=np.zeros((s, 4), np.float32), labels=labels,
                       label_weights=valid.astype(np.float32),
                       bbox_targets=rng.normal(size=(s, 4)).astype(np.float32) * (labels < c)[:, None],
                       bbox_weights=np.repeat((labels < c)[:, None], 4, 1).astype(np.float32),
                       valid=valid, gt_index=np.where(labels < c, 0, -1).astype(np.int32))
  out = roi_loss(jnp.asarray(cls_score), jnp.asarray(bbox_pred), targets, MASK_RCNN)
  # mmdet BBoxHead.loss: CE mean over label_weight > 0; L1 of the positives' class slices summed
  # and divided by every sampled RoI (bbox_targets.size(0) counts the batch's RoIs).
  logp = cls_score - np.log(np.exp(cls_score).sum(1, keepdims=True))
  want_cls = -(logp[np.arange(s), labels] * valid).sum() / valid.sum()
  pos = labels < c
  pred = bbox_pred.reshape(s, c, 4)[np.flatnonzero(pos), labels[pos]]
  want_bbox = np.abs(pred - targets.bbox_targets[pos]).sum() / valid.sum()
  np.testing.assert_allclose(float(out["cls"]), want_cls, rtol=1e-5)
  np.testing.assert_allclose(float(out["bbox"]), want_bbox, rtol=1e-5)


def _numpy_iou(a, b):
  x1, y1 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
  x2, y2 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
  inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
  area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])
  return inter / (area(a) + area(b) - inter)


def _mmdet_multiclass_nms(boxes, scores, score_thr, iou_thr, max_num):
  """numpy transcription of mmdet `multiclass_nms` (class-specific boxes (P, C, 4), scores
  (P, C + 1) with background last): pairs above score_thr, class-wise greedy NMS, best max_num."""
  c = scores.shape[1] - 1
  cand = [(scores[p, k], p, k) for p in range(len(boxes)) for k in range(c) if scores[p, k] > score_thr]
  cand.sort(key=lambda t: -t[0])
  kept = []
  for sc, p, k in cand:
    if all(k != k2 or _numpy_iou(boxes[p, k], boxes[p2, k2][None])[0] <= iou_thr for _, p2, k2 in kept):
      kept.append((sc, p, k))
  kept = kept[:max_num]
  return (np.array([boxes[p, k] for _, p, k in kept]).reshape(-1, 4),
          np.array([s for s, _, _ in kept]), np.array([k for _, _, k in kept]))


def test_class_specific_detections_equal_mmdet_multiclass_nms():
  rng = np.random.default_rng(1)
  p, c, size = 40, 3, (64, 80)
  xy = rng.uniform(0, 50, (p, 2))
  proposals = np.concatenate([xy, xy + rng.uniform(8, 30, (p, 2))], 1).astype(np.float32)
  cls_score = (rng.normal(size=(p, c + 1)) * 2).astype(np.float32)
  bbox_pred = (rng.normal(size=(p, 4 * c)) * 0.5).astype(np.float32)
  cfg = RoIConfig.mask_rcnn(max_per_img=20)
  out = jax.tree.map(np.asarray, detections(jnp.asarray(cls_score[None]), jnp.asarray(bbox_pred[None]),
                                            jnp.asarray(proposals[None]), jnp.ones((1, p), bool),
                                            size, cfg))
  scores = np.asarray(jax.nn.softmax(cls_score, -1))
  boxes = np.asarray(RCNN_CODER.decode(proposals[:, None], bbox_pred.reshape(p, c, 4), max_shape=size))
  want_boxes, want_scores, want_labels = _mmdet_multiclass_nms(boxes, scores, 0.05, 0.5, 20)
  n = int(out["valid"][0].sum())
  assert n == len(want_scores) and n > 3
  np.testing.assert_allclose(out["hboxes"][0, :n], want_boxes, atol=1e-4)
  np.testing.assert_allclose(out["scores"][0, :n], want_scores, rtol=1e-5)
  np.testing.assert_array_equal(out["labels"][0, :n], want_labels)
  assert (out["hboxes"][0, :, [0, 2]] <= size[1]).all() and (out["hboxes"][0, :, [1, 3]] <= size[0]).all()


def test_mask_loss_is_mmdet_mask_cross_entropy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 5, 4, 4)).astype(np.float32)
  targets = (rng.uniform(size=(2, 5, 4, 4)) > 0.5).astype(np.float32)
  positive = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
  got = float(mask_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(positive)))
  x, t = logits[positive], targets[positive]          # F.binary_cross_entropy_with_logits, mean
  want = np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(mask_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((2, 5), bool))) == 0.0
  # The label's logits alone equal that channel of mmdet's per-class conv_logits output.
  predictor = MaskPredictor(8, 6, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.normal(size=(3, 4, 4, 8)).astype(np.float32))
  labels = np.array([5, 0, 2])
  every_class = np.asarray(predictor(x))
  np.testing.assert_allclose(np.asarray(predictor.class_logits(x, jnp.asarray(labels))),
                             every_class[np.arange(3), :, :, labels], rtol=1e-5, atol=1e-6)


def test_mask_rcnn_head_trains_and_predicts():
  from mtp_jax.models.heads.mask_rcnn import MaskRCNN
  from mtp_jax.ops.mask_targets import crop_masks

  size, b, r = 64, 2, 16
  rpn = RPNConfig.mask_rcnn(num_samples=32, train_proposals=ProposalConfig(48, 48, 0.7, 0.0),
                            test_proposals=ProposalConfig(48, 48, 0.7, 0.0))
  roi = RoIConfig.mask_rcnn(num_samples=32, max_per_img=16)
  model = MaskRCNN([8, 8, 8, 8], {"sota": 3, "fast": 5}, rpn=rpn, roi=roi,
                   mask=MaskConfig(conv_channels=8), channels=16, fc_channels=32, rngs=nnx.Rngs(0))
  assert set(model.predictors) == set(model.mask_predictors) == {"sota", "fast"}
  assert model.predictors["fast"].fc_reg.kernel.shape == (32, 20)
  assert model.mask_predictors["fast"].conv_logits.kernel.shape == (1, 1, 8, 5)
  subsets = ("sota", "fast")
  feats = [jax.random.normal(jax.random.key(i), (b * 2, size // s, size // s, 8))
           for i, s in enumerate((4, 8, 16, 32))]
  boxes = np.array([[10.0, 12.0, 34.0, 30.0], [30.0, 30.0, 58.0, 50.0], [0, 0, 0, 0]], np.float32)
  masks = np.zeros((3, size, size), bool)
  masks[0, 14:28, 12:32] = True
  masks[1, 32:48, 32:56] = True
  crops = crop_masks(masks, boxes, r)
  gt = {"sota": {"boxes": np.stack([boxes, boxes]), "labels": np.array([[0, 2, 0], [1, 1, 0]], np.int32),
                 "valid": np.array([[True, True, False], [False, False, False]]),
                 "mask_crops": np.stack([crops, crops])},
        "fast": {"boxes": np.stack([boxes, boxes]), "labels": np.full((b, 3), 4, np.int32),
                 "valid": np.array([[True, True, False], [True, False, False]]),
                 "mask_crops": np.stack([crops, crops])}}
  graphdef, state = nnx.split(model)
  traces = []

  def loss_fn(state, feats, gt, key):
    traces.append(1)
    losses = nnx.merge(graphdef, state).losses(feats, gt, subsets=subsets, image_size=(size, size),
                                               key=key)
    return sum(jax.tree.leaves(losses)), losses

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (total, losses), grads = step(state, feats, gt, jax.random.key(3))
  assert {s: set(v) for s, v in losses.items()} == {
      s: {"rpn_cls", "rpn_bbox", "cls", "bbox", "mask"} for s in subsets}
  assert all(np.isfinite(float(v)) for v in jax.tree.leaves(losses))
  # BCE of near-zero logits is ~log 2 for any target: the mask loss sees positives.
  assert 0.3 < float(losses["fast"]["mask"]) < 1.5 and float(losses["sota"]["mask"]) > 0.3
  assert np.abs(np.asarray(grads["mask_predictors"]["fast"]["conv_logits"]["kernel"][...])).sum() > 0
  assert np.abs(np.asarray(grads["mask_head"]["convs"][0]["conv"]["kernel"][...])).sum() > 0
  gt2 = dict(gt, sota=dict(gt["sota"], valid=np.array([[True, False, False], [True, True, False]])))
  (total2, _), _ = step(state, feats, gt2, jax.random.key(3))
  assert len(traces) == 1 and float(total2) != float(total)

  pred = jax.jit(lambda st, f: nnx.merge(graphdef, st).predict(f, subsets=("fast",),
                                                               image_size=(size, size)))
  d = jax.tree.map(np.asarray, pred(state, [f[1::2] for f in feats]))["fast"]
  assert d["hboxes"].shape == (b, 16, 4) and d["masks"].shape == (b, 16, 28, 28)
  assert d["valid"].any() and ((d["labels"] >= 0) & (d["labels"] < 5))[d["valid"]].all()
  m = d["masks"]
  assert ((m >= 0) & (m <= 1)).all() and (m[~d["valid"]] == 0).all() and (m[d["valid"]] > 0).any()
