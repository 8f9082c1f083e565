"""Mask R-CNN instance-segmentation head of MTP (MTP_SPEC §3.2, §3.3), shared trunk + per-dataset
predictors.

Shared by all subsets: `neck` (mmdet FPN, 5 maps, strides 4..64), `rpn_head` (RPN, DeltaXYWH),
`roi_head` (Shared2FC trunk) and `mask_head` (FCN mask trunk, 4 convs + deconv). Per subset:
`predictors[subset]` (`fc_cls` C + 1, `fc_reg` 4 C class-specific; MTP's
`inssegroiboxhead_fc_{cls,reg}{k}`) and `mask_predictors[subset]` (`conv_logits` C; MTP's
`inssegroimaskhead_conv{k}`). The box stages are the two-stage detector shared with Oriented
R-CNN (`mtp_jax/models/detection/two_stage.py`) with Mask R-CNN's settings
(`RPNConfig.mask_rcnn()`, `RoIConfig.mask_rcnn()`); this class adds the mask branch
(`mtp_jax/models/detection/mask_head.py`).

Ground truth per subset: "boxes" (b, M_s, 4) x1, y1, x2, y2 pixels, "labels", "valid", and
"mask_crops" (b, M_s, R, R) uint8: each instance's mask cropped to its box (`mtp_jax/ops/
mask_targets.py`), from which the 28x28 targets of the positive RoIs are cut on the device.
Predictions add "masks" (b, K, 28, 28) float32: the probability mask of each detection's class,
in its box's frame (pasted at image resolution on the host), zeros for padding slots.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax.models.detection.mask_head import FCNMaskTrunk, MaskConfig, MaskPredictor, mask_loss
from mtp_jax.models.detection.roi_head import RoIConfig, roi_features
from mtp_jax.models.detection.rpn import RPNConfig
from mtp_jax.models.detection.two_stage import TwoStageDetector
from mtp_jax.models.interleave import rows_of
from mtp_jax.ops.mask_targets import mask_targets


class MaskRCNN(TwoStageDetector):
  """The instance-segmentation decoder: encoder maps -> per-subset losses or boxes + masks."""

  def __init__(self, in_channels, num_classes: dict, *, rpn: RPNConfig = RPNConfig.mask_rcnn(),
               roi: RoIConfig = RoIConfig.mask_rcnn(), mask: MaskConfig = MaskConfig(),
               channels: int = 256, fc_channels: int = 1024, init: str = "mtp",
               rngs: nnx.Rngs, dtype=None):
    if rpn.rotated or roi.rotated:
      raise ValueError("Mask R-CNN needs horizontal RPN and R-CNN configs")
    super().__init__(in_channels, num_classes, rpn=rpn, roi=roi, channels=channels,
                     fc_channels=fc_channels, init=init, rngs=rngs, dtype=dtype)
    self.mask_cfg = mask
    self.mask_head = FCNMaskTrunk(channels, mask.conv_channels, mask.num_convs, init=init,
                                  rngs=rngs, dtype=dtype)
    self.mask_predictors = nnx.Dict({s: MaskPredictor(mask.conv_channels, c, rngs=rngs, dtype=dtype)
                                     for s, c in self.num_classes.items()})

  def _mask_features(self, maps, rois):
    """(B, R, 4) rois on their rows' maps -> (B, R, 28, 28, C) shared mask-trunk features."""
    b, r = rois.shape[:2]
    x = self.mask_head(roi_features(maps, rois, self.roi_cfg, output_size=self.mask_cfg.roi_size))
    return x.reshape(b, r, *x.shape[1:])

  def _mask_logits(self, subset, x, labels):
    """(b, R, 28, 28, C) trunk features of one subset's rows, (b, R) labels -> (b, R, 28, 28)
    float32 logits of each label (`mask_predictors[subset]`)."""
    b, r = labels.shape
    logits = self.mask_predictors[subset].class_logits(x.reshape(b * r, *x.shape[2:]),
                                                       labels.reshape(-1))
    return logits.reshape(b, r, *logits.shape[1:])

  def branch_gt(self, subset, gt):
    if "mask_crops" not in gt:
      raise ValueError(f"Mask R-CNN ground truth of {subset!r} has no 'mask_crops' (the reader "
                       f"writes them when masks are requested: with_masks=True)")
    return {"mask_crops": jnp.asarray(gt["mask_crops"])}

  def branch_losses(self, subsets, maps, sample, gt):
    """{subset: {"mask": loss}}: RoI features, the mask trunk and the targets of every row's
    positive slots at once, then per subset its `conv_logits` and the loss over its positives."""
    num_pos = int(self.roi_cfg.num_samples * self.roi_cfg.pos_fraction)
    rois = sample.rois[:, :num_pos]
    gt_index = sample.gt_index[:, :num_pos]
    positive = (gt_index >= 0) & sample.valid[:, :num_pos]
    x = self._mask_features(maps, rois)
    targets = jax.vmap(lambda c, bx, r, i: mask_targets(c, bx, r, i, self.mask_cfg.mask_size))(
        gt["mask_crops"], gt["boxes"], rois, jnp.where(positive, gt_index, -1))
    targets = jax.lax.stop_gradient(targets)
    groups = len(subsets)
    of = lambda tree, g: rows_of(tree, groups, g)
    out = {}
    for g, subset in enumerate(subsets):
      logits = self._mask_logits(subset, of(x, g), of(sample.labels[:, :num_pos], g))
      out[subset] = {"mask": mask_loss(logits, of(targets, g), of(positive, g), self.mask_cfg)}
    return out

  def branch_predictions(self, subset, maps, dets):
    """{"masks": (b, K, 28, 28)} sigmoid probabilities of each detection's class."""
    x = self._mask_features(maps, dets["hboxes"])
    logits = self._mask_logits(subset, x, dets["labels"])
    return {"masks": jnp.where(dets["valid"][..., None, None], jax.nn.sigmoid(logits), 0.0)}
