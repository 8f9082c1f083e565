"""Oriented R-CNN rotated-detection head of MTP (MTP_SPEC §3.2, §3.3), shared trunk + per-dataset
predictors.

Shared by all subsets: `neck` (mmdet FPN, 5 maps, strides 4..64), `rpn_head` (oriented RPN,
midpoint-offset deltas) and `roi_head` (Shared2FC trunk). Per subset: `predictors[subset]`
(`fc_cls` C + 1, `fc_reg` 5, class-agnostic), MTP's `rotdetroiboxhead_fc_{cls,reg}_k`.

Batch layout (`mtp_jax/models/multitask.py`): rows interleaved by subset, image i of subset g at
row i * G + g. FPN and RPN run once over the whole batch (FPN has no normalisation, so this equals
MTP's per-subset neck calls); RPN targets and loss, proposals, RoI sampling, RoI features (from
that subset's rows of FPN levels 0..3) and the predictor are per subset, and so are the loss
normalisations, as in MTP's `models.py` (one `train_before_roihead` / `bbox_loss` per dataset).
Everything is jittable with static shapes: gt arrives padded, {subset: (b, M_s, ...)}.
`init` picks the trunk's initialisation: 'mtp' (default) what MTP effectively runs, 'mmdet' the
mmdet/mmrotate init_cfg (see `OrientedRCNN.__init__`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax.models.detection.fpn import FPN
from mtp_jax.models.interleave import subset_rows
from mtp_jax.models.detection.roi_head import (BoxPredictor, RoIConfig, Shared2FC, roi_loss,
                                               roi_targets, rotated_detections,
                                               rotated_roi_features)
from mtp_jax.models.detection.rpn import (RPNConfig, RPNHead, batch_rpn_targets, rpn_loss,
                                          rpn_proposals)


class OrientedRCNN(nnx.Module):
  """The rotated-detection decoder: encoder maps -> per-subset losses or detections."""

  def __init__(self, in_channels, num_classes: dict, *, rpn: RPNConfig = RPNConfig(),
               roi: RoIConfig = RoIConfig(), channels: int = 256, fc_channels: int = 1024,
               init: str = "mtp", rngs: nnx.Rngs, dtype=None):
    """in_channels: the 4 encoder maps' channels; num_classes: {subset: C} (no background).

    init 'mtp' (default, Deliberate): what MTP's pretraining starts from, since it never calls
    mmdet's `init_weights()`: the FPN keeps ConvModule's construction-time kaiming init, the RPN
    convs and the Shared2FC Linears PyTorch's defaults. 'mmdet': mmdet's init_cfg (FPN Xavier,
    RPN Normal(0.01), Shared2FC Xavier), what an mmdet/mmrotate training would start from.
    The per-subset predictors have PyTorch's default init either way (MTP_SPEC §3.2).
    """
    if init not in ("mtp", "mmdet"):
      raise ValueError(f"init {init!r} is not 'mtp' or 'mmdet'")
    self.rpn_cfg, self.roi_cfg = rpn, roi
    self.num_classes = dict(num_classes)
    self.neck = FPN(list(in_channels), channels, 5, rngs=rngs, dtype=dtype, init=init)
    self.rpn_head = RPNHead(channels, rpn.num_anchors, rpn.reg_dim, rngs=rngs, dtype=dtype, init=init)
    self.roi_head = Shared2FC(channels, roi.roi_size, fc_channels,
                              init="torch" if init == "mtp" else "xavier", rngs=rngs, dtype=dtype)
    self.predictors = nnx.Dict({s: BoxPredictor(fc_channels, c, roi.reg_dim, rngs=rngs,
                                                dtype=dtype)
                                for s, c in self.num_classes.items()})

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
    """RoI features of (b, S, 5) rois on one subset's maps -> (b, S, C + 1), (b, S, 5)."""
    b, s = rois.shape[:2]
    feats = rotated_roi_features(maps, rois, self.roi_cfg)
    cls_score, bbox_pred = self.predictors[subset](self.roi_head(feats))
    return (cls_score.reshape(b, s, -1).astype(jnp.float32),
            bbox_pred.reshape(b, s, -1).astype(jnp.float32))

  def _check(self, subsets, features):
    missing = [s for s in subsets if s not in self.num_classes]
    if missing:
      raise ValueError(f"subsets {missing} have no predictor; known: {sorted(self.num_classes)}")
    if features[0].shape[0] % len(subsets):
      raise ValueError(f"batch {features[0].shape[0]} is not a multiple of {len(subsets)} subsets")

  # -- training -----------------------------------------------------------------------------

  def losses(self, features, gt, *, subsets, image_size, key) -> dict:
    """Per-subset Oriented R-CNN losses.

    Args:
      features: list of 4 (b * G, H_l, W_l, C_l) encoder maps (strides 4..32), rows interleaved.
      gt: {subset: {"rboxes": (b, M_s, 5) le90, "labels": (b, M_s) int32 0-based,
        "valid": (b, M_s) bool}}.
      subsets: the G subset names in interleave order. image_size: static (H, W) pixels.
      key: PRNG key (split per subset, then RPN / RoI sampling, then per image).
    Returns:
      {subset: {"rpn_cls", "rpn_bbox", "cls", "bbox"}} float32 scalars.
    """
    subsets = tuple(subsets)
    self._check(subsets, features)
    groups = len(subsets)
    levels, cls, reg, anchors, anchor_valid = self._rpn(features, image_size)
    anchors_flat = jnp.concatenate(anchors)
    cls_g, reg_g = subset_rows(cls, groups), subset_rows(reg, groups)
    maps_g = [subset_rows(m, groups) for m in levels[:len(self.roi_cfg.featmap_strides)]]
    out = {}
    for g, (subset, subset_key) in enumerate(zip(subsets, jax.random.split(key, groups))):
      rpn_key, roi_key = jax.random.split(subset_key)
      boxes = jnp.asarray(gt[subset]["rboxes"], jnp.float32)
      labels = jnp.asarray(gt[subset]["labels"], jnp.int32)
      valid = jnp.asarray(gt[subset]["valid"], bool)
      targets = batch_rpn_targets(anchors_flat, anchor_valid, boxes, valid, rpn_key,
                                  self.rpn_cfg, image_size)
      losses = rpn_loss(cls_g[g], reg_g[g], targets, cfg=self.rpn_cfg)
      proposals, _, proposal_valid = rpn_proposals(cls_g[g], reg_g[g], anchors, image_size,
                                                   self.rpn_cfg, True)
      sample = jax.vmap(
          lambda p, pv, bx, lb, v, k: roi_targets(p, pv, bx, lb, v, k, self.roi_cfg,
                                                  self.num_classes[subset]))(
          proposals, proposal_valid, boxes, labels, valid,
          jax.random.split(roi_key, boxes.shape[0]))
      cls_score, bbox_pred = self._box_head(subset, [m[g] for m in maps_g], sample.rois)
      losses.update(roi_loss(cls_score, bbox_pred, sample, self.roi_cfg))
      out[subset] = losses
    return out

  # -- inference ----------------------------------------------------------------------------

  def predict(self, features, *, subsets, image_size) -> dict:
    """Per-subset detections with the test-time RPN and R-CNN settings.

    Returns {subset: {"rboxes" (b, K, 5), "scores" (b, K), "labels" (b, K) int32, "valid"
    (b, K) bool, "num_candidates" (b,)}}, K = roi.max_per_img (see `rotated_detections`).
    """
    subsets = tuple(subsets)
    self._check(subsets, features)
    groups = len(subsets)
    levels, cls, reg, anchors, _ = self._rpn(features, image_size)
    cls_g, reg_g = subset_rows(cls, groups), subset_rows(reg, groups)
    maps_g = [subset_rows(m, groups) for m in levels[:len(self.roi_cfg.featmap_strides)]]
    out = {}
    for g, subset in enumerate(subsets):
      proposals, _, proposal_valid = rpn_proposals(cls_g[g], reg_g[g], anchors, image_size,
                                                   self.rpn_cfg, False)
      cls_score, bbox_pred = self._box_head(subset, [m[g] for m in maps_g], proposals)
      out[subset] = rotated_detections(cls_score, bbox_pred, proposals, proposal_valid,
                                       image_size, self.roi_cfg)
    return out
