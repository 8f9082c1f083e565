"""2-D convolution with a kernel gradient made of matmuls on the CPU backend.

`conv_general_dilated` has `jax.lax.conv_general_dilated`'s signature (it is what every
`layers.conv` module calls). Forward values and the input gradient are XLA's convolution. When
the program is compiled for the CPU (`mtp_jax/ops/target.py`), for stride-1, undilated, ungrouped NHWC/HWIO convolutions, the kernel gradient is
instead written as one matmul per kernel tap:

    dK[i, j] = sum_{b, y, x} x_padded[b, y + i, x + j, :]^T g[b, y, x, :]      (C_in, C_out)

which is the same sum. Why: XLA:CPU lowers the kernel gradient to a convolution whose window is
the whole feature map, and that runs at 7-15 GFLOP/s where its matmuls run at 80-90 on the 2-core
development box (UperNet at 448 px: the fpn_bottleneck kernel gradient alone took 4.0 s of a
10.6 s step; benchmarks/README.md, change log). Other backends, and every other convolution
(strided patch embedding, grouped, dilated), use XLA's own gradient.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mtp_jax.ops import target

_NHWC = ("NHWC", "HWIO", "NHWC")


def _pads(x_shape, k_shape, padding):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(x_shape[1:3], k_shape[:2], (1, 1), padding))
  return tuple(tuple(int(p) for p in pair) for pair in padding)


def _xla_conv(x, kernel, pads, precision):
  return lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_tap_grad(x, kernel, pads, precision):
  return _xla_conv(x, kernel, pads, precision)


def _forward(x, kernel, pads, precision):
  return _xla_conv(x, kernel, pads, precision), (x, kernel)


def _backward(pads, precision, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda v: _xla_conv(v, kernel, pads, precision), x)
  (dx,) = input_vjp(g)
  kh, kw = kernel.shape[:2]
  ho, wo = g.shape[1:3]
  padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  # g^T (C_out, B*H*W) once, each tap's window (B*H*W, C_in) as it lies: (C_out, C_in) per tap.
  taps = [[jnp.einsum("bhwo,bhwc->oc", g, padded[:, i:i + ho, j:j + wo], precision=precision,
                      preferred_element_type=jnp.float32) for j in range(kw)] for i in range(kh)]
  return dx, jnp.stack([jnp.stack(row) for row in taps]).transpose(0, 1, 3, 2).astype(kernel.dtype)


_conv_tap_grad.defvjp(_forward, _backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, out_sharding=None):
  """`jax.lax.conv_general_dilated`, with the kernel gradient as matmuls where the module
  docstring says (the values and both gradients are the same sums)."""
  undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  plain = (target.platform() == "cpu" and lhs.ndim == 4 and rhs.ndim == 4
           and tuple(window_strides) == (1, 1) and undilated and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
           and out_sharding is None and lhs.dtype == rhs.dtype
           and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if plain:
    return _conv_tap_grad(lhs, rhs, _pads(lhs.shape, rhs.shape, padding), precision)
  kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, batch_group_count,
                                  precision=precision, preferred_element_type=preferred_element_type,
                                  **kwargs)
