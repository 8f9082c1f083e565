"""The two-stage detector shared by Oriented R-CNN and Mask R-CNN (MTP_SPEC §3.2, §3.3).

One class, `TwoStageDetector`, holds what both R-CNNs of MTP share: the shared `neck` (mmdet FPN,
5 maps, strides 4..64), `rpn_head`, `roi_head` (Shared2FC trunk) and the per-subset
`predictors[subset]` (`fc_cls` C + 1, `fc_reg`), and runs the shared path: FPN and RPN once over
the whole interleaved batch (FPN has no normalisation, so this equals MTP's per-subset neck
calls), then per subset the RPN targets and loss, proposals, RoI sampling, RoI features (from that
subset's rows of FPN levels 0..3) and the box loss, with per-subset normalisations as MTP's
`models.py` (one `train_before_roihead` / `bbox_loss` per dataset). What differs is configuration
(`RPNConfig`, `RoIConfig`) plus two hooks a subclass overrides to add a branch on the sampled RoIs
(training) and on the detections (inference): Mask R-CNN's mask head.

Batch layout (`mtp_jax/models/multitask.py`): rows interleaved by subset, image i of subset g at
row i * G + g. Ground truth arrives padded per subset: {subset: {"boxes": (b, M_s, d), "labels":
(b, M_s) int32 0-based, "valid": (b, M_s) bool, + branch fields}}, d = 5 (le90) or 4 (x1, y1, x2,
y2). Everything is jittable with static shapes.

`init` picks the shared trunk's initialisation: 'mtp' (default, Deliberate) what MTP's pretraining
starts from, since it never calls mmdet's `init_weights()`: the FPN keeps ConvModule's
construction-time kaiming init, the RPN convs and the Shared2FC Linears PyTorch's defaults.
'mmdet': mmdet's init_cfg (FPN Xavier, RPN Normal(0.01), Shared2FC Xavier), what an mmdet
training would start from. The per-subset predictors have PyTorch's default init either way.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax.models.detection.fpn import FPN
from mtp_jax.models.detection.roi_head import (BoxPredictor, RoIConfig, RoITargets, Shared2FC,
                                               detections, roi_features, roi_loss, roi_targets)
from mtp_jax.models.detection.rpn import (RPNConfig, RPNHead, batch_rpn_targets, rpn_loss,
                                          rpn_proposals)
from mtp_jax.models.interleave import subset_rows

INITS = ("mtp", "mmdet")


class TwoStageDetector(nnx.Module):
  """FPN + RPN + R-CNN box branch, shared over subsets, with per-subset box predictors."""

  def __init__(self, in_channels, num_classes: dict, *, rpn: RPNConfig, roi: RoIConfig,
               channels: int = 256, fc_channels: int = 1024, init: str = "mtp", rngs: nnx.Rngs,
               dtype=None):
    """in_channels: the 4 encoder maps' channels; num_classes: {subset: C} (no background)."""
    if init not in INITS:
      raise ValueError(f"init {init!r} is not one of {INITS}")
    if rpn.rotated != roi.rotated:
      raise ValueError(f"RPN rotated={rpn.rotated} but R-CNN rotated={roi.rotated}")
    self.rpn_cfg, self.roi_cfg = rpn, roi
    self.num_classes = dict(num_classes)
    self.neck = FPN(list(in_channels), channels, 5, rngs=rngs, dtype=dtype, init=init)
    self.rpn_head = RPNHead(channels, rpn.num_anchors, rpn.reg_dim, rngs=rngs, dtype=dtype, init=init)
    self.roi_head = Shared2FC(channels, roi.roi_size, fc_channels,
                              init="torch" if init == "mtp" else "xavier", rngs=rngs, dtype=dtype)
    self.predictors = nnx.Dict({s: BoxPredictor(fc_channels, c, roi.fc_reg_outputs(c), rngs=rngs,
                                                dtype=dtype)
                                for s, c in self.num_classes.items()})

  # -- hooks of a second branch (Mask R-CNN's masks) ------------------------------------------

  def branch_losses(self, subset: str, maps, sample: RoITargets, gt: dict) -> dict:
    """Extra loss components of one subset from its sampled RoIs; none by default."""
    del subset, maps, sample, gt
    return {}

  def branch_predictions(self, subset: str, maps, dets: dict) -> dict:
    """Extra per-detection outputs of one subset (added to its detection dict); none by default."""
    del subset, maps, dets
    return {}

  # -- shared stages ------------------------------------------------------------------------

  def _rpn(self, features, image_size):
    """FPN + RPN head over the whole batch, plus the (static) anchors of its maps."""
    levels = self.neck(list(features))
    cls, reg = self.rpn_head(levels)
    sizes = [tuple(m.shape[1:3]) for m in levels]
    anchors = self.rpn_cfg.anchors.grid_anchors(sizes)
    anchor_valid = jnp.concatenate(self.rpn_cfg.anchors.valid_flags(sizes, image_size))
    return levels, cls, reg, anchors, anchor_valid

  def _box_head(self, subset, maps, rois):
    """RoI features of (b, S, d) rois on one subset's maps -> (b, S, C + 1), (b, S, reg_outputs)."""
    b, s = rois.shape[:2]
    feats = roi_features(maps, rois, self.roi_cfg)
    cls_score, bbox_pred = self.predictors[subset](self.roi_head(feats))
    return (cls_score.reshape(b, s, -1).astype(jnp.float32),
            bbox_pred.reshape(b, s, -1).astype(jnp.float32))

  def _check(self, subsets, features):
    missing = [s for s in subsets if s not in self.num_classes]
    if missing:
      raise ValueError(f"subsets {missing} have no predictor; known: {sorted(self.num_classes)}")
    if features[0].shape[0] % len(subsets):
      raise ValueError(f"batch {features[0].shape[0]} is not a multiple of {len(subsets)} subsets")

  def _per_subset(self, features, subsets, image_size):
    """Shared stages, then each subset's rows: (cls, reg, maps) per subset index and anchors."""
    subsets = tuple(subsets)
    self._check(subsets, features)
    groups = len(subsets)
    levels, cls, reg, anchors, anchor_valid = self._rpn(features, image_size)
    cls_g, reg_g = subset_rows(cls, groups), subset_rows(reg, groups)
    maps_g = [subset_rows(m, groups) for m in levels[:len(self.roi_cfg.featmap_strides)]]
    rows = [(cls_g[g], reg_g[g], [m[g] for m in maps_g]) for g in range(groups)]
    return subsets, rows, anchors, anchor_valid

  # -- training -----------------------------------------------------------------------------

  def losses(self, features, gt, *, subsets, image_size, key) -> dict:
    """Per-subset losses.

    Args:
      features: list of 4 (b * G, H_l, W_l, C_l) encoder maps (strides 4..32), rows interleaved.
      gt: {subset: {"boxes", "labels", "valid", + branch fields}} (module docstring).
      subsets: the G subset names in interleave order. image_size: static (H, W) pixels.
      key: PRNG key (split per subset, then RPN / RoI sampling, then per image).
    Returns:
      {subset: {"rpn_cls", "rpn_bbox", "cls", "bbox", + branch components}} float32 scalars.
    """
    subsets, rows, anchors, anchor_valid = self._per_subset(features, subsets, image_size)
    anchors_flat = jnp.concatenate(anchors)
    out = {}
    for (cls, reg, maps), subset, subset_key in zip(rows, subsets,
                                                    jax.random.split(key, len(subsets))):
      rpn_key, roi_key = jax.random.split(subset_key)
      g = gt[subset]
      boxes = jnp.asarray(g["boxes"], jnp.float32)
      labels = jnp.asarray(g["labels"], jnp.int32)
      valid = jnp.asarray(g["valid"], bool)
      targets = batch_rpn_targets(anchors_flat, anchor_valid, boxes, valid, rpn_key,
                                  self.rpn_cfg, image_size)
      losses = rpn_loss(cls, reg, targets, cfg=self.rpn_cfg)
      proposals, _, proposal_valid = rpn_proposals(cls, reg, anchors, image_size, self.rpn_cfg,
                                                   True)
      num_classes = self.num_classes[subset]
      sample = jax.vmap(
          lambda p, pv, bx, lb, v, k: roi_targets(p, pv, bx, lb, v, k, self.roi_cfg, num_classes))(
          proposals, proposal_valid, boxes, labels, valid,
          jax.random.split(roi_key, boxes.shape[0]))
      cls_score, bbox_pred = self._box_head(subset, maps, sample.rois)
      losses.update(roi_loss(cls_score, bbox_pred, sample, self.roi_cfg))
      losses.update(self.branch_losses(subset, maps, sample, g))
      out[subset] = losses
    return out

  # -- inference ----------------------------------------------------------------------------

  def predict(self, features, *, subsets, image_size) -> dict:
    """Per-subset detections with the test-time RPN and R-CNN settings.

    Returns {subset: `detections` dict + branch outputs}: boxes (b, K, d) under "rboxes"
    (rotated) or "hboxes", "scores" (b, K), "labels" (b, K) int32, "valid" (b, K) bool,
    "num_candidates" (b,); K = roi.max_per_img.
    """
    subsets, rows, anchors, _ = self._per_subset(features, subsets, image_size)
    out = {}
    for (cls, reg, maps), subset in zip(rows, subsets):
      proposals, _, proposal_valid = rpn_proposals(cls, reg, anchors, image_size, self.rpn_cfg,
                                                   False)
      cls_score, bbox_pred = self._box_head(subset, maps, proposals)
      dets = detections(cls_score, bbox_pred, proposals, proposal_valid, image_size, self.roi_cfg)
      dets.update(self.branch_predictions(subset, maps, dets))
      out[subset] = dets
    return out
