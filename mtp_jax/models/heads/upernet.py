"""UperNet semantic-segmentation decoder (mmseg `UPerHead`, MTP_SPEC §3.3) with per-subset predictors.

Trunk (shared by all subsets): PSP module on the stride-32 map (adaptive average pools 1, 2, 3, 6
with PyTorch bin edges, 1x1 ConvModule each, bilinear upsampling, concat, 3x3 `bottleneck`),
1x1 `lateral_convs` on the other maps, top-down bilinear additions, 3x3 `fpn_convs`, everything
upsampled to stride 4 and fused by the 3x3 `fpn_bottleneck`: (B, H/4, W/4, channels).
ConvModule = conv without bias + BatchNorm (statistics per subset, `SubsetBatchNorm`) + ReLU; or,
with norm='group', GroupNorm (gcd(32, channels) groups, as mmseg's norm_cfg=dict(type='GN')), which
has no batch statistics: each image is normalised alone, so small or accumulated batches train
exactly like large ones.
Bilinear resizing follows PyTorch `align_corners=False`.

Predictors (one per subset, `semseghead_k` in the original): Dropout2d(0.1) + Conv1x1 to the
subset's class count + 1 (index 0 = background, MTP_SPEC §3.1); default PyTorch init.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax.models import layers
from mtp_jax.models.interleave import subset_rows
from mtp_jax.models.subset_batch_norm import SubsetBatchNorm


def resize_bilinear(x, height: int, width: int):
  """NHWC bilinear resize with half-pixel centres (PyTorch align_corners=False), no antialiasing."""
  if x.shape[1:3] == (height, width):
    return x
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear", antialias=False)


def adaptive_avg_pool(x, size: int):
  """PyTorch AdaptiveAvgPool2d(size) on NHWC: bin i spans [floor(i*n/s), ceil((i+1)*n/s))."""
  def matrix(n):
    m = np.zeros((size, n), np.float32)
    for i in range(size):
      lo, hi = (i * n) // size, -((-(i + 1) * n) // size)
      m[i, lo:hi] = 1.0 / (hi - lo)
    return jnp.asarray(m, x.dtype)
  return jnp.einsum("ph,qw,bhwc->bpqc", matrix(x.shape[1]), matrix(x.shape[2]), x)


class ConvModule(nnx.Module):
  """mmcv ConvModule: conv (no bias) -> norm -> ReLU; parameters under `conv` and `bn` / `gn`."""

  def __init__(self, din, dout, kernel_size, *, rngs, dtype=None, norm: str = "batch"):
    self.conv = layers.conv(din, dout, kernel_size, use_bias=False, dtype=dtype, rngs=rngs)
    if norm == "batch":
      self.bn = SubsetBatchNorm(dout)
    elif norm == "group":
      self.gn = nnx.GroupNorm(dout, num_groups=math.gcd(32, dout), epsilon=1e-5, dtype=dtype,
                              scale_metadata=layers.axes("conv_out"),
                              bias_metadata=layers.axes("conv_out"), rngs=rngs)
    else:
      raise ValueError(f"norm {norm!r} is not 'batch' or 'group'")

  def __call__(self, x, *, groups: int, train: bool):
    x = self.conv(x)
    x = self.bn(x, groups=groups, train=train) if hasattr(self, "bn") else self.gn(x)
    return jax.nn.relu(x)


class UperNetTrunk(nnx.Module):
  """Shared UperNet decoder: 4 NHWC maps (strides 4..32) -> (B, H/4, W/4, channels)."""

  def __init__(self, in_channels, channels: int = 256, pool_scales=(1, 2, 3, 6), *, rngs, dtype=None,
               norm: str = "batch"):
    self.pool_scales = tuple(pool_scales)
    conv_module = functools.partial(ConvModule, dtype=dtype, rngs=rngs, norm=norm)
    self.psp_modules = nnx.List([conv_module(in_channels[-1], channels, 1) for _ in self.pool_scales])
    self.bottleneck = conv_module(in_channels[-1] + len(self.pool_scales) * channels, channels, 3)
    self.lateral_convs = nnx.List([conv_module(c, channels, 1) for c in in_channels[:-1]])
    self.fpn_convs = nnx.List([conv_module(channels, channels, 3) for _ in in_channels[:-1]])
    self.fpn_bottleneck = conv_module(len(in_channels) * channels, channels, 3)

  def __call__(self, features, *, groups: int, train: bool):
    kw = dict(groups=groups, train=train)
    top = features[-1]
    h, w = top.shape[1:3]
    psp = [top] + [resize_bilinear(m(adaptive_avg_pool(top, s), **kw), h, w)
                   for s, m in zip(self.pool_scales, self.psp_modules)]
    laterals = [conv(f, **kw) for conv, f in zip(self.lateral_convs, features[:-1])]
    laterals.append(self.bottleneck(jnp.concatenate(psp, axis=-1), **kw))
    for i in range(len(laterals) - 1, 0, -1):
      hh, ww = laterals[i - 1].shape[1:3]
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], hh, ww)
    outs = [conv(l, **kw) for conv, l in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
    hh, ww = outs[0].shape[1:3]
    outs = [resize_bilinear(o, hh, ww) for o in outs]
    return self.fpn_bottleneck(jnp.concatenate(outs, axis=-1), **kw)


class SegPredictor(nnx.Module):
  """Dropout2d(rate) then Conv1x1(channels -> num_classes) with bias (`semseghead_k`)."""

  def __init__(self, channels: int, num_classes: int, *, dropout: float = 0.1, rngs, dtype=None):
    self.conv_seg = layers.conv(channels, num_classes, 1, out_axis=None, dtype=dtype, rngs=rngs)
    self.dropout = dropout

  def __call__(self, x, *, train: bool, key=None):
    if train and self.dropout > 0:
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, (x.shape[0], 1, 1, x.shape[-1]))
      x = layers.apply_drop_mask(x, keep, self.dropout)
    return self.conv_seg(x)


def segmentation_loss(logits, labels, ignore_index: int = 255, normalizer=None):
  """Pixel-wise softmax cross-entropy, logits bilinearly upsampled to the label size (mmseg).

  logits (B, h, w, C) float; labels (B, H, W) int with `ignore_index` for padding. Returns the sum
  of the non-ignored pixels' losses divided by `normalizer` (default: their count; a micro-batch
  passes its whole batch's count, so micro-batch losses add up to the batch's mean), and the count.
  """
  logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1], labels.shape[2])
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  count = valid.sum()
  normalizer = count if normalizer is None else normalizer
  return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(normalizer, 1), count


class UperNetHead(nnx.Module):
  """The semantic-segmentation head of MTP: one shared `semsegdecoder` (UperNet trunk) and one
  `semseghead[subset]` predictor per subset (MTP_SPEC §3.2), over `num_outputs[subset]` classes."""

  def __init__(self, in_channels, num_outputs: dict, *, channels: int = 256, dropout: float = 0.1,
               norm: str = "batch", rngs, dtype=None):
    self.semsegdecoder = UperNetTrunk(in_channels, channels, dtype=dtype, norm=norm, rngs=rngs)
    self.semseghead = nnx.Dict({s: SegPredictor(channels, n, dropout=dropout, dtype=dtype, rngs=rngs)
                                for s, n in num_outputs.items()})

  def __call__(self, features, *, subsets, train: bool, key=None) -> dict:
    """4 NHWC maps with rows interleaved by subset -> {subset: (b, H/4, W/4, classes) logits}."""
    groups = len(subsets)
    seg = subset_rows(self.semsegdecoder(features, groups=groups, train=train), groups)
    keys = jax.random.split(key if key is not None else jax.random.key(0), groups)
    return {s: self.semseghead[s](seg[g], train=train, key=keys[g]) for g, s in enumerate(subsets)}
