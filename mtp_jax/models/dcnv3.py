"""InternImage's DCNv3 layer (the official `DCNv3` / `DCNv3_pytorch` module) on `dcnv3_core`.

Input and output (N, H, W, C), channels last; stride 1, pad (k-1)//2, dilation 1 (as InternImage
builds it), so offsets and mask are predicted at the input resolution:

    x = input_proj(input);  x1 = GELU(LN(dw_conv(input)))   (depthwise k_dw x k_dw conv)
    offset = offset(x1);  mask = softmax over P of mask(x1), per group
    x = dcnv3_core(x, offset, mask)
    [center_feature_scale: s = sigmoid(x1 W^T + b), one per group; x = x*(1 - s) + input_proj(input)*s]
    out = output_proj(x)

Names follow the official state dict: `input_proj`, `output_proj`, `offset`, `mask` (Linear:
torch `weight` = our `kernel` transposed, (out, in) vs (in, out)); `dw_conv.0` the depthwise
Conv2d (torch weight (C, 1, k, k) = our kernel (k, k, 1, C) transposed (3, 2, 0, 1)), `dw_conv.1.1`
the LayerNorm (torch weight/bias = our scale/bias; `dw_conv.1.0` is torch's to_channels_last
permute), `dw_conv.2` the GELU; `center_feature_scale_proj_weight` (G, C) and `_bias` (G,) kept
in torch's layout. Init as the official `_reset_parameters`: offset and mask zero, input/output
projections xavier-uniform with zero bias, the depthwise conv PyTorch's default, the centre
feature scale zero.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax.models import layers
from mtp_jax.ops.dcnv3 import dcnv3_core


class ToChannelsLast(nnx.Module):
  """torch's `to_channels_last` permute at dw_conv.1.0: the identity on NHWC maps, kept so the
  LayerNorm sits at the official index dw_conv.1.1."""

  def __call__(self, x):
    return x


class ToChannelsFirst(nnx.Module):
  """torch's `to_channels_first` permute (InternImage's stem norm1.2): the identity here too."""

  def __call__(self, x):
    return x


def depthwise_conv(channels, kernel_size, *, rngs, dtype=None):
  """Conv2d(C, C, k, padding=(k-1)//2, groups=C) with PyTorch's default init (fan_in = k*k)."""
  pad = (kernel_size - 1) // 2
  return nnx.Conv(channels, channels, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)),
                  feature_group_count=channels, dtype=dtype,
                  kernel_init=layers.torch_default_kernel_init,
                  bias_init=layers.torch_uniform_init(kernel_size * kernel_size),
                  kernel_metadata=layers.axes(None, None, None, "embed"),
                  bias_metadata=layers.axes("embed"), rngs=rngs)


class DCNv3(nnx.Module):
  """See the module docstring. `method` picks dcnv3_core's formulation."""

  def __init__(self, channels, group, kernel_size=3, offset_scale=1.0, center_feature_scale=False,
               dw_kernel_size=None, *, rngs, dtype=None, method="auto"):
    if channels % group:
      raise ValueError(f"channels must be divisible by group, got {channels} and {group}")
    self.channels, self.group, self.kernel_size = channels, group, kernel_size
    self.offset_scale, self.method = offset_scale, method
    self.use_center_feature_scale = center_feature_scale
    points = group * kernel_size * kernel_size
    xavier, zeros = nnx.initializers.xavier_uniform(), nnx.initializers.zeros

    def dense(dout, init, out_axis):
      return layers.linear(channels, dout, rngs=rngs, in_axis="embed", out_axis=out_axis,
                           dtype=dtype, kernel_init=init, bias_init=zeros)

    self.input_proj = dense(channels, xavier, "embed")
    self.output_proj = dense(channels, xavier, "embed")
    self.offset = dense(points * 2, zeros, None)
    self.mask = dense(points, zeros, None)
    self.dw_conv = nnx.List([
        depthwise_conv(channels, dw_kernel_size or kernel_size, rngs=rngs, dtype=dtype),
        nnx.List([ToChannelsLast(), layers.layer_norm(channels, rngs=rngs, eps=1e-6, dtype=dtype)]),
        layers.Gelu()])
    if center_feature_scale:
      self.center_feature_scale_proj_weight = nnx.Param(jnp.zeros((group, channels)),
                                                        **layers.axes(None, "embed"))
      self.center_feature_scale_proj_bias = nnx.Param(jnp.zeros((group,)), **layers.axes(None))

  def __call__(self, inputs):
    n, h, w, c = inputs.shape
    x = self.input_proj(inputs)
    conv, (to_last, norm), act = self.dw_conv
    x1 = act(norm(to_last(conv(inputs))))
    offset = self.offset(x1)
    mask = jax.nn.softmax(self.mask(x1).reshape(n, h, w, self.group, -1), axis=-1)
    out = dcnv3_core(x, offset, mask.reshape(n, h, w, -1).astype(x.dtype),
                     kernel_size=self.kernel_size, stride=1, pad=(self.kernel_size - 1) // 2,
                     dilation=1, group=self.group, offset_scale=self.offset_scale,
                     method=self.method)
    if self.use_center_feature_scale:
      weight = self.center_feature_scale_proj_weight[...].astype(x1.dtype)
      bias = self.center_feature_scale_proj_bias[...].astype(x1.dtype)
      scale = jax.nn.sigmoid(x1 @ weight.T + bias)  # (N, H, W, G)
      scale = jnp.repeat(scale, c // self.group, axis=-1)
      out = out * (1 - scale) + x * scale
    return self.output_proj(out)
