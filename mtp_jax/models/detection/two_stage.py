"""The two-stage detector shared by Oriented R-CNN and Mask R-CNN (MTP_SPEC §3.2, §3.3).

One class, `TwoStageDetector`, holds what both R-CNNs of MTP share: the shared `neck` (mmdet FPN,
5 maps, strides 4..64), `rpn_head`, `roi_head` (Shared2FC trunk) and the per-subset
`predictors[subset]` (`fc_cls` C_s + 1, `fc_reg`). What differs between the two is
configuration (`RPNConfig`, `RoIConfig`) plus hooks a subclass overrides to add a branch on the
sampled RoIs (training) and on the detections (inference): Mask R-CNN's mask head.

Batch layout (`mtp_jax/models/interleave.py`): G subsets of b images each, interleaved, image i of
subset g at row i * G + g of the B = b * G rows. Ground truth arrives padded per subset:
{subset: {"boxes": (b, M_s, d), "labels": (b, M_s) int32 0-based, "valid": (b, M_s) bool, +
branch fields}}, d = 5 (le90) or 4 (x1, y1, x2, y2). Everything is jittable with static shapes.

Training runs every stage once over all B rows, so the step traces and compiles one copy of each
(not G): FPN + RPN head, RPN targets (gt stacked to (B, M, d), M = max M_s, padding invalid),
proposals, RoI sampling (the background label C_s and the own padding M_s are per-row values,
(B,) int32), RoIAlign features and the Shared2FC trunk -> (B, S, fc). Per subset stay only
what differs: `predictors[subset]` on that subset's rows of the trunk output (rows g::G, a local
reshape) and the losses with their normalisations over the subset's own samples, since MTP
computes each dataset's losses separately (`MTP:Multi-Task_Pretrain/models.py`: one
`train_before_roihead` / `bbox_loss` per dataset; mmdet `AnchorHead.loss_by_feat`,
`BBoxHead.loss` average over the batch they are given). The FPN has no normalisation, so one call
over all rows equals MTP's per-dataset neck calls; every other shared stage is per image.

The result equals one subset at a time: row keys are derived as one subset at a time would draw
them (`_row_keys`), and `roi_targets(num_gt=M_s)` keeps each candidate's sampler index despite
the extra gt padding (tests/test_two_stage_batched.py). `predict` batches proposals, RoI
features and the trunk the same way; the predictors, `detections` (C_s classes) and the branch's
test outputs run per subset.

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
from mtp_jax.models.detection.rpn import (RPNConfig, RPNHead, rpn_loss, rpn_proposals,
                                          rpn_targets)
from mtp_jax.models.interleave import rows_of

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

  def branch_gt(self, subset: str, gt: dict) -> dict:
    """The ground-truth fields the branch needs of one subset, {name: (b, M_s, ...)}; none here."""
    del subset, gt
    return {}

  def branch_losses(self, subsets, maps, sample: RoITargets, gt: dict) -> dict:
    """Extra loss components per subset, {subset: {name: scalar}}, from every row's sampled RoIs.

    maps: FPN levels 0..3 of all b * G rows; sample: `RoITargets` (b * G, S); gt: the rows'
    stacked ground truth (`_stack_gt`), "boxes" (b * G, M, d) + the `branch_gt` fields."""
    del maps, sample, gt
    return {s: {} for s in subsets}

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

  def _trunk(self, maps, rois):
    """RoI features of (B, S, d) rois on their rows' maps -> (B, S, fc) Shared2FC output."""
    b, s = rois.shape[:2]
    return self.roi_head(roi_features(maps, rois, self.roi_cfg)).reshape(b, s, -1)

  def _predict_boxes(self, subset, x):
    """(b, S, fc) trunk output of one subset's rows -> (b, S, C + 1), (b, S, reg_outputs)."""
    b, s = x.shape[:2]
    cls_score, bbox_pred = self.predictors[subset](x.reshape(b * s, -1))
    return (cls_score.reshape(b, s, -1).astype(jnp.float32),
            bbox_pred.reshape(b, s, -1).astype(jnp.float32))

  def _check(self, subsets, features):
    subsets = tuple(subsets)
    missing = [s for s in subsets if s not in self.num_classes]
    if missing:
      raise ValueError(f"subsets {missing} have no predictor; known: {sorted(self.num_classes)}")
    if features[0].shape[0] % len(subsets):
      raise ValueError(f"batch {features[0].shape[0]} is not a multiple of {len(subsets)} subsets")
    return subsets

  def _stack_gt(self, gt, subsets):
    """{subset: (b, M_s, ...) fields} -> ({name: (b * G, M, ...)} interleaved rows, M = max M_s
    (padding slots invalid and zero), per-row (b * G,) int32 C_s and M_s)."""
    fields = [dict(boxes=jnp.asarray(gt[s]["boxes"], jnp.float32),
                   labels=jnp.asarray(gt[s]["labels"], jnp.int32),
                   valid=jnp.asarray(gt[s]["valid"], bool), **self.branch_gt(s, gt[s]))
              for s in subsets]
    m = max(f["boxes"].shape[1] for f in fields)
    pad = lambda a: jnp.pad(a, [(0, 0), (0, m - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    rows = {k: jnp.stack([pad(f[k]) for f in fields], 1) for k in fields[0]}
    rows = {k: v.reshape(-1, *v.shape[2:]) for k, v in rows.items()}
    b = fields[0]["boxes"].shape[0]
    per_row = lambda values: jnp.tile(jnp.asarray(values, jnp.int32), b)
    return (rows, per_row([self.num_classes[s] for s in subsets]),
            per_row([f["boxes"].shape[1] for f in fields]))

  # -- training -----------------------------------------------------------------------------

  def losses(self, features, gt, *, subsets, image_size, key) -> dict:
    """Per-subset losses, every stage but the predictors batched over all b * G rows.

    Args:
      features: list of 4 (b * G, H_l, W_l, C_l) encoder maps (strides 4..32), rows interleaved.
      gt: {subset: {"boxes", "labels", "valid", + branch fields}} (module docstring).
      subsets: the G subset names in interleave order. image_size: static (H, W) pixels.
      key: PRNG key, derived per row as `_row_keys`.
    Returns:
      {subset: {"rpn_cls", "rpn_bbox", "cls", "bbox", + branch components}} float32 scalars.
    """
    subsets = self._check(subsets, features)
    groups = len(subsets)
    levels, cls, reg, anchors, anchor_valid = self._rpn(features, image_size)
    maps = levels[:len(self.roi_cfg.featmap_strides)]
    rows, num_classes, num_gt = self._stack_gt(gt, subsets)
    rpn_keys, roi_keys = _row_keys(key, groups, cls.shape[0] // groups)
    targets = _rpn_targets(jnp.concatenate(anchors), anchor_valid, rows["boxes"], rows["valid"],
                           rpn_keys, self.rpn_cfg, image_size)
    proposals, _, proposal_valid = rpn_proposals(cls, reg, anchors, image_size, self.rpn_cfg, True)
    sample = jax.vmap(
        lambda p, pv, bx, lb, v, k, c, m: roi_targets(p, pv, bx, lb, v, k, self.roi_cfg, c, m))(
        proposals, proposal_valid, rows["boxes"], rows["labels"], rows["valid"], roi_keys,
        num_classes, num_gt)
    x = self._trunk(maps, sample.rois)
    branch = self.branch_losses(subsets, maps, sample, rows)
    of = lambda tree, g: rows_of(tree, groups, g)
    out = {}
    for g, subset in enumerate(subsets):
      losses = rpn_loss(of(cls, g), of(reg, g), of(targets, g), cfg=self.rpn_cfg)
      cls_score, bbox_pred = self._predict_boxes(subset, of(x, g))
      losses.update(roi_loss(cls_score, bbox_pred, of(sample, g), self.roi_cfg))
      losses.update(branch[subset])
      out[subset] = losses
    return out

  # -- inference ----------------------------------------------------------------------------

  def predict(self, features, *, subsets, image_size) -> dict:
    """Per-subset detections with the test-time RPN and R-CNN settings.

    Proposals, RoI features and the trunk run once over all rows; the predictors, `detections`
    and the branch per subset. Returns {subset: `detections` dict + branch outputs}: boxes
    (b, K, d) under "rboxes" (rotated) or "hboxes", "scores" (b, K), "labels" (b, K) int32,
    "valid" (b, K) bool, "num_candidates" (b,); K = roi.max_per_img.
    """
    subsets = self._check(subsets, features)
    groups = len(subsets)
    levels, cls, reg, anchors, _ = self._rpn(features, image_size)
    maps = levels[:len(self.roi_cfg.featmap_strides)]
    proposals, _, proposal_valid = rpn_proposals(cls, reg, anchors, image_size, self.rpn_cfg,
                                                 False)
    x = self._trunk(maps, proposals)
    of = lambda tree, g: rows_of(tree, groups, g)
    out = {}
    for g, subset in enumerate(subsets):
      cls_score, bbox_pred = self._predict_boxes(subset, of(x, g))
      dets = detections(cls_score, bbox_pred, of(proposals, g), of(proposal_valid, g), image_size,
                        self.roi_cfg)
      dets.update(self.branch_predictions(subset, [of(m, g) for m in maps], dets))
      out[subset] = dets
    return out


def _row_keys(key, groups: int, b: int):
  """(b * G,) RPN and (b * G,) RoI-sampling keys, row i * G + g: split(key, G)[g] split in
  (RPN, RoI), each split over the subset's b images (as one subset at a time would draw them)."""
  rpn, roi = [], []
  for subset_key in jax.random.split(key, groups):
    rpn_key, roi_key = jax.random.split(subset_key)
    rpn.append(jax.random.split(rpn_key, b))
    roi.append(jax.random.split(roi_key, b))
  interleave = lambda keys: jnp.stack(keys, 1).reshape(b * groups, *keys[0].shape[1:])
  return interleave(rpn), interleave(roi)


def _rpn_targets(anchors, anchor_valid, boxes, valid, keys, cfg: RPNConfig, image_size):
  """`rpn_targets` of every row: gt (B, M, d), valid (B, M), keys (B,) -> leaves (B, ...)."""
  size = jnp.broadcast_to(jnp.asarray(image_size, jnp.float32), (boxes.shape[0], 2))
  return jax.vmap(lambda g, v, k, s: rpn_targets(anchors, anchor_valid, g, v, k, cfg, s))(
      boxes, valid, keys, size)
