"""Second stage of the two-stage detectors: RoI sampling, box head, losses, rotated post-processing.

One second stage for Oriented R-CNN and Mask R-CNN: the `Shared2FC` trunk, the per-dataset
`BoxPredictor`, `roi_targets` (max-IoU assignment with the ground truth added as proposals, random
sampling, regression targets), `roi_loss` (softmax CE + SmoothL1 or L1), `roi_features` (RoIAlign
or RoIAlignRotated on the FPN level of each box) and `detections` (test-time decode + class-aware
NMS). The two detectors differ only in `RoIConfig` fields (`rotated`, `class_agnostic`, the coder,
the loss, the test settings): `RoIConfig()` is Oriented R-CNN's, `RoIConfig.mask_rcnn()` Mask
R-CNN's. Rotated boxes are le90 (cx, cy, w, h, angle): pixels, radians, y down (DESIGN.md §4);
horizontal boxes (x1, y1, x2, y2) pixels.

Sources (mmdet 3.x / mmrotate 1.x semantics, as MTP's copies in
`MTP:Multi-Task_Pretrain/rotated_detection/{bbox_head.py, base_bbox_head.py, standard_roi_head.py,
oriented_rcnn.py}` use them):
- assignment + sampling: `MTP_RD_StandardRoIHead.gen_sampling_results` (mmdet
  `StandardRoIHead.loss`): `MaxIoUAssigner` with mmrotate `RBboxOverlaps2D`
  (`mmrotate/structures/bbox/bbox_overlaps.py`: w, h clamped to >= 1e-3 before mmcv
  `box_iou_rotated`), then `RandomSampler.sample` with `add_gt_as_proposals` (gts prepended and
  assigned to themselves).
- targets: `MTP_RD_BBoxHead._get_targets_single` (mmdet `BBoxHead._get_targets_single`):
  labels = gt class for positives, C (background) for negatives; label weight pos_weight (1 when
  <= 0) for positives, 1 for negatives; bbox targets = coder.encode(roi, gt) and weights 1 for
  positives only.
- losses: `MTP_RD_BBoxHead.loss` (mmdet `BBoxHead.loss`): CE avg_factor = max(#(label_weight > 0),
  1); SmoothL1 (Mask R-CNN: L1) over positives (class-specific regression: the deltas of the
  positive's class) with avg_factor = bbox_targets.size(0) (every sampled RoI of the
  batch); mmdet's `weight_reduce_loss` divides by (avg_factor + float32 eps).
- trunk: `MTP_RD_Shared2FCBBoxHead` (mmdet `Shared2FCBBoxHead`): flatten (C, H, W), two
  Linear + ReLU; the predictors are MTP's `rotdetroiboxhead_fc_{cls,reg}_k` (MTP_SPEC §3.2).
- test: `MTP_RD_Shared2FCBBoxHead._predict_by_feat_single`: softmax, class-agnostic decode with
  max_shape = img_shape, mmdet `multiclass_nms(..., box_dim=5)` (`mmdet/models/layers/
  bbox_nms.py`, the same rule as mmrotate 0.x `multiclass_nms_rotated` in
  `mmrotate/core/post_processing/bbox_nms_rotated.py`): every (roi, class != background) pair
  with score > score_thr, class-aware `nms_rotated`, the max_per_img best by score.

Init: MTP builds these heads from mmdet/mmrotate classes but never calls `init_weights()` (no
mmengine Runner in `MTP:Multi-Task_Pretrain/main_pretrain.py`, `initialize()` commented out in
`models.py`), so its trunk really starts from PyTorch's default Linear init; `Shared2FC(init=...)`
offers that ('torch') or mmdet's init_cfg ('xavier': Xavier uniform, bias 0, the default here,
as the FPN follows mmdet's init_cfg too).
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax.models import layers
from mtp_jax.models.classes import with_background
from mtp_jax.ops.assign import max_iou_assign, prepend_gt_as_proposals, random_sample
from mtp_jax.ops.box_coders import ORIENTED_RCNN_CODER, RCNN_CODER
from mtp_jax.ops.iou import box_iou, box_iou_rotated
from mtp_jax.ops.rois import multilevel_roi_align, multilevel_roi_align_rotated
from mtp_jax.ops.suppression import nms, nms_rotated
from mtp_jax.parallel import sharding

_EPS = float(jnp.finfo(jnp.float32).eps)   # mmdet weight_reduce_loss: sum / (avg_factor + eps)
_MIN_SIZE = 1e-3                            # mmrotate rbbox_overlaps clamps w, h to >= 1e-3


@dataclasses.dataclass(frozen=True)
class RoIConfig:
  """R-CNN settings; the defaults are Oriented R-CNN's (MTP_SPEC §3.3,
  `MTP:rotated_detection/oriented_rcnn.py`), `RoIConfig.mask_rcnn()` Mask R-CNN's
  (`MTP:instance_segmentation/mask_rcnn.py`).

  `max_candidates` bounds the (proposal, class) pairs entering the test NMS (see
  `detections`): the static count is min(max_candidates, P * min(C, floor(1 /
  score_thr))). No more pairs than the second term can pass score_thr (a RoI's softmax scores sum
  to 1), so the selection is exact unless max_candidates binds.
  """
  rotated: bool = True                       # le90 boxes, box_iou_rotated (RBboxOverlaps2D),
                                             # RoIAlignRotated; else (x1, y1, x2, y2), box_iou
  # MaxIoUAssigner
  pos_iou_thr: float = 0.5
  neg_iou_thr: float = 0.5
  min_pos_iou: float = 0.5
  match_low_quality: bool = False
  gt_max_assign_all: bool = True
  # RandomSampler
  num_samples: int = 512
  pos_fraction: float = 0.25
  neg_pos_ub: int = -1
  add_gt_as_proposals: bool = True
  pos_weight: float = -1.0                   # <= 0 means 1
  # (Rotated)SingleRoIExtractor + RoIAlign(Rotated)
  roi_size: int = 7
  sampling_ratio: int = 2                    # 0: adaptive (mmcv RoIAlign)
  aligned: bool = True
  clockwise: bool = True
  featmap_strides: tuple = (4, 8, 16, 32)
  finest_scale: int = 56
  # box head
  coder: object = ORIENTED_RCNN_CODER
  reg_dim: int = 5                           # deltas per box
  class_agnostic: bool = True                # fc_reg: reg_dim (agnostic) or C * reg_dim outputs
  cls_loss_weight: float = 1.0
  bbox_loss_weight: float = 1.0
  bbox_loss: str = "smooth_l1"               # or "l1"
  smooth_l1_beta: float = 1.0
  # test_cfg.rcnn
  score_thr: float = 0.05
  nms_iou_thr: float = 0.1
  max_per_img: int = 2000
  max_candidates: int = 10000
  nms_tile: int = 256

  def __post_init__(self):
    if self.bbox_loss not in ("smooth_l1", "l1"):
      raise ValueError(f"bbox_loss {self.bbox_loss!r} is not 'smooth_l1' or 'l1'")
    if self.reg_dim != (5 if self.rotated else 4):
      raise ValueError(f"reg_dim {self.reg_dim} does not fit rotated={self.rotated}")

  @property
  def box_dim(self) -> int:
    return 5 if self.rotated else 4

  def fc_reg_outputs(self, num_classes: int) -> int:
    return self.reg_dim if self.class_agnostic else num_classes * self.reg_dim

  @classmethod
  def mask_rcnn(cls, **overrides):
    """MTP's Mask R-CNN R-CNN (mmdet mask_rcnn_r50_fpn): horizontal boxes, MaxIoU 0.5/0.5/0.5
    with low-quality matching, RoIAlign 7x7 sampling_ratio 0, class-specific DeltaXYWH (stds 0.1,
    0.1, 0.2, 0.2), CE + L1, test score 0.05, NMS 0.5, 100 per image."""
    values = dict(rotated=False, match_low_quality=True, sampling_ratio=0, coder=RCNN_CODER,
                  reg_dim=4, class_agnostic=False, bbox_loss="l1", nms_iou_thr=0.5,
                  max_per_img=100)
    return cls(**{**values, **overrides})


class RoITargets(NamedTuple):
  """Per-image sampled RoIs and their targets; S = num_samples (vmap adds leading dims)."""
  rois: jax.Array           # (S, 5) float, stop-gradient; padding slots hold a valid box
  labels: jax.Array         # (S,) int32: gt class for positives, num_classes for the rest
  label_weights: jax.Array  # (S,) float: pos_weight / 1 / 0 (padding)
  bbox_targets: jax.Array   # (S, d) float: coder.encode(roi, gt) for positives, else 0
  bbox_weights: jax.Array   # (S, d) float: 1 for positives
  valid: jax.Array          # (S,) bool: sampled (positive or negative)
  gt_index: jax.Array       # (S,) int32: matched gt for positives, -1 otherwise (mask targets)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

def _fc(din, dout, *, init, rngs, dtype, in_axis, out_axis):
  """Linear with mmdet's Xavier-uniform / zero-bias init or PyTorch's default nn.Linear init."""
  if init == "xavier":
    kernel_init, bias_init = nnx.initializers.xavier_uniform(), nnx.initializers.zeros
  elif init == "torch":
    kernel_init, bias_init = layers.torch_default_kernel_init, layers.torch_uniform_init(din)
  else:
    raise ValueError(f"init {init!r} is not 'xavier' or 'torch'")
  return layers.linear(din, dout, rngs=rngs, dtype=dtype, in_axis=in_axis, out_axis=out_axis,
                       kernel_init=kernel_init, bias_init=bias_init)


class Shared2FC(nnx.Module):
  """mmdet `Shared2FCBBoxHead` trunk: (R, h, w, C) RoI features -> (R, fc_channels).

  Flattens in PyTorch's (C, h, w) order, so `shared_fcs.0.kernel` is the transpose of PyTorch's
  `shared_fcs.0.weight` with no permutation. `init='xavier'` is mmdet's init_cfg (Xavier uniform,
  bias 0); `init='torch'` is what MTP effectively runs (module docstring, "Init").
  """

  def __init__(self, in_channels: int = 256, roi_size: int = 7, fc_channels: int = 1024, *,
               init: str = "xavier", rngs, dtype=None):
    fc = lambda din, dout, i, o: _fc(din, dout, init=init, rngs=rngs, dtype=dtype, in_axis=i,
                                     out_axis=o)
    flat = in_channels * roi_size * roi_size
    self.shared_fcs = nnx.List([fc(flat, fc_channels, "conv_in", "mlp"),
                                fc(fc_channels, fc_channels, "mlp", "conv_out")])

  def __call__(self, roi_feats):
    x = jnp.transpose(roi_feats, (0, 3, 1, 2)).reshape(roi_feats.shape[0], -1)
    for fc in self.shared_fcs:
      x = jax.nn.relu(fc(x))
    return x


class BoxPredictor(nnx.Module):
  """Per-dataset `fc_cls` (-> C + 1, index C = background) and `fc_reg` (-> reg_outputs: reg_dim
  class-agnostic, C * reg_dim class-specific, class c's deltas at [c * reg_dim, (c + 1) * reg_dim)
  as mmdet), PyTorch's default nn.Linear init (weights and biases U(+-1/sqrt(fan_in))), MTP_SPEC
  §3.2."""

  def __init__(self, fc_channels: int, num_classes: int, reg_outputs: int = 5, *, rngs, dtype=None):
    fc = lambda dout: _fc(fc_channels, dout, init="torch", rngs=rngs, dtype=dtype,
                          in_axis="conv_out", out_axis=None)
    self.fc_cls = fc(with_background(num_classes))   # background = index C (mmdet)
    self.fc_reg = fc(reg_outputs)

  def __call__(self, x):
    """(R, fc) -> (cls_score (R, C + 1), bbox_pred (R, reg_outputs))."""
    return self.fc_cls(x), self.fc_reg(x)


# ----------------------------------------------------------------------------------------------
# Training targets
# ----------------------------------------------------------------------------------------------

def _clamp_size(boxes):
  """Rotated boxes with w, h >= 1e-3 (mmrotate `rbbox_overlaps`)."""
  return boxes.at[..., 2:4].set(jnp.maximum(boxes[..., 2:4], _MIN_SIZE))


def _overlaps(gt_boxes, priors, rotated: bool):
  """(G, P) IoU: mmrotate `RBboxOverlaps2D` (rotated) or mmdet `BboxOverlaps2D`."""
  if rotated:
    return box_iou_rotated(_clamp_size(gt_boxes), _clamp_size(priors))
  return box_iou(gt_boxes, priors)


def _safe_for_encode(boxes, ok, rotated: bool):
  """Replaces boxes that are not encoded (negatives, padding) with a unit box, so that
  `coder.encode` never sees zero sizes (their targets are masked to 0 afterwards)."""
  unit = (jnp.array([0.0, 0.0, 1.0, 1.0, 0.0]) if rotated else jnp.array([0.0, 0.0, 1.0, 1.0]))
  boxes = jnp.where(ok[:, None], boxes, unit)
  return _clamp_size(boxes) if rotated else boxes


def _unpadded_order(num_gt_slots: int, num_proposals: int, num_gt):
  """(G + P,) gather order of [gt (G); proposals (P)] -> [gt[:num_gt]; proposals; gt[num_gt:]]."""
  i = jnp.arange(num_gt_slots + num_proposals)
  return jnp.where(i < num_gt, i, jnp.where(i < num_gt + num_proposals, num_gt_slots + i - num_gt,
                                            i - num_proposals))


def roi_targets(proposals, proposal_valid, gt_rboxes, gt_labels, gt_valid, key, cfg: RoIConfig,
                num_classes, num_gt=None) -> RoITargets:
  """mmdet `StandardRoIHead` sampling + `BBoxHead.get_targets` for one image (vmap for a batch).

  Args:
    proposals: (P, d) RPN proposals (gradients are stopped). proposal_valid: (P,) bool.
    gt_rboxes: (G, d) ground truth (padded). gt_labels: (G,) int, 0-based. gt_valid: (G,) bool.
    key: PRNG key of the sampler. num_classes: C (background index), int or traced ().
    num_gt: the image's own gt padding G_own <= G when it arrives padded further (a batch of
      subsets padded to the largest), int or traced (); None = G. The candidates [gt; proposals]
      are then ordered [gt[:G_own]; proposals; gt[G_own:]], so each keeps the index, and hence
      the sampler's i.i.d. key (`jax.random.uniform` draws per index), it has without the extra
      padding: the same sample as with G_own slots.
  Returns:
    `RoITargets` with S = cfg.num_samples slots, positives first.
  """
  proposals = jax.lax.stop_gradient(jnp.asarray(proposals, jnp.float32))
  gt_rboxes = jax.lax.stop_gradient(jnp.asarray(gt_rboxes, jnp.float32))
  gt_labels, gt_valid = jnp.asarray(gt_labels, jnp.int32), jnp.asarray(gt_valid, bool)
  if gt_rboxes.shape[0] == 0:   # one invalid slot keeps the gathers below well-formed
    gt_rboxes = jnp.zeros((1, proposals.shape[-1]), jnp.float32)
    gt_labels, gt_valid = jnp.zeros((1,), jnp.int32), jnp.zeros((1,), bool)
  overlaps = _overlaps(gt_rboxes, proposals, cfg.rotated)
  assign = max_iou_assign(overlaps, gt_valid, proposal_valid, cfg.pos_iou_thr, cfg.neg_iou_thr,
                          cfg.min_pos_iou, cfg.match_low_quality, cfg.gt_max_assign_all)
  boxes = proposals
  if cfg.add_gt_as_proposals:
    assign = prepend_gt_as_proposals(assign, gt_valid)
    boxes = jnp.concatenate([gt_rboxes, proposals], 0)
    if num_gt is not None:
      order = _unpadded_order(gt_rboxes.shape[0], proposals.shape[0], num_gt)
      boxes, assign = boxes[order], jax.tree.map(lambda a: a[order], assign)
  sample = random_sample(key, assign.gt_index, cfg.num_samples, cfg.pos_fraction, cfg.neg_pos_ub)
  rois = boxes[sample.indices]
  positive = sample.positive
  gt_index = jnp.where(positive, assign.gt_index[sample.indices] - 1, -1)
  matched = jnp.maximum(gt_index, 0)
  labels = jnp.where(positive, gt_labels[matched], num_classes).astype(jnp.int32)
  pos_weight = 1.0 if cfg.pos_weight <= 0 else float(cfg.pos_weight)
  label_weights = jnp.where(positive, pos_weight, sample.valid.astype(jnp.float32))
  deltas = cfg.coder.encode(_safe_for_encode(rois, positive, cfg.rotated),
                            _safe_for_encode(gt_rboxes[matched], positive, cfg.rotated))
  bbox_targets = jnp.where(positive[:, None], deltas, 0.0)
  bbox_weights = jnp.broadcast_to(positive[:, None], bbox_targets.shape).astype(jnp.float32)
  return RoITargets(jax.lax.stop_gradient(rois), labels, label_weights,
                    jax.lax.stop_gradient(bbox_targets), bbox_weights, sample.valid,
                    gt_index.astype(jnp.int32))


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

def smooth_l1(diff, beta: float):
  """mmdet `smooth_l1_loss` elementwise on |pred - target|: 0.5 d^2 / beta below beta."""
  diff = jnp.abs(diff)
  return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def roi_loss(cls_score, bbox_pred, targets: RoITargets, cfg: RoIConfig = RoIConfig()) -> dict:
  """mmdet `BBoxHead.loss` over every sampled RoI of a batch (any leading dims are flattened).

  Args:
    cls_score: (..., C + 1) logits. bbox_pred: (..., d) class-agnostic or (..., C * d)
      class-specific deltas (the positive's class slice is used, as mmdet does).
    targets: `RoITargets` with matching leading dims.
  Returns:
    {"cls": sum(CE * label_weight) / (max(#label_weight > 0, 1) + eps),
     "bbox": sum over positives' coordinates of SmoothL1 (or L1) / (#sampled RoIs + eps)}, times the
    loss weights; float32 scalars.
  """
  num_classes = cls_score.shape[-1] - 1
  logits = cls_score.reshape(-1, with_background(num_classes)).astype(jnp.float32)
  labels = targets.labels.reshape(-1)
  label_weights = targets.label_weights.reshape(-1).astype(jnp.float32)
  d = targets.bbox_targets.shape[-1]
  bbox_targets = targets.bbox_targets.reshape(-1, d).astype(jnp.float32)
  bbox_weights = targets.bbox_weights.reshape(-1, d).astype(jnp.float32)
  valid = targets.valid.reshape(-1)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, jnp.clip(labels, 0, num_classes)[:, None], -1)[:, 0]
  cls_avg = jnp.maximum((label_weights > 0).sum(), 1).astype(jnp.float32)
  loss_cls = (nll * label_weights).sum() / (cls_avg + _EPS)
  pred = bbox_pred.reshape(logits.shape[0], -1).astype(jnp.float32)
  if pred.shape[-1] != d:   # class-specific regression: the label's slice
    pred = pred.reshape(pred.shape[0], -1, d)
    pred = jnp.take_along_axis(pred, jnp.clip(labels, 0, pred.shape[1] - 1)[:, None, None], 1)[:, 0]
  positive = valid & (labels >= 0) & (labels < num_classes)
  diff = pred - bbox_targets
  per_coord = (smooth_l1(diff, cfg.smooth_l1_beta) if cfg.bbox_loss == "smooth_l1"
               else jnp.abs(diff)) * bbox_weights
  loss_bbox = jnp.where(positive[:, None], per_coord, 0.0).sum() / (valid.sum() + _EPS)
  return {"cls": cfg.cls_loss_weight * loss_cls, "bbox": cfg.bbox_loss_weight * loss_bbox}


# ----------------------------------------------------------------------------------------------
# RoI features and test-time detections
# ----------------------------------------------------------------------------------------------

def roi_features(maps, rois, cfg: RoIConfig, output_size: int | None = None):
  """mmdet `SingleRoIExtractor` + mmcv `RoIAlign` (horizontal), or mmrotate
  `RotatedSingleRoIExtractor` + `RoIAlignRotated` (cfg.rotated), on one subset's maps.

  Each image samples only its own maps (vmapped per image, so a batch-sharded step stays local).

  Args:
    maps: list of (b, H_l, W_l, C) FPN maps, strides cfg.featmap_strides (extra maps ignored).
    rois: (b, S, 5) rotated or (b, S, 4) horizontal boxes in image pixels, S per image.
    output_size: bins per side (default cfg.roi_size; Mask R-CNN's mask branch uses 14).
  Returns:
    (b * S, size, size, C), image-major.
  """
  maps = list(maps)[:len(cfg.featmap_strides)]
  size = output_size or cfg.roi_size

  def one(image_maps, image_rois):
    common = dict(finest_scale=cfg.finest_scale, sampling_ratio=cfg.sampling_ratio,
                  aligned=cfg.aligned)
    index = jnp.zeros(image_rois.shape[0], jnp.int32)
    image_maps = [m[None] for m in image_maps]
    if cfg.rotated:
      return multilevel_roi_align_rotated(image_maps, image_rois, index, size,
                                          cfg.featmap_strides, clockwise=cfg.clockwise, **common)
    return multilevel_roi_align(image_maps, image_rois, index, size, cfg.featmap_strides, **common)

  feats = jax.vmap(one)(maps, jax.lax.stop_gradient(rois))
  return feats.reshape(-1, *feats.shape[2:])


def num_candidates_bound(num_proposals: int, num_classes: int, cfg: RoIConfig) -> int:
  """Static number of (proposal, class) pairs kept before the NMS of `detections`.

  Softmax scores of one RoI sum to 1, so at most floor(1 / score_thr) of its classes can pass
  score_thr (20 at 0.05); the bound is exact below `cfg.max_candidates`.
  """
  per_roi = num_classes if cfg.score_thr <= 0 else min(num_classes, math.floor(1 / cfg.score_thr))
  return max(1, min(cfg.max_candidates, num_proposals * per_roi))


def _detections_single(scores, boxes, valid, cfg: RoIConfig):
  """One image: (P, C + 1) softmax scores, (P, d) class-agnostic or (P, C, d) class-specific
  decoded boxes, (P,) valid -> detection dict."""
  num_proposals, num_classes = scores.shape[0], scores.shape[1] - 1
  fg = scores[:, :num_classes]
  passing = (fg > cfg.score_thr) & valid[:, None]
  flat = jnp.where(passing, fg, -jnp.inf).reshape(-1)       # (proposal, class) pairs, row-major
  top, pair = jax.lax.top_k(flat, num_candidates_bound(num_proposals, num_classes, cfg))
  cand_valid = jnp.isfinite(top)
  cand_scores = jnp.where(cand_valid, top, 0.0)
  cand_labels = (pair % num_classes).astype(jnp.int32)
  cand_boxes = (boxes[pair // num_classes] if boxes.ndim == 2
                else boxes[pair // num_classes, cand_labels])
  suppress = nms_rotated if cfg.rotated else nms
  keep, _ = suppress(cand_boxes, cand_scores, cfg.nms_iou_thr, cfg.max_per_img,
                     classes=cand_labels, valid=cand_valid, tile_size=cfg.nms_tile)
  kept = keep >= 0
  safe = jnp.maximum(keep, 0)
  return {"rboxes" if cfg.rotated else "hboxes": jnp.where(kept[:, None], cand_boxes[safe], 0.0),
          "scores": jnp.where(kept, cand_scores[safe], 0.0),
          "labels": jnp.where(kept, cand_labels[safe], -1),
          "valid": kept,
          "num_candidates": passing.sum(dtype=jnp.int32)}


def detections(cls_score, bbox_pred, proposals, proposal_valid, image_size,
               cfg: RoIConfig = RoIConfig()) -> dict:
  """Test-time post-processing: mmrotate `_predict_by_feat_single` + `multiclass_nms` (Oriented
  R-CNN) or mmdet `BBoxHead._predict_by_feat_single` + `multiclass_nms` (Mask R-CNN).

  Softmax scores; every proposal decoded (class-agnostic: one box, centres clipped to the image;
  class-specific: one box per class, corners clipped to the image), max_shape = image_size (H, W);
  each (proposal, class != background) pair with score > score_thr is a candidate; class-aware
  NMS (rotated or horizontal IoU > nms_iou_thr suppresses); the max_per_img best by score.

  Static-shape approximation (deliberate): only the `num_candidates_bound` best-scoring candidate
  pairs enter the NMS (mmdet keeps every pair above the threshold). It is exact whenever at
  most that many pairs pass the threshold; `num_candidates` (the true count) lets callers count
  the images where it was not.

  Args:
    cls_score: (b, P, C + 1) logits. bbox_pred: (b, P, reg_outputs) deltas.
    proposals: (b, P, box_dim). proposal_valid: (b, P) bool. image_size: (H, W) pixels.
  Returns:
    {"rboxes" (b, K, 5) (rotated) or "hboxes" (b, K, 4), "scores": (b, K), "labels": (b, K)
     int32 (-1 padding), "valid": (b, K) bool, "num_candidates": (b,) int32}, K = max_per_img,
     by decreasing score.
  """
  scores = jax.nn.softmax(cls_score.astype(jnp.float32), axis=-1)
  deltas = bbox_pred.astype(jnp.float32)
  if cfg.class_agnostic:
    boxes = cfg.coder.decode(proposals, deltas, max_shape=image_size)
  else:
    b, p = deltas.shape[:2]
    boxes = cfg.coder.decode(proposals[:, :, None], deltas.reshape(b, p, -1, cfg.reg_dim),
                             max_shape=image_size)
  fn = lambda s, bx, v: _detections_single(s, bx, v, cfg)
  return sharding.vmap_batch_shards(fn)(scores, boxes, jnp.asarray(proposal_valid, bool))
