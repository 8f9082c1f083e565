"""InternImage, MTP's convolutional encoder (MTP_SPEC §2), on DCNv3 in plain jax.numpy.

The module tree and parameter names are those of the official `InternImage` backbone
(OpenGVLab/InternImage), so its checkpoints convert by a path join plus transposes
(mtp_jax/checkpoints/torch_convert.py):

    patch_embed   stem: conv1 (3x3 s2, C/2) -> norm1.1 (LN) -> GELU -> conv2 (3x3 s2, C) -> norm2.1
    levels.{i}    stage i of C * 2^i channels at stride 4 * 2^i:
      blocks.{j}  norm1.0, dcn (mtp_jax/models/dcnv3.py), norm2.0, mlp.fc1 / mlp.fc2, gamma1 / gamma2
      norm.0      LN after the blocks, only without post_norm (or with center_feature_scale)
      downsample  conv (3x3 s2, 2C, no bias) -> norm.1 (LN), i < 3

(The `.0` / `.1` indices are torch's nn.Sequential places; the official permute modules sit at the
other places and are identities on our NHWC maps.) A block with post_norm (InternImage-XL):

    x = x + DP(gamma1 * LN1(dcn(x)));  x = x + DP(gamma2 * LN2(mlp(x)))

and without it the pre-norm form x + DP(gamma1 * dcn(LN1(x))); without layer_scale the gammas are
left out. LayerNorm eps 1e-6 everywhere; stochastic depth rates linear from 0 to drop_path_rate
over all blocks. Init as the official `_init_weights` then `_reset_parameters`: Linear
trunc_normal(0.02) with zero bias, LayerNorm (1, 0), convolutions PyTorch's default, DCNv3's
projections xavier and its offset / mask zero, gammas layer_scale.

Input: NHWC float images of `in_chans` bands whose sides are multiples of 32 (any size: no
position table). Output: the four stages' maps before downsampling, NHWC, `out_channels` =
(C, 2C, 4C, 8C) channels at strides 4, 8, 16, 32 (InternImage-XL: 192 ... 1536). A CNN has one set
of outputs, so `multi_scale` is accepted and ignored: scene classification reads the last map
(1536-d for XL, as MTP's mmpretrain head), dense tasks all four. InternImage-H/G's extras
(res_post_norm, level2_post_norm, the CLIP projector) and the classification model's conv_head
are not here: MTP uses the XL backbone only.
"""

import jax
import numpy as np
from flax import nnx

from mtp_jax.models import layers
from mtp_jax.models.dcnv3 import DCNv3, ToChannelsFirst, ToChannelsLast
from mtp_jax.models.vit import Mlp


def _conv3x3_s2(din, dout, *, rngs, dtype, use_bias=True, in_axis="embed"):
  """Conv2d(din, dout, 3, stride 2, padding 1): explicit padding, as PyTorch (XLA's 'SAME' would
  pad an even side (0, 1))."""
  return layers.conv(din, dout, 3, stride=2, padding=((1, 1), (1, 1)), use_bias=use_bias,
                     dtype=dtype, in_axis=in_axis, out_axis="embed", rngs=rngs)


def _norm(dim, *, rngs, dtype, channels_first_in=False, channels_first_out=False):
  """The official build_norm_layer(dim, 'LN', ...) as a list: the LayerNorm at torch's index."""
  parts = [ToChannelsLast()] if channels_first_in else []
  parts.append(layers.layer_norm(dim, eps=1e-6, dtype=dtype, rngs=rngs))
  if channels_first_out:
    parts.append(ToChannelsFirst())
  return nnx.List(parts)


def _apply(sequence, x):
  for module in sequence:
    x = module(x)
  return x


class StemLayer(nnx.Module):
  """Two 3x3 stride-2 convolutions with LN and GELU between: (B, H, W, in) -> (B, H/4, W/4, C)."""

  def __init__(self, in_chans, channels, *, rngs, dtype=None):
    self.conv1 = _conv3x3_s2(in_chans, channels // 2, rngs=rngs, dtype=dtype, in_axis=None)
    self.norm1 = _norm(channels // 2, rngs=rngs, dtype=dtype, channels_first_in=True, channels_first_out=True)
    self.conv2 = _conv3x3_s2(channels // 2, channels, rngs=rngs, dtype=dtype)
    self.norm2 = _norm(channels, rngs=rngs, dtype=dtype, channels_first_in=True)

  def __call__(self, x):
    x = jax.nn.gelu(_apply(self.norm1, self.conv1(x)), approximate=False)
    return _apply(self.norm2, self.conv2(x))


class DownsampleLayer(nnx.Module):
  """3x3 stride-2 conv without bias to 2C channels, then LN: halves the map."""

  def __init__(self, channels, *, rngs, dtype=None):
    self.conv = _conv3x3_s2(channels, 2 * channels, use_bias=False, rngs=rngs, dtype=dtype)
    self.norm = _norm(2 * channels, rngs=rngs, dtype=dtype, channels_first_in=True)

  def __call__(self, x):
    return _apply(self.norm, self.conv(x))


class InternImageLayer(nnx.Module):
  """One InternImage block (see the module docstring for its two forms)."""

  def __init__(self, channels, groups, *, mlp_ratio, drop_path, layer_scale, offset_scale, post_norm,
               dw_kernel_size, center_feature_scale, dcn_method, rngs, dtype=None):
    self.norm1 = _norm(channels, rngs=rngs, dtype=dtype)
    self.dcn = DCNv3(channels, groups, kernel_size=3, offset_scale=offset_scale,
                     center_feature_scale=center_feature_scale, dw_kernel_size=dw_kernel_size,
                     rngs=rngs, dtype=dtype, method=dcn_method)
    self.norm2 = _norm(channels, rngs=rngs, dtype=dtype)
    self.mlp = Mlp(channels, int(channels * mlp_ratio), rngs=rngs, dtype=dtype)
    self.post_norm, self.drop_path = post_norm, drop_path
    self.layer_scale = layer_scale is not None
    if self.layer_scale:
      self.gamma1 = nnx.Param(np.full((channels,), layer_scale, np.float32), **layers.axes("embed"))
      self.gamma2 = nnx.Param(np.full((channels,), layer_scale, np.float32), **layers.axes("embed"))

  def _scaled(self, gamma: str, y):
    return y * getattr(self, gamma)[...].astype(y.dtype) if self.layer_scale else y

  def __call__(self, x, key, train: bool):
    k1, k2 = jax.random.split(key)
    norm1, norm2 = self.norm1[0], self.norm2[0]
    if self.post_norm:
      y = norm1(self.dcn(x))
    else:
      y = self.dcn(norm1(x))
    x = x + layers.drop_path(self._scaled("gamma1", y), self.drop_path, k1, train)
    y = norm2(self.mlp(x)) if self.post_norm else self.mlp(norm2(x))
    return x + layers.drop_path(self._scaled("gamma2", y), self.drop_path, k2, train)


class InternImageLevel(nnx.Module):
  """The official `InternImageBlock`: a stage's blocks, its optional LN and its downsampling."""

  def __init__(self, channels, depth, groups, *, drop_paths, post_norm, center_feature_scale,
               downsample: bool, rngs, dtype=None, **layer_kwargs):
    self.blocks = nnx.List([
        InternImageLayer(channels, groups, drop_path=float(drop_paths[j]), post_norm=post_norm,
                         center_feature_scale=center_feature_scale, rngs=rngs, dtype=dtype,
                         **layer_kwargs)
        for j in range(depth)])
    self.has_norm = (not post_norm) or center_feature_scale
    if self.has_norm:
      self.norm = _norm(channels, rngs=rngs, dtype=dtype)
    self.has_downsample = downsample
    if downsample:
      self.downsample = DownsampleLayer(channels, rngs=rngs, dtype=dtype)


class InternImageEncoder(nnx.Module):
  """InternImage backbone; see the module docstring for inputs, outputs and names.

  img_size is the training input size (kept for the encoder interface; any multiple of 32 runs).
  remat: activation checkpointing per block (the original's with_cp). dcn_method: DCNv3's
  formulation ('auto': per map and platform, 'gather' or 'matmul'; mtp_jax/ops/dcnv3.py). dtype:
  the compute dtype.
  """

  def __init__(self, *, img_size: int, channels: int = 192, depths=(5, 5, 24, 5),
               groups=(12, 24, 48, 96), mlp_ratio: float = 4.0, drop_path_rate: float = 0.2,
               layer_scale: float | None = 1e-5, offset_scale: float = 2.0, post_norm: bool = True,
               dw_kernel_size: int | None = None, center_feature_scale: bool = False,
               dcn_method: str = "auto", remat: bool = False, scan_blocks: bool = False,
               in_chans: int = 3, dtype=None, rngs: nnx.Rngs):
    depths, groups = tuple(int(d) for d in depths), tuple(int(g) for g in groups)
    if len(depths) != 4 or len(groups) != 4:
      raise ValueError(f"InternImage has 4 stages: got depths {depths} and groups {groups}")
    widths = tuple(channels * 2 ** i for i in range(4))
    bad = [(w, g) for w, g in zip(widths, groups) if g < 1 or w % g]
    if channels % 2 or bad:
      raise ValueError(f"InternImage channels {channels} (even) give stage widths {widths}, which "
                       f"groups {groups} must divide")
    if scan_blocks:
      raise ValueError("model.scan_blocks is implemented for the ViT encoders only; InternImage "
                       "runs its blocks as a Python loop (set it False)")
    if img_size % 32:
      raise ValueError(f"InternImage needs image sides that are multiples of 32, got img_size {img_size}")
    self.img_size, self.in_chans, self.dtype, self.remat = img_size, in_chans, dtype, remat
    self.depths, self.out_channels = depths, widths
    self.patch_embed = StemLayer(in_chans, channels, rngs=rngs, dtype=dtype)
    dpr = np.linspace(0.0, drop_path_rate, sum(depths))
    starts = np.cumsum((0,) + depths)
    self.levels = nnx.List([
        InternImageLevel(widths[i], depths[i], groups[i], drop_paths=dpr[starts[i]:starts[i + 1]],
                         post_norm=post_norm, center_feature_scale=center_feature_scale,
                         downsample=i < 3, rngs=rngs, dtype=dtype, mlp_ratio=mlp_ratio,
                         layer_scale=layer_scale, offset_scale=offset_scale,
                         dw_kernel_size=dw_kernel_size, dcn_method=dcn_method)
        for i in range(4)])

  def __call__(self, images, *, train: bool = False, key=None, multi_scale: bool = True):
    """images (B, H, W, in_chans) float, H and W multiples of 32 -> the 4 stage maps (NHWC)."""
    del multi_scale   # one set of outputs (module docstring)
    b, h, w, _ = images.shape
    if h % 32 or w % 32:
      raise ValueError(f"InternImage needs image sides that are multiples of 32, got {h}x{w}")
    if key is None:
      if train:
        raise ValueError("train=True needs a PRNG key for stochastic depth")
      key = jax.random.key(0)
    keys = iter(jax.random.split(key, sum(self.depths)))
    x = self.patch_embed(images.astype(self.dtype or images.dtype))
    outputs = []
    for i, level in enumerate(self.levels):
      with jax.named_scope(f"levels.{i}"):   # names the compiled kernels (mtp_jax.plan --top)
        for j, blk in enumerate(level.blocks):
          with jax.named_scope(f"blocks.{j}"):
            x = self._block(blk, x, next(keys), train)
        if level.has_norm:
          x = _apply(level.norm, x)
        outputs.append(x)
        if level.has_downsample:
          x = level.downsample(x)
    return outputs

  def _block(self, blk, x, key, train):
    if self.remat:  # activation checkpointing: only the block's input is kept for the backward
      return nnx.remat(lambda m, y, k: m(y, k, train))(blk, x, key)
    return blk(x, key, train)
