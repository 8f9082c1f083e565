"""mmdet `FPN` neck (MTP_SPEC.md §3.3: FPN(in_channels, 256, num_outs=5) for both R-CNNs;
§5.2: RetinaNet's FPN(start_level=1, add_extra_convs='on_input')).

mmdet defaults: start_level 0, add_extra_convs False, no norm, no activation, nearest upsampling.
With `start_level` k the maps before k are not used (lateral_convs.0 reads map k). With
`extra_on_input` the maps past the inputs come from stride-2 3x3 convs (padding 1, as PyTorch)
appended to `fpn_convs`: the first on the last INPUT map, the next on the previous output (no
ReLU between: mmdet's relu_before_extra_convs False), instead of max pooling.
  laterals[i] = lateral_convs[i](x[i])                        1x1 conv with bias
  laterals[i-1] += nearest_resize(laterals[i], size of laterals[i-1])   top-down, i = L-1 .. 1
  outs[i] = fpn_convs[i](laterals[i])                         3x3 conv, padding 1, with bias
  outs += [max_pool2d(outs[-1], kernel 1, stride 2)] until num_outs maps (= outs[-1][::2, ::2])
Init, `init='mmdet'` (default): what mmdet's `init_weights()` gives (`init_cfg=dict(type='Xavier',
layer='Conv2d', distribution='uniform')`, applied after ConvModule's own kaiming init): Xavier
uniform kernels, zero biases. `init='mtp'`: what MTP's pretraining actually starts from, since it
never calls `init_weights()` (Multi-Task_Pretrain/models.py, rotated_detection/two_stage.py), so
ConvModule's construction-time `kaiming_init` stays: normal, fan_out, relu gain, zero biases.
Parameters are named `lateral_convs.{i}.conv`, `fpn_convs.{i}.conv` as mmdet's ConvModules.
Layout NHWC; input and output are lists of maps, finest first.
"""

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax.models import layers

xavier_uniform = nnx.initializers.xavier_uniform()   # fan_in = in*k*k, fan_out = out*k*k
# mmcv kaiming_init(a=0, mode='fan_out', nonlinearity='relu', distribution='normal'):
# std sqrt(2 / fan_out).
kaiming_normal_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_FPN_INITS = {"mmdet": xavier_uniform, "mtp": kaiming_normal_fan_out}


def resize_nearest(x, height: int, width: int):
  """NHWC nearest resize with PyTorch `F.interpolate(size=..., mode='nearest')` indices.

  Source index = min(floor(dst * (in / out)), in - 1), the scale and product in float32 as
  PyTorch computes them (exactly `dst >> 1` for a 2x upsampling).
  """
  def index(n_in, n_out):
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, n_in - 1)
  if x.shape[1:3] == (height, width):
    return x
  return x[:, index(x.shape[1], height)][:, :, index(x.shape[2], width)]


def conv_zero_bias(din: int, dout: int, kernel_size: int, *, kernel_init, rngs, dtype=None,
                   in_axis="conv_in", out_axis="conv_out", stride: int = 1):
  """`layers.conv` with a zero bias, as mmcv's Xavier and Normal initialisers leave it (bias=0);
  padding k // 2 on every side, PyTorch's (flax's 'SAME' differs from it at stride 2)."""
  pad = kernel_size // 2
  conv = layers.conv(din, dout, kernel_size, dtype=dtype, kernel_init=kernel_init, rngs=rngs,
                     in_axis=in_axis, out_axis=out_axis, stride=stride, padding=((pad, pad), (pad, pad)))
  conv.bias[...] = jnp.zeros_like(conv.bias[...])
  return conv


class FPNConv(nnx.Module):
  """A norm-free, activation-free mmcv ConvModule: its conv sits under `conv`."""

  def __init__(self, din: int, dout: int, kernel_size: int, *, rngs, dtype=None,
               kernel_init=xavier_uniform, stride: int = 1):
    self.conv = conv_zero_bias(din, dout, kernel_size, kernel_init=kernel_init, rngs=rngs,
                               dtype=dtype, stride=stride)

  def __call__(self, x):
    return self.conv(x)


class FPN(nnx.Module):
  """mmdet FPN: len(in_channels) NHWC maps (finest first) -> num_outs maps of out_channels."""

  def __init__(self, in_channels, out_channels: int = 256, num_outs: int = 5, *, rngs, dtype=None,
               init: str = "mmdet", start_level: int = 0, extra_on_input: bool = False):
    in_channels = tuple(in_channels)
    used = in_channels[start_level:]
    if num_outs < len(used):
      raise ValueError(f"num_outs {num_outs} < {len(used)} input levels")
    if init not in _FPN_INITS:
      raise ValueError(f"init {init!r} is not one of {sorted(_FPN_INITS)}")
    self.num_outs, self.start_level, self.num_inputs = num_outs, start_level, len(in_channels)
    self.extra_on_input = extra_on_input
    conv = functools.partial(FPNConv, rngs=rngs, dtype=dtype, kernel_init=_FPN_INITS[init])
    self.lateral_convs = nnx.List([conv(c, out_channels, 1) for c in used])
    convs = [conv(out_channels, out_channels, 3) for _ in used]
    if extra_on_input:
      convs += [conv(in_channels[-1] if i == 0 else out_channels, out_channels, 3, stride=2)
                for i in range(num_outs - len(used))]
    self.fpn_convs = nnx.List(convs)

  def __call__(self, features):
    if len(features) != self.num_inputs:
      raise ValueError(f"FPN got {len(features)} maps for {self.num_inputs} in_channels")
    inputs = list(features)
    features = inputs[self.start_level:]
    laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
    for i in range(len(laterals) - 1, 0, -1):
      height, width = laterals[i - 1].shape[1:3]
      laterals[i - 1] = laterals[i - 1] + resize_nearest(laterals[i], height, width)
    outs = [conv(l) for conv, l in zip(self.fpn_convs, laterals)]
    if self.extra_on_input and len(outs) < self.num_outs:
      outs.append(self.fpn_convs[len(outs)](inputs[-1]))
      while len(outs) < self.num_outs:
        outs.append(self.fpn_convs[len(outs)](outs[-1]))
    while len(outs) < self.num_outs:
      outs.append(outs[-1][:, ::2, ::2])   # max_pool2d(kernel 1, stride 2)
    return outs
