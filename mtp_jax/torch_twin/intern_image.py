"""InternImage (DCNv3 core op) in PyTorch, written from the official OpenGVLab code with its module
tree and state-dict names, without mmcv, timm or the compiled `ops_dcnv3`: the numerical reference
for the JAX encoder `mtp_jax.models.intern_image` and the module its exported weights load into.

    from mtp_jax.torch_twin.intern_image import build_twin
    model = build_twin(channels=192, depths=(5, 5, 24, 5), groups=(12, 24, 48, 96),
                       layer_scale=1e-5, offset_scale=2.0, post_norm=True)   # InternImage-XL
    maps = model(x)          # x (N, 3, H, W) -> 4 NCHW maps, C * 2**i channels at strides 4..32

The backbone is the detection/segmentation one (out_indices (0, 1, 2, 3)): no conv_head, head or
avgpool, so an ImageNet checkpoint loads with strict=False (its head keys unexpected). Inside, maps
are channels last (N, H, W, C), as the official. The InternImage-H/G extras (res_post_norm,
level2_post_norm, the CLIP projector, remove_center) are not implemented.
"""

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from mtp_jax.torch_twin.vit_rvsa import Mlp


# ---- DCNv3 -----------------------------------------------------------------------------------------

def dcnv3_core_pytorch(x, offset, mask, *, kernel_size, stride, pad, dilation, group, offset_scale):
  """The official `dcnv3_core_pytorch` (grid_sample, bilinear, zeros, align_corners=False).

  x (N, H, W, C) channels last, C = group * group_channels; offset (N, Ho, Wo, group * K*K * 2), per
  group K*K (dx, dy) pairs in pixels; mask (N, Ho, Wo, group * K*K). Points run x-major: point
  p = ix * K + iy is the tap (ix, iy) of the dilated K x K grid around the centre. A point's
  location is centre + offset_scale * (tap + offset), in pixels of the padded input. Returns
  (N, Ho, Wo, C), the mask-weighted sum of the bilinear samples of each group's channels."""
  x = F.pad(x, (0, 0, pad, pad, pad, pad))
  n, hin, win, c = x.shape
  _, ho, wo, _ = offset.shape
  k = kernel_size
  half = (dilation * (k - 1)) // 2
  # Normalised [0, 1] centres (pixel centres at +0.5) and taps of the sampling grid, (x, y) last.
  ys = (half + 0.5 + stride * torch.arange(ho, dtype=x.dtype)) / hin
  xs = (half + 0.5 + stride * torch.arange(wo, dtype=x.dtype)) / win
  ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
  ref = torch.stack([ref_x, ref_y], -1)[:, :, None, :]                          # (Ho, Wo, 1, 2)
  taps = (-half + dilation * torch.arange(k)).to(x.dtype)
  tap_x, tap_y = torch.meshgrid(taps / win, taps / hin, indexing="ij")          # x-major
  grid = torch.stack([tap_x, tap_y], -1).reshape(1, k * k, 2).repeat(group, 1, 1).reshape(-1, 2)
  size = torch.tensor([win, hin], dtype=x.dtype)
  loc = ref + grid * offset_scale + offset.reshape(n, ho, wo, -1, 2) * offset_scale / size
  grids = (2 * loc - 1).reshape(n, ho * wo, group, k * k, 2).transpose(1, 2).flatten(0, 1)
  planes = x.reshape(n, hin * win, c).transpose(1, 2).reshape(n * group, c // group, hin, win)
  sampled = F.grid_sample(planes, grids, mode="bilinear", padding_mode="zeros", align_corners=False)
  m = mask.reshape(n, ho * wo, group, k * k).transpose(1, 2).reshape(n * group, 1, ho * wo, k * k)
  out = (sampled * m).sum(-1).reshape(n, c, ho * wo)                           # (N, C, Ho*Wo)
  return out.transpose(1, 2).reshape(n, ho, wo, c)


class to_channels_first(nn.Module):  # noqa: N801 (the official name)
  def forward(self, x):
    return x.permute(0, 3, 1, 2)


class to_channels_last(nn.Module):  # noqa: N801
  def forward(self, x):
    return x.permute(0, 2, 3, 1)


def layer_norm(dim, in_first=False, out_first=False):
  """build_norm_layer(dim, 'LN', ...) with eps 1e-6: Sequential([to_channels_last,] LayerNorm
  [, to_channels_first]), so the LayerNorm's keys are `.0.*` channels last in, `.1.*` otherwise."""
  layers = [to_channels_last()] if in_first else []
  layers.append(nn.LayerNorm(dim, eps=1e-6))
  if out_first:
    layers.append(to_channels_first())
  return nn.Sequential(*layers)


class DCNv3(nn.Module):
  """The official `DCNv3_pytorch` (GELU, LN). (N, H, W, C) -> (N, Ho, Wo, C).

  Keys: `dw_conv.0` depthwise Conv2d(C, C, dw_kernel_size), `dw_conv.1.1` LayerNorm, `offset`,
  `mask`, `input_proj`, `output_proj` (Linear), and with center_feature_scale
  `center_feature_scale_proj_weight` (group, C) and `center_feature_scale_proj_bias` (group,).
  Offsets and mask are predicted at the input resolution, so stride 1 with pad (k-1)//2 as
  InternImage builds it is the case where they fit the output."""

  def __init__(self, channels=64, kernel_size=3, dw_kernel_size=None, stride=1, pad=1, dilation=1,
               group=4, offset_scale=1.0, center_feature_scale=False):
    super().__init__()
    if channels % group:
      raise ValueError(f"channels must be divisible by group, got {channels} and {group}")
    dw_kernel_size = kernel_size if dw_kernel_size is None else dw_kernel_size
    self.channels, self.kernel_size, self.dw_kernel_size = channels, kernel_size, dw_kernel_size
    self.stride, self.pad, self.dilation = stride, pad, dilation
    self.group, self.group_channels, self.offset_scale = group, channels // group, offset_scale
    self.center_feature_scale = center_feature_scale
    self.dw_conv = nn.Sequential(
        nn.Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels),
        layer_norm(channels, in_first=True), nn.GELU())
    self.offset = nn.Linear(channels, group * kernel_size * kernel_size * 2)
    self.mask = nn.Linear(channels, group * kernel_size * kernel_size)
    self.input_proj = nn.Linear(channels, channels)
    self.output_proj = nn.Linear(channels, channels)
    self._reset_parameters()
    if center_feature_scale:
      self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
      self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))

  def _reset_parameters(self):
    """Offset and mask zero (every point starts on its tap, weights uniform), projections
    xavier-uniform with zero bias; the depthwise conv keeps PyTorch's default."""
    for lin in (self.offset, self.mask):
      nn.init.zeros_(lin.weight)
      nn.init.zeros_(lin.bias)
    for lin in (self.input_proj, self.output_proj):
      nn.init.xavier_uniform_(lin.weight)
      nn.init.zeros_(lin.bias)

  def forward(self, inputs):
    n, h, w, _ = inputs.shape
    x = self.input_proj(inputs)
    x1 = self.dw_conv(inputs.permute(0, 3, 1, 2))                               # (N, H, W, C)
    offset = self.offset(x1)
    mask = F.softmax(self.mask(x1).reshape(n, h, w, self.group, -1), -1).reshape(n, h, w, -1)
    out = dcnv3_core_pytorch(x, offset, mask, kernel_size=self.kernel_size, stride=self.stride,
                             pad=self.pad, dilation=self.dilation, group=self.group,
                             offset_scale=self.offset_scale)
    if self.center_feature_scale:
      scale = F.linear(x1, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias)
      scale = scale.sigmoid()[..., None].repeat(1, 1, 1, 1, self.group_channels).flatten(-2)
      out = out * (1 - scale) + x * scale
    return self.output_proj(out)


# ---- the backbone ----------------------------------------------------------------------------------

class DropPath(nn.Module):
  """Stochastic depth per sample as timm's: x / keep_prob * Bernoulli(keep_prob), in training only."""

  def __init__(self, drop_prob=0.0):
    super().__init__()
    self.drop_prob = drop_prob

  def forward(self, x):
    if self.drop_prob == 0.0 or not self.training:
      return x
    keep = 1.0 - self.drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0:
      mask.div_(keep)
    return x * mask


class StemLayer(nn.Module):
  """(N, in_chans, H, W) -> (N, H/4, W/4, C): two 3x3 stride-2 convs, LN (+GELU) after each."""

  def __init__(self, in_chans, out_chans):
    super().__init__()
    self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1)
    self.norm1 = layer_norm(out_chans // 2, in_first=True, out_first=True)     # norm1.1
    self.act = nn.GELU()
    self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1)
    self.norm2 = layer_norm(out_chans, in_first=True)                          # norm2.1

  def forward(self, x):
    return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class DownsampleLayer(nn.Module):
  """(N, H, W, C) -> (N, H/2, W/2, 2C): 3x3 stride-2 conv without bias, then LN."""

  def __init__(self, channels):
    super().__init__()
    self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
    self.norm = layer_norm(2 * channels, in_first=True)                        # norm.1

  def forward(self, x):
    return self.norm(self.conv(x.permute(0, 3, 1, 2)))


class InternImageLayer(nn.Module):
  """One block on (N, H, W, C). post_norm: x + DP(g1 * norm1(dcn(x))), x + DP(g2 * norm2(mlp(x)));
  pre-norm: x + DP(g1 * dcn(norm1(x))), x + DP(g2 * mlp(norm2(x))); no gammas when layer_scale
  is None."""

  def __init__(self, channels, groups, mlp_ratio=4.0, drop_path=0.0, post_norm=False, layer_scale=None,
               offset_scale=1.0, with_cp=False, dw_kernel_size=None, center_feature_scale=False):
    super().__init__()
    self.post_norm, self.with_cp = post_norm, with_cp
    self.norm1 = layer_norm(channels)                                          # norm1.0
    self.dcn = DCNv3(channels, kernel_size=3, dw_kernel_size=dw_kernel_size, stride=1, pad=1, dilation=1,
                     group=groups, offset_scale=offset_scale, center_feature_scale=center_feature_scale)
    self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
    self.norm2 = layer_norm(channels)                                          # norm2.0
    self.mlp = Mlp(channels, int(channels * mlp_ratio))   # the official MLPLayer: fc1, GELU, fc2
    self.layer_scale = layer_scale is not None
    if self.layer_scale:
      self.gamma1 = nn.Parameter(layer_scale * torch.ones(channels))
      self.gamma2 = nn.Parameter(layer_scale * torch.ones(channels))

  def _inner_forward(self, x):
    g1, g2 = (self.gamma1, self.gamma2) if self.layer_scale else (1.0, 1.0)
    if self.post_norm:
      x = x + self.drop_path(g1 * self.norm1(self.dcn(x)))
      return x + self.drop_path(g2 * self.norm2(self.mlp(x)))
    x = x + self.drop_path(g1 * self.dcn(self.norm1(x)))
    return x + self.drop_path(g2 * self.mlp(self.norm2(x)))

  def forward(self, x):
    if self.with_cp and x.requires_grad:
      return torch.utils.checkpoint.checkpoint(self._inner_forward, x, use_reentrant=False)
    return self._inner_forward(x)


class InternImageBlock(nn.Module):
  """A level: `blocks.{j}`, then `norm` (only when not post_norm, or with center_feature_scale),
  then `downsample` (all levels but the last). forward -> (input of the next level, this level's
  output before downsampling), both (N, H, W, C)."""

  def __init__(self, channels, depth, groups, downsample=True, mlp_ratio=4.0, drop_path=0.0,
               post_norm=False, offset_scale=1.0, layer_scale=None, with_cp=False, dw_kernel_size=None,
               center_feature_scale=False):
    super().__init__()
    self.post_norm, self.center_feature_scale = post_norm, center_feature_scale
    rates = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
    self.blocks = nn.ModuleList([
        InternImageLayer(channels, groups, mlp_ratio=mlp_ratio, drop_path=rates[i], post_norm=post_norm,
                         layer_scale=layer_scale, offset_scale=offset_scale, with_cp=with_cp,
                         dw_kernel_size=dw_kernel_size, center_feature_scale=center_feature_scale)
        for i in range(depth)])
    if not post_norm or center_feature_scale:
      self.norm = layer_norm(channels)                                         # norm.0
    self.downsample = DownsampleLayer(channels) if downsample else None

  def forward(self, x):
    for blk in self.blocks:
      x = blk(x)
    if not self.post_norm or self.center_feature_scale:
      x = self.norm(x)
    return (x if self.downsample is None else self.downsample(x)), x


class InternImage(nn.Module):
  """The InternImage backbone: `patch_embed` (stem, stride 4), `levels.{0..3}` of C * 2**i channels.

  forward(x (N, in_chans, H, W) float) -> the 4 levels' outputs before downsampling, (N, C * 2**i,
  H / 2**(i+2), W / 2**(i+2)), or channels last with return_nhwc=True. Stochastic depth rates rise
  linearly from 0 to drop_path_rate over all blocks. Init as the official: Linear trunc-normal
  std .02 (bias 0), LayerNorm 1 / 0, then each DCNv3's _reset_parameters; convs PyTorch's default.
  with_cp checkpoints each block's activations (torch.utils.checkpoint) when gradients flow."""

  def __init__(self, *, channels, depths, groups, in_chans=3, mlp_ratio=4.0, drop_path_rate=0.2,
               layer_scale=None, offset_scale=1.0, post_norm=False, dw_kernel_size=None,
               center_feature_scale=False, with_cp=False):
    super().__init__()
    if len(depths) != len(groups):
      raise ValueError(f"depths {depths} and groups {groups} differ in length")
    self.num_levels = len(depths)
    self.patch_embed = StemLayer(in_chans, channels)
    dpr = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths))]
    starts = [sum(depths[:i]) for i in range(self.num_levels + 1)]
    self.levels = nn.ModuleList([
        InternImageBlock(int(channels * 2 ** i), depths[i], groups[i], downsample=i < self.num_levels - 1,
                         mlp_ratio=mlp_ratio, drop_path=dpr[starts[i]:starts[i + 1]], post_norm=post_norm,
                         offset_scale=offset_scale, layer_scale=layer_scale, with_cp=with_cp,
                         dw_kernel_size=dw_kernel_size, center_feature_scale=center_feature_scale)
        for i in range(self.num_levels)])
    self.apply(self._init_weights)
    for m in self.modules():
      if isinstance(m, DCNv3):
        m._reset_parameters()

  @staticmethod
  def _init_weights(m):
    if isinstance(m, nn.Linear):
      nn.init.trunc_normal_(m.weight, std=0.02)  # timm's trunc_normal_: cut at +-2 absolute
      if m.bias is not None:
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)

  def forward(self, x, return_nhwc=False):
    x = self.patch_embed(x)
    outs = []
    for level in self.levels:
      x, x_ = level(x)
      outs.append(x_ if return_nhwc else x_.permute(0, 3, 1, 2).contiguous())
    return outs


_JAX_ONLY = ("img_size", "dcn_method", "remat", "scan_blocks", "dtype")  # InternImageEncoder only


def build_twin(name=None, **kwargs) -> InternImage:
  """InternImage(**kwargs) in eval mode. With a name, the preset `mtp_jax.models.INTERN_IMAGE_PRESETS
  [name]` (imported only then) updated by kwargs, the JAX encoder's own options (img_size,
  dcn_method, remat, scan_blocks, dtype) dropped: build_twin("intern_image_xl")."""
  if name is not None:
    from mtp_jax.models import INTERN_IMAGE_PRESETS  # pylint: disable=import-outside-toplevel
    kwargs = {**INTERN_IMAGE_PRESETS[name], **kwargs}
    for key in _JAX_ONLY:
      kwargs.pop(key, None)
  return InternImage(**kwargs).eval()
