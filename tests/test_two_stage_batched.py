"""The batched two-stage detector against a per-subset reference: every stage but the predictors
runs once over all b * G rows (ground truth padded to the largest M_s), yet each subset's losses
and the gradients of their sum equal a loop that runs RPN targets, proposals, RoI sampling,
RoI features, trunk and losses one subset at a time on its own rows and its own unpadded
ground truth, with the same keys (split per subset, then RPN / RoI, then per image)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax.models.detection.mask_head import MaskConfig, mask_loss
from mtp_jax.models.detection.roi_head import RoIConfig, roi_features, roi_loss, roi_targets
from mtp_jax.models.detection.rpn import ProposalConfig, RPNConfig, batch_rpn_targets, rpn_loss, rpn_proposals
from mtp_jax.models.heads.mask_rcnn import MaskRCNN
from mtp_jax.models.heads.oriented_rcnn import OrientedRCNN
from mtp_jax.models.interleave import subset_rows
from mtp_jax.ops.mask_targets import crop_masks, mask_targets

SIZE, B, CROP = 64, 2, 16
SUBSETS = ("sota", "sior", "fast")
CLASSES = {"sota": 3, "sior": 5, "fast": 2}
NUM_GT = {"sota": 3, "sior": 5, "fast": 4}     # each subset's own padding M_s


def _features():
  return [jax.random.normal(jax.random.key(i), (B * len(SUBSETS), SIZE // s, SIZE // s, 8))
          for i, s in enumerate((4, 8, 16, 32))]


def _gt(rotated: bool):
  rng = np.random.default_rng(0)
  gt = {}
  for subset in SUBSETS:
    m = NUM_GT[subset]
    lo = rng.uniform(2, 40, (B, m, 2))
    wh = rng.uniform(8, 24, (B, m, 2))
    hboxes = np.concatenate([lo, lo + wh], -1).astype(np.float32)
    valid = rng.uniform(size=(B, m)) < 0.7
    valid[0, 0] = True
    g = {"labels": rng.integers(0, CLASSES[subset], (B, m)).astype(np.int32), "valid": valid}
    if rotated:
      g["boxes"] = np.concatenate([lo + wh / 2, wh, rng.uniform(-1, 1, (B, m, 1))], -1).astype(np.float32)
    else:
      g["boxes"] = hboxes
      masks = np.zeros((B, m, SIZE, SIZE), bool)
      for i in range(B):
        for k in range(m):
          x1, y1, x2, y2 = hboxes[i, k].astype(int)
          masks[i, k, y1 + 2:y2, x1:x2 - 3] = True
      g["mask_crops"] = np.stack([crop_masks(masks[i], hboxes[i], CROP) for i in range(B)])
    gt[subset] = g
  return gt


def _reference_losses(model, features, gt, key):
  """The per-subset loop: each subset's rows, its own gt (M_s slots), one subset at a time."""
  groups = len(SUBSETS)
  levels, cls, reg, anchors, anchor_valid = model._rpn(features, (SIZE, SIZE))
  maps = levels[:len(model.roi_cfg.featmap_strides)]
  cls_g, reg_g = subset_rows(cls, groups), subset_rows(reg, groups)
  maps_g = [subset_rows(m, groups) for m in maps]
  out = {}
  for g, (subset, subset_key) in enumerate(zip(SUBSETS, jax.random.split(key, groups))):
    rpn_key, roi_key = jax.random.split(subset_key)
    sub_maps = [m[g] for m in maps_g]
    boxes = jnp.asarray(gt[subset]["boxes"], jnp.float32)
    labels, valid = jnp.asarray(gt[subset]["labels"]), jnp.asarray(gt[subset]["valid"])
    targets = batch_rpn_targets(jnp.concatenate(anchors), anchor_valid, boxes, valid, rpn_key,
                                model.rpn_cfg, (SIZE, SIZE))
    losses = rpn_loss(cls_g[g], reg_g[g], targets, cfg=model.rpn_cfg)
    proposals, _, pvalid = rpn_proposals(cls_g[g], reg_g[g], anchors, (SIZE, SIZE), model.rpn_cfg, True)
    sample = jax.vmap(lambda p, pv, bx, lb, v, k: roi_targets(
        p, pv, bx, lb, v, k, model.roi_cfg, CLASSES[subset]))(
        proposals, pvalid, boxes, labels, valid, jax.random.split(roi_key, B))
    s = sample.rois.shape[1]
    x = model.roi_head(roi_features(sub_maps, sample.rois, model.roi_cfg))
    cls_score, bbox_pred = model.predictors[subset](x)
    losses.update(roi_loss(cls_score.reshape(B, s, -1), bbox_pred.reshape(B, s, -1), sample,
                           model.roi_cfg))
    if isinstance(model, MaskRCNN):
      num_pos = int(model.roi_cfg.num_samples * model.roi_cfg.pos_fraction)
      rois, gt_index = sample.rois[:, :num_pos], sample.gt_index[:, :num_pos]
      positive = (gt_index >= 0) & sample.valid[:, :num_pos]
      feats = roi_features(sub_maps, rois, model.roi_cfg, output_size=model.mask_cfg.roi_size)
      logits = model.mask_predictors[subset].class_logits(
          model.mask_head(feats), sample.labels[:, :num_pos].reshape(-1))
      mt = jax.vmap(lambda c, bx, r, i: mask_targets(c, bx, r, i, model.mask_cfg.mask_size))(
          gt[subset]["mask_crops"], boxes, rois, jnp.where(positive, gt_index, -1))
      losses["mask"] = mask_loss(logits.reshape(B, num_pos, *logits.shape[1:]),
                                 jax.lax.stop_gradient(mt), positive, model.mask_cfg)
    out[subset] = losses
  return out


def _check_equal(model, gt):
  features = _features()
  graphdef, state = nnx.split(model)
  key = jax.random.key(7)

  def run(fn):
    def total(st):
      losses = fn(nnx.merge(graphdef, st))
      return sum(jax.tree.leaves(losses)), losses
    return jax.jit(jax.value_and_grad(total, has_aux=True))(state)

  (_, got), got_grads = run(lambda m: m.losses(features, gt, subsets=SUBSETS,
                                               image_size=(SIZE, SIZE), key=key))
  (_, want), want_grads = run(lambda m: _reference_losses(m, features, gt, key))
  for subset in SUBSETS:
    assert set(got[subset]) == set(want[subset])
    for name in want[subset]:
      np.testing.assert_allclose(float(got[subset][name]), float(want[subset][name]), rtol=1e-5,
                                 atol=1e-7, err_msg=f"{subset} {name}")
  # The cases the test means to cover: positives in every subset's box and RPN losses.
  assert all(float(want[s]["bbox"]) > 0 and float(want[s]["rpn_bbox"]) > 0 for s in SUBSETS)
  flat_got = jax.tree.leaves_with_path(got_grads)
  flat_want = dict(jax.tree.leaves_with_path(want_grads))
  assert len(flat_got) == len(flat_want)
  for path, g in flat_got:
    w = np.asarray(flat_want[path])
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(w).max()),
                               err_msg=jax.tree_util.keystr(path))
  return model, features


def test_batched_oriented_rcnn_equals_per_subset_loop():
  rpn = RPNConfig(num_samples=32, train_proposals=ProposalConfig(48, 48, 0.8, 0.0),
                  test_proposals=ProposalConfig(48, 48, 0.8, 0.0))
  model = OrientedRCNN([8, 8, 8, 8], CLASSES, rpn=rpn, roi=RoIConfig(num_samples=32, max_per_img=16),
                       channels=16, fc_channels=32, rngs=nnx.Rngs(0))
  model, features = _check_equal(model, _gt(rotated=True))
  # Prediction over the three subsets' rows at once = the middle subset's rows alone.
  graphdef, state = nnx.split(model)
  predict = lambda f, subsets: jax.jit(lambda st: nnx.merge(graphdef, st).predict(
      f, subsets=subsets, image_size=(SIZE, SIZE)))(state)
  together = predict(features, SUBSETS)["sior"]
  alone = predict([f[1::len(SUBSETS)] for f in features], ("sior",))["sior"]
  assert together["valid"].any()
  for name, value in alone.items():
    np.testing.assert_allclose(np.asarray(together[name]), np.asarray(value), rtol=1e-5, atol=1e-5,
                               err_msg=name)


def test_batched_mask_rcnn_equals_per_subset_loop():
  rpn = RPNConfig.mask_rcnn(num_samples=32, train_proposals=ProposalConfig(48, 48, 0.7, 0.0),
                            test_proposals=ProposalConfig(48, 48, 0.7, 0.0))
  model = MaskRCNN([8, 8, 8, 8], CLASSES, rpn=rpn, roi=RoIConfig.mask_rcnn(num_samples=32, max_per_img=16),
                   mask=MaskConfig(conv_channels=8), channels=16, fc_channels=32, rngs=nnx.Rngs(0))
  _check_equal(model, _gt(rotated=False))
