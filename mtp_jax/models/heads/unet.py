"""The change-detection decoder of MTP's finetuning (MTP_SPEC §5.2): open-cd's `UNetHead` on the
fused (|f1 - f2|) stride-16 maps of a siamese encoder.

The four maps are taken deepest first: the last is the head, the other three the skips. Block i
(decoder channels 512, 256, 128, 64): nearest x2 upsampling, the i-th skip (if any) bilinearly
resized to that size and concatenated, then twice conv3x3 (no bias) + BatchNorm + ReLU. Four
blocks take stride 16 to stride 1; a final bilinear x2, Dropout2d(0.1) and a 1x1 `conv_seg`
give the logits (the loss resizes them to the labels, mmseg). Initialisation as open-cd's: only
`conv_seg` gets normal (std 0.01) weights and zero biases (mmseg's BaseDecodeHead init_cfg); the
decoder convs keep PyTorch's default (U(+-1/sqrt(fan_in)), `layers.conv`) and BatchNorm scale 1,
bias 0. The BatchNorm keeps statistics per dataset (`SubsetBatchNorm`), as the pretraining
decoders do.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax.models import layers
from mtp_jax.models.heads.upernet import resize_bilinear
from mtp_jax.models.interleave import subset_rows
from mtp_jax.models.subset_batch_norm import SubsetBatchNorm

_NORMAL_001 = nnx.initializers.normal(0.01)


class ConvBnRelu(nnx.Module):
  def __init__(self, din, dout, *, rngs, dtype=None):
    self.conv = layers.conv(din, dout, 3, use_bias=False, dtype=dtype, rngs=rngs)
    self.bn = SubsetBatchNorm(dout)

  def __call__(self, x, *, groups: int, train: bool):
    return jax.nn.relu(self.bn(self.conv(x), groups=groups, train=train))


class DecoderBlock(nnx.Module):
  def __init__(self, din, skip, dout, *, rngs, dtype=None):
    self.conv1 = ConvBnRelu(din + skip, dout, rngs=rngs, dtype=dtype)
    self.conv2 = ConvBnRelu(dout, dout, rngs=rngs, dtype=dtype)

  def __call__(self, x, skip, *, groups: int, train: bool):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)   # nearest x2
    if skip is not None:
      x = jnp.concatenate([x, resize_bilinear(skip, x.shape[1], x.shape[2]).astype(x.dtype)], axis=-1)
    return self.conv2(self.conv1(x, groups=groups, train=train), groups=groups, train=train)


class UNetHead(nnx.Module):
  """4 fused NHWC maps (rows interleaved by subset) -> {subset: (b, 2H, 2W, classes) logits},
  H x W the input size (the maps are at stride 16: four x2 blocks and a final x2)."""

  def __init__(self, in_channels, num_outputs: dict, *, decoder_channels=(512, 256, 128, 64),
               dropout: float = 0.1, rngs, dtype=None):
    chans = list(in_channels)[::-1]
    ins = [chans[0]] + list(decoder_channels[:-1])
    skips = chans[1:] + [0]
    self.blocks = nnx.List([DecoderBlock(i, s, o, rngs=rngs, dtype=dtype)
                            for i, s, o in zip(ins, skips, decoder_channels)])
    self.conv_seg = nnx.Dict({s: layers.conv(decoder_channels[-1], n, 1, out_axis=None, dtype=dtype, rngs=rngs,
                                             kernel_init=_NORMAL_001)
                              for s, n in num_outputs.items()})
    for conv in self.conv_seg.values():
      conv.bias[...] = jnp.zeros_like(conv.bias[...])
    self.dropout = dropout

  def __call__(self, features, *, subsets, train: bool, key=None) -> dict:
    groups = len(subsets)
    maps = list(features)[::-1]
    x = maps[0]
    for i, block in enumerate(self.blocks):
      x = block(x, maps[i + 1] if i + 1 < len(maps) else None, groups=groups, train=train)
    x = resize_bilinear(x, 2 * x.shape[1], 2 * x.shape[2])
    rows = subset_rows(x, groups)
    keys = jax.random.split(key if key is not None else jax.random.key(0), groups)
    out = {}
    for g, s in enumerate(subsets):
      y = rows[g]
      if train and self.dropout > 0:
        keep = jax.random.bernoulli(keys[g], 1.0 - self.dropout, (y.shape[0], 1, 1, y.shape[-1]))
        y = layers.apply_drop_mask(y, keep, self.dropout)
      out[s] = self.conv_seg[s](y)
    return out
