"""RetinaNet, MTP's Xview detector (MTP_SPEC §5.2; mmdet retinanet_r50_fpn), shared trunk +
per-dataset classifiers.

Sources followed (mmdet 3.x): configs/_base_/models/retinanet_r50_fpn.py, models/dense_heads/
retina_head.py, anchor_head.py (targets, loss), base_dense_head.py (`_predict_by_feat_single`,
`_bbox_post_process`), losses/focal_loss.py (`py_sigmoid_focal_loss`), necks/fpn.py.

- Neck: FPN(start_level=1, add_extra_convs='on_input', 5 outputs) on the encoder's stride 8-32
  maps: P3-P5 and two stride-2 convs (P6 on the stride-32 input, P7 on P6), strides 8-128.
- Head (shared over levels): 4 `cls_convs` and 4 `reg_convs` (3x3, 256, ReLU), `retina_cls`
  3x3 to A x C (sigmoid, no background; per dataset) and `retina_reg` 3x3 to A x 4; init Normal
  0.01, the classifier's bias -log((1 - 0.01) / 0.01) (prior 0.01).
- Anchors: octave base 4, 3 scales per octave (4 x 2^(i/3)), ratios 0.5 / 1 / 2, strides 8-128
  (9 per position); DeltaXYWH (means 0, stds 1).
- Targets: MaxIoU 0.5 / 0.4 (low-quality match, min 0), every anchor used (PseudoSampler; no
  border test, allowed_border -1); focal loss (gamma 2, alpha 0.25) over all classes of the
  assigned anchors and L1 on the positives' deltas, both summed over the batch and divided by
  its positives (mmdet's avg_factor; ours clamps it at 1 for a batch without positives).
- Test: per level the 1000 best (anchor, class) scores above 0.05, decoded and clipped (boxes
  left without width or height dropped: min_bbox_size 0), then class-aware NMS 0.5 over the
  levels, 100 per image.
Ground truth and predictions use the two-stage detectors' dicts ("boxes" (b, G, 4) x1, y1, x2,
y2, "labels", "valid"; predictions "hboxes", "scores", "labels", "valid"), so the `hd` task runs
either detector.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax.models.detection.fpn import FPN, conv_zero_bias
from mtp_jax.models.interleave import subset_rows
from mtp_jax.ops.anchors import AnchorGenerator
from mtp_jax.ops.assign import max_iou_assign
from mtp_jax.ops.box_coders import RPN_CODER
from mtp_jax.ops.iou import box_iou
from mtp_jax.ops.suppression import nms
from mtp_jax.parallel import sharding

RETINA_ANCHORS = AnchorGenerator(strides=(8, 16, 32, 64, 128), ratios=(0.5, 1.0, 2.0),
                                 scales=tuple(4.0 * 2.0 ** (i / 3) for i in range(3)))


@dataclasses.dataclass(frozen=True)
class RetinaConfig:
  """mmdet retinanet_r50_fpn's settings (module docstring)."""
  anchors: AnchorGenerator = RETINA_ANCHORS
  coder: Any = RPN_CODER
  pos_iou_thr: float = 0.5
  neg_iou_thr: float = 0.4
  min_pos_iou: float = 0.0
  gamma: float = 2.0
  alpha: float = 0.25
  stacked_convs: int = 4
  prior_prob: float = 0.01
  nms_pre: int = 1000
  score_thr: float = 0.05
  nms_iou: float = 0.5
  max_per_img: int = 100

  @property
  def num_anchors(self) -> int:
    return self.anchors.num_base_anchors


def sigmoid_focal_loss(logits, targets, gamma: float, alpha: float):
  """Elementwise mmdet `py_sigmoid_focal_loss` (no reduction): BCE x (alpha t + (1 - alpha)(1 - t))
  x pt^gamma, pt = 1 - p for targets 1 and p for targets 0."""
  p = jax.nn.sigmoid(logits)
  pt = (1 - p) * targets + p * (1 - targets)
  weight = (alpha * targets + (1 - alpha) * (1 - targets)) * pt ** gamma
  bce = jax.nn.softplus(logits) - logits * targets
  return bce * weight


class RetinaNet(nnx.Module):
  """FPN + RetinaHead: encoder maps -> per-subset losses or detections (module docstring)."""

  def __init__(self, in_channels, num_classes: dict, *, cfg: RetinaConfig = RetinaConfig(),
               channels: int = 256, rngs: nnx.Rngs, dtype=None):
    """in_channels: the 4 encoder maps' channels (strides 4-32; the stride-4 map is not used)."""
    self.cfg, self.num_classes = cfg, dict(num_classes)
    self.neck = FPN(list(in_channels), channels, 5, start_level=1, extra_on_input=True, rngs=rngs,
                    dtype=dtype, init="mmdet")
    conv = functools.partial(conv_zero_bias, kernel_init=nnx.initializers.normal(0.01), rngs=rngs, dtype=dtype)
    self.cls_convs = nnx.List([conv(channels, channels, 3) for _ in range(cfg.stacked_convs)])
    self.reg_convs = nnx.List([conv(channels, channels, 3) for _ in range(cfg.stacked_convs)])
    bias = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
    self.retina_cls = nnx.Dict({s: conv(channels, cfg.num_anchors * c, 3, out_axis=None)
                                for s, c in self.num_classes.items()})
    for head in self.retina_cls.values():
      head.bias[...] = jnp.full_like(head.bias[...], bias)
    self.retina_reg = conv(channels, cfg.num_anchors * 4, 3, out_axis=None)

  def _outputs(self, subset, levels):
    """One subset's rows of the 5 levels -> (cls (b, N, C), reg (b, N, 4)) float32, N over levels in
    (y, x, anchor) order."""
    cls, reg = [], []
    for x in levels:
      b = x.shape[0]
      c, r = x, x
      for conv in self.cls_convs:
        c = jax.nn.relu(conv(c))
      for conv in self.reg_convs:
        r = jax.nn.relu(conv(r))
      cls.append(self.retina_cls[subset](c).reshape(b, -1, self.num_classes[subset]))
      reg.append(self.retina_reg(r).reshape(b, -1, 4))
    return jnp.concatenate(cls, 1).astype(jnp.float32), jnp.concatenate(reg, 1).astype(jnp.float32)

  def _per_subset(self, features, subsets):
    subsets = tuple(subsets)
    missing = [s for s in subsets if s not in self.num_classes]
    if missing:
      raise ValueError(f"subsets {missing} have no classifier; known: {sorted(self.num_classes)}")
    levels = self.neck(list(features))
    sizes = [tuple(m.shape[1:3]) for m in levels]
    rows = [[subset_rows(m, len(subsets))[g] for m in levels] for g in range(len(subsets))]
    return subsets, rows, self.cfg.anchors.grid_anchors(sizes), sizes

  # -- training -----------------------------------------------------------------------------

  def losses(self, features, gt, *, subsets, image_size, key) -> dict:
    """{subset: {"cls": focal loss, "bbox": L1}} (module docstring); key is unused (no sampling)."""
    del key
    subsets, rows, anchors, sizes = self._per_subset(features, subsets)
    anchors = jnp.concatenate(anchors)
    anchor_valid = jnp.concatenate(self.cfg.anchors.valid_flags(sizes, image_size))
    out = {}
    for levels, subset in zip(rows, subsets):
      cls, reg = self._outputs(subset, levels)
      g = gt[subset]
      boxes = jax.lax.stop_gradient(jnp.asarray(g["boxes"], jnp.float32))
      labels, valid = jnp.asarray(g["labels"], jnp.int32), jnp.asarray(g["valid"], bool)

      def targets(b, l, v):
        a = max_iou_assign(box_iou(b, anchors), v, anchor_valid, self.cfg.pos_iou_thr,
                           self.cfg.neg_iou_thr, self.cfg.min_pos_iou, True)
        positive = a.gt_index > 0
        matched = jnp.clip(a.gt_index - 1, 0, max(b.shape[0] - 1, 0))
        target_boxes = jnp.where(positive[:, None], b[matched], anchors) if b.shape[0] else anchors
        return (a.gt_index >= 0, positive, jnp.where(positive, l[matched], -1),
                self.cfg.coder.encode(anchors, target_boxes))

      used, positive, target_labels, deltas = jax.vmap(targets)(boxes, labels, valid)
      num_pos = jnp.maximum(positive.sum().astype(jnp.float32), 1.0)
      onehot = jax.nn.one_hot(target_labels, self.num_classes[subset], dtype=jnp.float32)   # -1: zeros
      focal = sigmoid_focal_loss(cls, onehot, self.cfg.gamma, self.cfg.alpha)
      l1 = jnp.abs(reg - jax.lax.stop_gradient(deltas)).sum(-1)
      out[subset] = {"cls": (focal.sum(-1) * used).sum() / num_pos,
                     "bbox": (l1 * positive).sum() / num_pos}
    return out

  # -- inference ----------------------------------------------------------------------------

  def predict(self, features, *, subsets, image_size) -> dict:
    """{subset: {"hboxes" (b, K, 4), "scores" (b, K), "labels" (b, K) int32, "valid" (b, K)}},
    K = max_per_img (module docstring)."""
    subsets, rows, anchors, _ = self._per_subset(features, subsets)
    out = {}
    for levels, subset in zip(rows, subsets):
      cls, reg = self._outputs(subset, levels)
      single = lambda c, r, a: _detections_single(c, r, anchors_per_level=a, cfg=self.cfg, image_size=image_size)
      # Per device (NMS's loops), anchors passed unmapped (vmap_batch_shards closes over nothing traced).
      out[subset] = sharding.vmap_batch_shards(single, in_axes=(0, 0, None))(cls, reg, tuple(anchors))
    return out


def _detections_single(cls, reg, *, anchors_per_level, cfg: RetinaConfig, image_size):
  """One image: (N, C) logits, (N, 4) deltas -> the detection dict of `RetinaNet.predict`."""
  num_classes = cls.shape[-1]
  boxes, scores, labels = [], [], []
  start = 0
  for anchors in anchors_per_level:
    n = anchors.shape[0]
    flat = jax.nn.sigmoid(cls[start:start + n]).reshape(-1)          # (anchor, class) pairs
    k = min(cfg.nms_pre, flat.shape[0])
    top, idx = jax.lax.top_k(flat, k)
    anchor = idx // num_classes
    boxes.append(cfg.coder.decode(anchors[anchor], reg[start:start + n][anchor], max_shape=image_size))
    scores.append(top)
    labels.append((idx % num_classes).astype(jnp.int32))
    start += n
  boxes, scores, labels = jnp.concatenate(boxes), jnp.concatenate(scores), jnp.concatenate(labels)
  # mmdet's min_bbox_size 0: boxes that clipping left without width or height go
  sized = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  keep, _ = nms(boxes, scores, cfg.nms_iou, cfg.max_per_img, classes=labels, valid=(scores > cfg.score_thr) & sized)
  valid = keep >= 0
  safe = jnp.maximum(keep, 0)
  return {"hboxes": jnp.where(valid[:, None], boxes[safe], 0.0), "scores": jnp.where(valid, scores[safe], 0.0),
          "labels": jnp.where(valid, labels[safe], 0), "valid": valid}
