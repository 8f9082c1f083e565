"""Region proposal network shared by Oriented R-CNN and Mask R-CNN (MTP_SPEC.md §3.3).

One head, one target/loss/proposal path; the oriented specifics are `RPNConfig` fields (coder,
`rotated`, loss, border), so Mask R-CNN and Faster R-CNN use `RPNConfig.mask_rcnn()`.

Sources followed (mmdet 3.x, mmrotate 1.x; paths in open-mmlab/mmdetection and open-mmlab/mmrotate):
- mmdet/models/dense_heads/rpn_head.py: `rpn_conv` 3x3 + ReLU, `rpn_cls` 1x1 (A, sigmoid),
  `rpn_reg` 1x1 (A * reg_dim), init Normal(0.01) bias 0; `_predict_by_feat_single` (per level the
  `nms_pre` best sigmoid scores, decode with max_shape=img_shape) and `_bbox_post_process` (keep
  w > min_bbox_size and h > min_bbox_size, `batched_nms` with level ids, first `max_per_img`).
- mmdet/models/dense_heads/anchor_head.py: `_get_targets_single` (anchor_inside_flags with
  allowed_border on img_shape, assign, sample, encode the positives against their gt, label
  weight 1 on sampled anchors), `get_targets` (avg_factor = sum over the batch of the sampling
  results' num_pos + num_neg), `loss_by_feat_single` (losses summed over levels, same avg_factor).
- mmrotate/models/dense_heads/oriented_rpn_head.py (1.x): NMS runs on `rbox2hbox` of the decoded
  rotated proposals (horizontal IoU of their enclosing boxes), rotated proposals are returned;
  targets via mmdet's `_get_targets_single` with rotated gt (coder.encode(hbox anchor, rbox gt)).
- mmrotate/models/task_modules/assigners/iou2d_calculator.py: `RBbox2HBboxOverlaps2D` = IoU of the
  gt rotated boxes' enclosing horizontal boxes with the anchors.
- mmdet/models/losses: CrossEntropyLoss(use_sigmoid) = BCE with logits, SmoothL1Loss (beta),
  L1Loss; `weight_reduce_loss`: sum(loss * weight) / (avg_factor + float32 eps).
- configs: mmrotate configs/oriented_rcnn (train rpn 0.7/0.3/0.3, 256 x 0.5, allowed_border 0,
  rpn_proposal 2000/2000/NMS 0.8; test rpn 2000/2000/0.8); mmdet mask_rcnn_r50_fpn (allowed_border
  -1, L1, train 2000/1000/0.7, test 1000/1000/0.7).

Conventions: anchors and horizontal boxes (x1, y1, x2, y2), rotated boxes (cx, cy, w, h, angle)
le90, radians, pixels, y down. Predictions and anchors are flattened level by level, each level in
(y, x, anchor) order (`AnchorGenerator.grid_anchors`). Static shapes: gt padded to G with
`gt_valid`, fixed sample count, fixed per-level top-k, NMS with a fixed output count.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax.models import layers
from mtp_jax.models.detection.fpn import conv_zero_bias
from mtp_jax.ops.anchors import AnchorGenerator, anchor_inside_flags
from mtp_jax.ops.assign import max_iou_assign_blocked, random_sample
from mtp_jax.ops.box_coders import ORIENTED_RPN_CODER, RPN_CODER
from mtp_jax.ops.boxes import hbox_to_rbox, rbox_to_hbox
from mtp_jax.ops.iou import box_iou
from mtp_jax.ops import target
from mtp_jax.ops.suppression import nms
from mtp_jax.parallel import sharding

_EPS = float(np.finfo(np.float32).eps)   # mmdet weight_reduce_loss: / (avg_factor + eps)


# ----------------------------------------------------------------------------------------------
# Config

@dataclasses.dataclass(frozen=True)
class ProposalConfig:
  """mmdet `rpn_proposal` / test `rpn`: per-level top-k, size filter, per-level NMS, global cap."""
  nms_pre: int = 2000          # best anchors kept per level before NMS; <= 0 keeps all
  max_per_img: int = 2000      # proposals returned per image (P)
  nms_iou: float = 0.8         # suppress IoU > this (same level only)
  min_bbox_size: float = 0.0   # keep w > this and h > this; < 0 disables the filter


@dataclasses.dataclass(frozen=True)
class RPNConfig:
  """RPN settings; the defaults are MTP's Oriented R-CNN (MTP_SPEC.md §3.3).

  `rotated`: targets and proposals are le90 rotated boxes (gt (G, 5)), assignment uses the gt's
  enclosing horizontal boxes (RBbox2HBboxOverlaps2D) and proposal NMS the proposals' enclosing
  boxes; else everything is horizontal (gt (G, 4)). `bbox_loss` is 'smooth_l1' (with `beta`) or
  'l1'. A negative `allowed_border` disables the inside-image test. `assign_block_size`: anchors
  per block of the max-IoU assignment (`max_iou_assign_blocked`; the IoU block is G x this many
  float32, 62.5 MiB for G = 1000); it changes memory and speed, never the targets. None (the
  default) follows the platform: blocks of 16,384 on the CPU, where the (G, N) matrix would be
  most of the host memory of a 1024-px step, and one block on accelerators, where the loop only
  adds bytes (the TPU compiler: 2.1 against 1.7 GB for 3 images at 448 px, docs/benchmarks.md).
  """
  anchors: AnchorGenerator = AnchorGenerator()
  coder: Any = ORIENTED_RPN_CODER
  rotated: bool = True
  pos_iou_thr: float = 0.7
  neg_iou_thr: float = 0.3
  min_pos_iou: float = 0.3
  match_low_quality: bool = True
  num_samples: int = 256
  pos_fraction: float = 0.5
  neg_pos_ub: int = -1
  allowed_border: float = 0.0
  assign_block_size: int | None = None
  bbox_loss: str = "smooth_l1"
  beta: float = 1.0 / 9.0
  loss_cls_weight: float = 1.0
  loss_bbox_weight: float = 1.0
  train_proposals: ProposalConfig = ProposalConfig(2000, 2000, 0.8, 0.0)
  test_proposals: ProposalConfig = ProposalConfig(2000, 2000, 0.8, 0.0)

  def __post_init__(self):
    if self.bbox_loss not in ("smooth_l1", "l1"):
      raise ValueError(f"bbox_loss {self.bbox_loss!r} is not 'smooth_l1' or 'l1'")
    if len(self.coder.means) != (6 if self.rotated else 4):
      raise ValueError(f"coder {type(self.coder).__name__} with {len(self.coder.means)} deltas "
                       f"does not fit rotated={self.rotated}")

  @property
  def num_anchors(self) -> int:
    return self.anchors.num_base_anchors

  @property
  def reg_dim(self) -> int:
    return len(self.coder.means)

  @property
  def box_dim(self) -> int:
    return 5 if self.rotated else 4

  def proposals(self, train: bool) -> ProposalConfig:
    return self.train_proposals if train else self.test_proposals

  @classmethod
  def mask_rcnn(cls, **overrides):
    """MTP's Mask R-CNN RPN (mmdet mask_rcnn_r50_fpn): horizontal, DeltaXYWH, L1, no border test."""
    values = dict(coder=RPN_CODER, rotated=False, allowed_border=-1.0, bbox_loss="l1",
                  train_proposals=ProposalConfig(2000, 1000, 0.7, 0.0),
                  test_proposals=ProposalConfig(1000, 1000, 0.7, 0.0))
    return cls(**{**values, **overrides})


ORIENTED_RCNN_RPN = RPNConfig()
MASK_RCNN_RPN = RPNConfig.mask_rcnn()


# ----------------------------------------------------------------------------------------------
# Head

class RPNHead(nnx.Module):
  """mmdet `RPNHead` (num_convs 1), shared over levels; parameters `rpn_conv`, `rpn_cls`, `rpn_reg`.

  `RPNHead(256, cfg.num_anchors, cfg.reg_dim, rngs=...)`; reg_dim 6 for the oriented RPN.
  `init='mmdet'` (default): mmdet's init_cfg Normal(std 0.01), bias 0. `init='mtp'`: PyTorch's
  default Conv2d init, which MTP's pretraining keeps since it never calls `init_weights()`.
  """

  def __init__(self, in_channels: int, num_anchors: int = 3, reg_dim: int = 6, *,
               feat_channels: int | None = None, rngs, dtype=None, init: str = "mmdet"):
    feat_channels = feat_channels or in_channels
    self.num_anchors, self.reg_dim = num_anchors, reg_dim
    if init == "mmdet":
      conv = functools.partial(conv_zero_bias, kernel_init=nnx.initializers.normal(0.01),
                               rngs=rngs, dtype=dtype)
    elif init == "mtp":
      conv = functools.partial(layers.conv, rngs=rngs, dtype=dtype)
    else:
      raise ValueError(f"init {init!r} is not 'mmdet' or 'mtp'")
    self.rpn_conv = conv(in_channels, feat_channels, 3)
    self.rpn_cls = conv(feat_channels, num_anchors, 1, out_axis=None)
    self.rpn_reg = conv(feat_channels, num_anchors * reg_dim, 1, out_axis=None)

  def __call__(self, levels):
    """[(b, H_l, W_l, C)] -> (cls (b, N) float32 logits, reg (b, N, reg_dim) float32 deltas).

    N = sum_l H_l * W_l * A, each level in (y, x, anchor) order; channel a * reg_dim + j of
    `rpn_reg` is delta j of anchor a, as mmdet's permute(0, 2, 3, 1).reshape(-1, reg_dim).
    """
    cls, reg = [], []
    for x in levels:
      b = x.shape[0]
      hidden = jax.nn.relu(self.rpn_conv(x))
      cls.append(self.rpn_cls(hidden).reshape(b, -1))
      reg.append(self.rpn_reg(hidden).reshape(b, -1, self.reg_dim))
    return (jnp.concatenate(cls, 1).astype(jnp.float32),
            jnp.concatenate(reg, 1).astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# Targets

class RPNTargets(NamedTuple):
  """Per-anchor training targets; leaves gain a leading batch axis from `batch_rpn_targets`."""
  labels: jax.Array          # (N,) int32 BCE target: 1 foreground, 0 background (mmdet: 0 / 1)
  label_weights: jax.Array   # (N,) float32: 1 on sampled anchors (pos_weight -1), else 0
  bbox_targets: jax.Array    # (N, reg_dim) float32: coder.encode(anchor, gt) on sampled positives
  bbox_weights: jax.Array    # (N, reg_dim) float32: 1 on sampled positives, else 0
  num_pos: jax.Array         # () int32 sampled positives
  num_neg: jax.Array         # () int32 sampled negatives


def rpn_targets(anchors, anchor_valid, gt_boxes, gt_valid, key, cfg: RPNConfig, image_size):
  """One image's RPN targets, as mmdet `AnchorHead._get_targets_single` (+ mmrotate's oriented RPN).

  Args:
    anchors: (N, 4) all levels' anchors concatenated. anchor_valid: (N,) bool, the
      `AnchorGenerator.valid_flags` of the padded shape.
    gt_boxes: (G, 5) rotated (cfg.rotated) or (G, 4) horizontal, padded; gt_valid: (G,) bool.
    key: PRNG key of the random sampler.
    image_size: (height, width) of the unpadded image (mmdet img_shape), static or traced.
  1. Anchors outside the image widened by `allowed_border` (or invalid) are ignored.
  2. MaxIoU assignment of the rest by horizontal IoU (rotated gt: their enclosing boxes), over
     blocks of cfg.assign_block_size anchors (on the CPU by default: no (G, N) IoU matrix).
  3. RandomSampler: up to num_samples * pos_fraction positives, negatives fill num_samples.
  4. Sampled anchors get label weight 1; sampled positives label 1 and bbox targets
     coder.encode(anchor, matched gt box) with weight 1.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = jax.lax.stop_gradient(jnp.asarray(gt_boxes, jnp.float32))
  gt_valid = jnp.asarray(gt_valid, bool)
  num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
  if gt_boxes.shape[-1] != cfg.box_dim:
    raise ValueError(f"gt boxes {gt_boxes.shape} for rotated={cfg.rotated} (expects "
                     f"(G, {cfg.box_dim}))")
  inside = anchor_inside_flags(anchors, jnp.asarray(anchor_valid, bool), image_size,
                               cfg.allowed_border)
  gt_hboxes = rbox_to_hbox(gt_boxes) if cfg.rotated else gt_boxes
  assignment = max_iou_assign_blocked(box_iou, gt_hboxes, anchors, gt_valid, inside,
                                      cfg.pos_iou_thr, cfg.neg_iou_thr, cfg.min_pos_iou,
                                      cfg.match_low_quality, block_size=_assign_block_size(cfg))
  sample = random_sample(key, assignment.gt_index, cfg.num_samples, cfg.pos_fraction,
                         cfg.neg_pos_ub)
  sampled = _scatter_flags(num_anchors, sample.indices, sample.valid)
  positive = _scatter_flags(num_anchors, sample.indices, sample.positive)
  # Encode every anchor against a finite target (its own box where it is not a positive).
  own = hbox_to_rbox(anchors) if cfg.rotated else anchors
  if num_gt:
    matched = gt_boxes[jnp.clip(assignment.gt_index - 1, 0, num_gt - 1)]
    matched = jnp.where(positive[:, None], matched, own)
  else:
    matched = own
  deltas = cfg.coder.encode(anchors, matched)
  bbox_weights = jnp.broadcast_to(positive[:, None], deltas.shape).astype(jnp.float32)
  return RPNTargets(labels=positive.astype(jnp.int32),
                    label_weights=sampled.astype(jnp.float32),
                    bbox_targets=jnp.where(positive[:, None], deltas, 0.0),
                    bbox_weights=bbox_weights,
                    num_pos=sample.num_positive, num_neg=sample.num_negative)


CPU_ASSIGN_BLOCK_SIZE = 16384


def _assign_block_size(cfg: RPNConfig) -> int | None:
  """The configured block size, else the platform's (see `RPNConfig`); None: one block."""
  if cfg.assign_block_size is not None:
    return cfg.assign_block_size
  return target.by_platform(cpu=CPU_ASSIGN_BLOCK_SIZE, accelerator=None)


def batch_rpn_targets(anchors, anchor_valid, gt_boxes, gt_valid, key, cfg: RPNConfig, image_size):
  """`rpn_targets` vmapped over images: gt (b, G, d), gt_valid (b, G); anchor_valid (N,) or
  (b, N); image_size (2,) or (b, 2); one key split per image. Leaves get a leading b axis."""
  b, n = gt_boxes.shape[0], anchors.shape[0]
  anchor_valid = jnp.broadcast_to(jnp.asarray(anchor_valid, bool), (b, n))
  image_size = jnp.broadcast_to(jnp.asarray(image_size, jnp.float32), (b, 2))
  single = lambda v, g, gv, k, s: rpn_targets(anchors, v, g, gv, k, cfg, s)
  return jax.vmap(single)(anchor_valid, gt_boxes, gt_valid, jax.random.split(key, b), image_size)


def _scatter_flags(size, indices, flags):
  """(size,) bool: True at indices[i] where flags[i] (indices of unset flags are ignored)."""
  return jnp.zeros((size,), jnp.int32).at[indices].max(flags.astype(jnp.int32)) > 0


# ----------------------------------------------------------------------------------------------
# Loss

def rpn_loss(cls, reg, targets: RPNTargets, *, cfg: RPNConfig | None = None, avg_factor=None):
  """mmdet `AnchorHead.loss_by_feat` for a batch: {"rpn_cls", "rpn_bbox"} scalars.

  rpn_cls = sum over sampled anchors of BCE-with-logits(cls, label) / (avg_factor + eps);
  rpn_bbox = sum over positive coordinates of SmoothL1_beta (or L1)(reg - target) / (same);
  avg_factor = total sampled anchors (num_pos + num_neg) of the batch unless given (pass the
  whole batch's count when splitting it into micro-batches). cls (b, N), reg (b, N, reg_dim),
  targets from `batch_rpn_targets`. cfg defaults to the oriented RPN (`ORIENTED_RCNN_RPN`).
  """
  cfg = cfg or ORIENTED_RCNN_RPN
  cls, reg = cls.astype(jnp.float32), reg.astype(jnp.float32)
  if avg_factor is None:
    avg_factor = (targets.num_pos + targets.num_neg).sum()
  denom = jnp.asarray(avg_factor, jnp.float32) + _EPS
  labels = targets.labels.astype(jnp.float32)
  bce = jax.nn.softplus(cls) - cls * labels   # -[t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))]
  loss_cls = (bce * targets.label_weights).sum() / denom
  diff = jnp.abs(reg - targets.bbox_targets)
  if cfg.bbox_loss == "smooth_l1":
    per_coord = jnp.where(diff < cfg.beta, 0.5 * diff * diff / cfg.beta, diff - 0.5 * cfg.beta)
  else:
    per_coord = diff
  loss_bbox = (per_coord * targets.bbox_weights).sum() / denom
  return {"rpn_cls": cfg.loss_cls_weight * loss_cls, "rpn_bbox": cfg.loss_bbox_weight * loss_bbox}


# ----------------------------------------------------------------------------------------------
# Proposals

def rpn_proposals(cls, reg, anchors_per_level, image_size, cfg: RPNConfig, train: bool, *,
                  nms_tile_size: int = 256):
  """mmdet `RPNHead.predict_by_feat` (+ mmrotate `OrientedRPNHead._bbox_post_process`), static.

  Per image: per level the min(nms_pre, N_l) best anchors by score (all when nms_pre <= 0),
  decoded by cfg.coder (DeltaXYWH clips to image_size; MidpointOffset ignores it, as mmrotate);
  boxes with w <= min_bbox_size or h <= min_bbox_size are dropped; greedy NMS at nms_iou within
  each level (`nms(..., classes=level)` = mmcv batched_nms with level ids) on the boxes themselves,
  or for the oriented RPN on the rotated proposals' enclosing horizontal boxes (mmrotate 1.x
  `rbox2hbox`); then the max_per_img best survivors over all levels, by decreasing score.

  Args:
    cls: (b, N) logits, reg: (b, N, reg_dim), concatenated over levels (`RPNHead` output).
    anchors_per_level: list of (N_l, 4) anchors (`AnchorGenerator.grid_anchors`).
    image_size: (height, width), (b, 2) per image, or None (no clipping).
    train: picks cfg.train_proposals (mmdet rpn_proposal) or cfg.test_proposals.
  Returns:
    proposals (b, P, 5 | 4), scores (b, P) sigmoid, valid (b, P) bool, P = max_per_img; padding
    slots are zeros with valid False. Everything is stop_gradient-ed.
  """
  pcfg = cfg.proposals(train)
  cls = jax.lax.stop_gradient(jnp.asarray(cls, jnp.float32))
  reg = jax.lax.stop_gradient(jnp.asarray(reg, jnp.float32))
  sizes = [a.shape[0] for a in anchors_per_level]
  if sum(sizes) != cls.shape[1] or reg.shape[:2] != cls.shape or reg.shape[2] != cfg.reg_dim:
    raise ValueError(f"cls {cls.shape} / reg {reg.shape} do not match {sum(sizes)} anchors with "
                     f"{cfg.reg_dim} deltas")
  single = functools.partial(_proposals_single, pcfg=pcfg, cfg=cfg, tile_size=nms_tile_size)
  anchors = tuple(jnp.asarray(a, jnp.float32) for a in anchors_per_level)
  if image_size is not None:
    image_size = jnp.broadcast_to(jnp.asarray(image_size, jnp.float32), (cls.shape[0], 2))
  # Per device: NMS's loops must not agree over the whole batch on every iteration.
  return sharding.vmap_batch_shards(
      lambda c, r, s, a: single(c, r, s, anchors_per_level=a),
      in_axes=(0, 0, None if image_size is None else 0, None))(cls, reg, image_size, anchors)


def _proposals_single(logits, deltas, image_size, *, anchors_per_level, pcfg, cfg, tile_size):
  """One image: (N,) logits, (N, reg_dim) deltas -> (P, box_dim), (P,), (P,) bool."""
  boxes, top_logits, levels = _top_per_level(logits, deltas, anchors_per_level, image_size,
                                             pcfg.nms_pre, cfg.coder)
  if cfg.rotated:
    widths, heights = boxes[:, 2], boxes[:, 3]
    nms_boxes = rbox_to_hbox(boxes)
  else:
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    nms_boxes = boxes
  keep_size = jnp.ones(widths.shape, bool)
  if pcfg.min_bbox_size >= 0:
    keep_size = (widths > pcfg.min_bbox_size) & (heights > pcfg.min_bbox_size)
  # Logits rank like sigmoid scores but do not saturate into float32 ties.
  indices, _ = nms(nms_boxes, top_logits, pcfg.nms_iou, pcfg.max_per_img, classes=levels,
                   valid=keep_size, tile_size=tile_size)
  valid = indices >= 0
  safe = jnp.maximum(indices, 0)
  proposals = jnp.where(valid[:, None], boxes[safe], 0.0)
  scores = jnp.where(valid, jax.nn.sigmoid(top_logits[safe]), 0.0)
  return proposals, scores, valid


def _top_per_level(logits, deltas, anchors_per_level, image_size, nms_pre, coder):
  """Per level the min(nms_pre, N_l) best logits with their decoded boxes and level ids."""
  boxes, top_logits, levels = [], [], []
  start = 0
  for level, anchors in enumerate(anchors_per_level):
    n = anchors.shape[0]
    level_logits, level_deltas = logits[start:start + n], deltas[start:start + n]
    start += n
    k = n if nms_pre <= 0 else min(nms_pre, n)
    values, idx = jax.lax.top_k(level_logits, k)
    boxes.append(coder.decode(jnp.asarray(anchors, jnp.float32)[idx], level_deltas[idx],
                              max_shape=image_size))
    top_logits.append(values)
    levels.append(jnp.full((k,), level, jnp.int32))
  return jnp.concatenate(boxes), jnp.concatenate(top_logits), jnp.concatenate(levels)
