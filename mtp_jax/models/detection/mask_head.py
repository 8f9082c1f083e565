"""Mask R-CNN's mask branch (MTP_SPEC §3.2, §3.3): mmdet `FCNMaskHead` trunk, per-dataset
`conv_logits`, the mask loss and the per-detection test-time masks.

Sources (mmdet 3.x semantics, as MTP's copies in `MTP:Multi-Task_Pretrain/instance_segmentation/
{mask_head.py, roi_head.py}` use them):
- trunk: `FCNMaskHead(num_convs=4, in_channels=256, conv_out_channels=256, roi_feat_size=14,
  upsample_cfg=deconv 2x2 stride 2)`: `convs.{i}` ConvModule(3x3, padding 1, ReLU), `upsample`
  ConvTranspose2d + ReLU -> 28x28. The per-dataset 1x1 `conv_logits` (C outputs, one mask per
  class) is MTP's `inssegroimaskhead_conv{k}` (`MaskPredictor`).
- RoI features: `SingleRoIExtractor(RoIAlign(14, sampling_ratio 0), strides 4..32)` of the
  positive sampled RoIs (training) or of the detections (test), `roi_head.roi_features` with
  `output_size=14`.
- targets: `mask_target` = the matched gt mask cropped and resized to each positive RoI (28x28,
  binarised at 0.5), computed on the device from per-instance crops (`mtp_jax/ops/mask_targets.py`).
- loss: `CrossEntropyLoss(use_mask=True)` = `mask_cross_entropy`: the logits of each positive's
  gt class, BCE with logits averaged over every pixel of every positive RoI of the batch (one
  loss per dataset in MTP); 0 without positives (mmdet's `mask_preds.sum()`).
- test: the detections' masks, sigmoid of their class's logits (`_predict_by_feat_single`),
  pasted at image resolution and thresholded at 0.5 on the host (`mtp_jax/metrics/mask_paste.py`).

Static shapes: a batch's positive RoIs are the first int(num_samples * pos_fraction) sampling
slots of each image (`random_sample` puts positives first and never takes more), masked by
`positive`; padded slots cost compute but no loss.

Init `init='mtp'` (Deliberate, what MTP runs: it never calls `init_weights()`): the convs keep
ConvModule's construction-time kaiming init (normal, fan_out, relu, bias 0), `upsample` PyTorch's
default ConvTranspose2d init. `init='mmdet'`: `FCNMaskHead.init_weights` on top: `upsample`
kaiming normal (fan_out, relu), bias 0. `conv_logits` (per dataset) keeps PyTorch's default
Conv2d init either way (MTP_SPEC §3.2).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax.models import layers
from mtp_jax.models.detection.fpn import FPNConv, kaiming_normal_fan_out


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """FCNMaskHead settings of MTP's Mask R-CNN (MTP_SPEC §3.3)."""
  roi_size: int = 14            # RoIAlign bins of the mask branch
  mask_size: int = 28           # predicted / target mask side (roi_size x 2 by the deconv)
  num_convs: int = 4
  conv_channels: int = 256
  loss_weight: float = 1.0
  mask_thr: float = 0.5         # test: pasted probability >= mask_thr is foreground

  def __post_init__(self):
    if self.mask_size != 2 * self.roi_size:
      raise ValueError(f"mask_size {self.mask_size} must be 2 x roi_size {self.roi_size} (one "
                       f"2x2 stride-2 deconv)")


class FCNMaskTrunk(nnx.Module):
  """`num_convs` ConvModules (3x3 + ReLU) then `upsample` (2x2 stride-2 deconv + ReLU):
  (R, 14, 14, C_in) -> (R, 28, 28, C). Parameters `convs.{i}.conv`, `upsample` (mmdet names)."""

  def __init__(self, in_channels: int = 256, conv_channels: int = 256, num_convs: int = 4, *,
               init: str = "mtp", rngs: nnx.Rngs, dtype=None):
    if init not in ("mtp", "mmdet"):
      raise ValueError(f"init {init!r} is not 'mtp' or 'mmdet'")
    dims = [in_channels] + [conv_channels] * num_convs
    self.convs = nnx.List([FPNConv(dims[i], dims[i + 1], 3, rngs=rngs, dtype=dtype,
                                   kernel_init=kaiming_normal_fan_out) for i in range(num_convs)])
    self.upsample = layers.ConvTranspose2x2(dims[-1], conv_channels, rngs=rngs, dtype=dtype)
    if init == "mmdet":   # kaiming_normal_(fan_out, relu) of the (in, out, 2, 2) torch weight
      shape = self.upsample.kernel[...].shape
      std = (2.0 / (shape[2] * 4)) ** 0.5   # torch fan_out of a transposed conv = in * kh * kw
      self.upsample.kernel[...] = std * jax.random.normal(rngs.params(), shape)
      self.upsample.bias[...] = jnp.zeros_like(self.upsample.bias[...])

  def __call__(self, x):
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return jax.nn.relu(self.upsample(x))


class MaskPredictor(nnx.Module):
  """Per-dataset `conv_logits`: 1x1 conv (C_in -> C classes), PyTorch's default Conv2d init."""

  def __init__(self, in_channels: int, num_classes: int, *, rngs: nnx.Rngs, dtype=None):
    self.conv_logits = layers.conv(in_channels, num_classes, 1, rngs=rngs, dtype=dtype,
                                   out_axis=None)

  def __call__(self, x):
    """(R, S, S, C_in) -> (R, S, S, C): every class's mask logits (mmdet's `mask_preds`)."""
    return self.conv_logits(x)

  def class_logits(self, x, labels):
    """(R, S, S, C_in), (R,) labels -> (R, S, S) float32: the logits of each RoI's label only,
    = `self(x)[r, :, :, labels[r]]` (the 1x1 conv's column of that class), without the other
    C - 1 maps: 1/C of the conv's work, forward and backward. Computed in the conv's dtype, the
    bias added in float32 (under bfloat16 that rounds once less). Labels outside [0, C) read
    class 0."""
    kernel = self.conv_logits.kernel[...]                          # (1, 1, C_in, C)
    index = jnp.clip(labels, 0, kernel.shape[-1] - 1)
    dtype = self.conv_logits.dtype or jnp.result_type(x.dtype, kernel.dtype)  # as nnx.Conv
    weight = kernel[0, 0].T[index].astype(dtype)                   # (R, C_in)
    logits = jnp.einsum("rhwc,rc->rhw", x.astype(dtype), weight)
    return logits.astype(jnp.float32) + self.conv_logits.bias[...][index].astype(jnp.float32)[:, None, None]


def mask_loss(logits, targets, positive, cfg: MaskConfig = MaskConfig()):
  """mmdet `mask_cross_entropy` over a batch: mean BCE-with-logits over every pixel of every
  positive RoI (any leading dims), times loss_weight; 0 without positives.

  logits, targets: (..., S, S) (targets in {0, 1}); positive: (...) bool.
  """
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  bce = jax.nn.softplus(logits) - logits * targets
  per_roi = bce.reshape(*positive.shape, -1).sum(-1)
  pixels = bce.shape[-1] * bce.shape[-2]
  count = jnp.maximum(positive.sum(), 1).astype(jnp.float32) * pixels
  return cfg.loss_weight * jnp.where(positive, per_roi, 0.0).sum() / count
