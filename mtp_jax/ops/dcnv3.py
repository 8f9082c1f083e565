"""DCNv3, InternImage's deformable convolution core, with the semantics of the official
`dcnv3_core_pytorch` (ops_dcnv3/functions/dcnv3_func.py), in two formulations.

Shapes, channels last: x (N, H, W, C), C = group * group_channels; offset (N, Ho, Wo, group*P*2)
in pixels, last axis ordered [group][point][x, y]; mask (N, Ho, Wo, group*P), already normalised
by the caller (DCNv3 softmaxes it over P). P = kernel_size**2, Ho = (H + 2*pad - (dilation*(k-1)
+ 1)) // stride + 1 (and Wo likewise). Returns (N, Ho, Wo, C):

    out[n, i, j, g*gc + c] = sum_p mask[n, i, j, g, p] * bilinear(x_g, loc_x, loc_y)[c]

Group g reads channels g*gc:(g+1)*gc with its own offsets and mask. Point p = ix*k + iy
(x-major, as the official torch.meshgrid(xs, ys)), with kernel taps t = -(dilation*(k-1))//2 +
i*dilation. The official code zero-pads x by `pad`, takes the centre reference point and calls
grid_sample(align_corners=False, padding_mode='zeros'); in pixels of the unpadded map (centres at
integers) that is

    loc_x = (dilation*(k-1))//2 - pad + j*stride + (t_ix + offset_x) * offset_scale

(loc_y likewise with i, t_iy, offset_y), and a neighbour outside the unpadded map reads zero
(padded pixels are zeros; as the CUDA kernel, which does not pad). Coordinates are computed in
pixels directly, not normalised by the padded size and multiplied back as the reference does
(same values up to float rounding). One `pad` for both axes: the official F.pad(input, [0, 0,
pad_h, pad_h, pad_w, pad_w]) on NHWC pads W by pad_h and H by pad_w, which only matters when they
differ. Deliberate, as the official code: offset_scale scales the kernel taps too, not only the
learned offsets.

- `dcnv3_gather`: the four neighbours of every sample gathered per group (one gather of
  N*Ho*Wo*G*P*4 rows of group_channels) and blended with bilinear * mask weights.
- `dcnv3_matmul`: per group, hat weights max(0, 1 - |loc - i|) per axis, summed over the P points
  with the mask into an (Ho*Wo, H*W) interpolation matrix, then one batched matmul with the map.
  Cost ~ N*G*Ho*Wo*H*W*(P + gc): quadratic in the token count.

`dcnv3_core` picks one by `method`. 'auto' (the default) follows the platform the program is
compiled for (`mtp_jax.ops.target`): on TPU matmul for maps of up to 56 x 56 positions and gather
above; gather on CPU and GPU. On TPU (the compiler's figures, benchmarks/dcnv3_tpu.py: v5p,
bfloat16, one 448-px image, forward + backward of one call, GB accessed; HBM in brackets):

    stage  map  C     G   gather           matmul
    1      112  192   12  43.5 (2.0 GiB)   42.1 (10.2 GiB)
    2      56   384   24  21.3 (0.9 GiB)   10.5 (2.6 GiB)
    3      28   768   48  10.6 (0.5 GiB)    3.8 (0.9 GiB)
    4      14   1536  96   3.1 (0.4 GiB)    1.3 (0.3 GiB)

matmul moves fewer bytes at every stage but its interpolation matrix grows with the square of the
map (5x the HBM at stage 1, and quadratic at finetuning's 1024 px), hence the 56 x 56 bound: the
encoder's 39 calls then move 368 GB per image (gather alone 593, matmul alone 361). On the
2-core CPU box (idle; medians, ms), InternImage-XL at 224 px, batch 2, forward /
forward+backward (benchmarks/dcnv3.py, docs/benchmarks.md):

    stage  map  C     G   gather      matmul        numpy float64 reference, forward
    1      56   192   12   90 / 184   791 / 2667    284
    2      28   384   24   39 / 105   178 / 445     100
    3      14   768   48   23 / 58     41 / 92       65
    4       7   1536  96    3 / 29      9 / 21      113

Most of the gather's forward is writing the gathered (N, G, Ho*Wo, 4P, gc) tensor (173 MB at
stage 1): a variant accumulating neighbour by neighbour without it ran the stage-1 forward in
23-30 ms (on a shared box), but its hand-written backward (custom_vjp) came out 3x slower, so it
is not here. On the CPU matmul wins only the forward+backward of the 7x7 stage.
"""

import jax.numpy as jnp

from mtp_jax.ops import target


def output_size(size: int, kernel_size: int, stride: int, pad: int, dilation: int) -> int:
  return (size + 2 * pad - (dilation * (kernel_size - 1) + 1)) // stride + 1


def sampling_locations(offset, *, kernel_size, stride, pad, dilation, group, offset_scale):
  """(loc_x, loc_y), each (N, G, Ho*Wo, P): sample positions in pixels of the unpadded map."""
  n, ho, wo, _ = offset.shape
  k = kernel_size
  half = (dilation * (k - 1)) // 2
  taps = (-half + dilation * jnp.arange(k)).astype(jnp.float32)
  grid_x, grid_y = jnp.repeat(taps, k), jnp.tile(taps, k)  # p = ix*k + iy
  off = offset.astype(jnp.float32).reshape(n, ho, wo, group, k * k, 2)
  ref_x = (half - pad + stride * jnp.arange(wo)).astype(jnp.float32)[None, None, :, None, None]
  ref_y = (half - pad + stride * jnp.arange(ho)).astype(jnp.float32)[None, :, None, None, None]
  loc_x = ref_x + (grid_x + off[..., 0]) * offset_scale
  loc_y = ref_y + (grid_y + off[..., 1]) * offset_scale

  def by_group(loc):  # (N, Ho, Wo, G, P) -> (N, G, Ho*Wo, P)
    return loc.transpose(0, 3, 1, 2, 4).reshape(n, group, ho * wo, k * k)

  return by_group(loc_x), by_group(loc_y)


def _by_group(x, group):
  """(N, H, W, G*gc) -> (N, G, H*W, gc)."""
  n, h, w, c = x.shape
  return x.reshape(n, h * w, group, c // group).transpose(0, 2, 1, 3)


def _to_channels_last(out, ho, wo):
  """(N, G, Ho*Wo, gc) -> (N, Ho, Wo, G*gc)."""
  n, g, _, gc = out.shape
  return out.transpose(0, 2, 1, 3).reshape(n, ho, wo, g * gc)


def _mask_by_group(mask, group):
  n, ho, wo, _ = mask.shape
  return mask.astype(jnp.float32).reshape(n, ho * wo, group, -1).transpose(0, 2, 1, 3)


def dcnv3_gather(x, loc_x, loc_y, mask):
  """x (N, H, W, C); loc_x, loc_y, mask (N, G, Q, P) -> (N, G, Q, gc)."""
  n, h, w, _ = x.shape
  group, q, p = loc_x.shape[1:]
  flat = _by_group(x, group)
  x0, y0 = jnp.floor(loc_x), jnp.floor(loc_y)
  lx, ly = loc_x - x0, loc_y - y0
  idx, weights = [], []
  for dy, wy in ((0, 1 - ly), (1, ly)):
    for dx, wx in ((0, 1 - lx), (1, lx)):
      xi, yi = x0 + dx, y0 + dy
      inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      idx.append((jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32))
      weights.append(jnp.where(inside, wy * wx, 0.0) * mask)
  idx = jnp.stack(idx, -1).reshape(n, group, q * p * 4, 1)
  vals = jnp.take_along_axis(flat, idx, axis=2).reshape(n, group, q, p * 4, -1)
  weights = jnp.stack(weights, -1).reshape(n, group, q, p * 4).astype(x.dtype)
  return jnp.einsum("ngqkc,ngqk->ngqc", vals, weights)


def dcnv3_matmul(x, loc_x, loc_y, mask):
  """x (N, H, W, C); loc_x, loc_y, mask (N, G, Q, P) -> (N, G, Q, gc)."""
  n, h, w, _ = x.shape
  group, q = loc_x.shape[1:3]
  hat_x = jnp.maximum(0.0, 1 - jnp.abs(loc_x[..., None] - jnp.arange(w)))  # (N, G, Q, P, W)
  hat_y = jnp.maximum(0.0, 1 - jnp.abs(loc_y[..., None] - jnp.arange(h)))  # (N, G, Q, P, H)
  m = jnp.einsum("ngqph,ngqpw->ngqhw", hat_y * mask[..., None], hat_x)
  m = m.reshape(n, group, q, h * w).astype(x.dtype)
  return jnp.einsum("ngqs,ngsc->ngqc", m, _by_group(x, group))


_METHODS = {"gather": dcnv3_gather, "matmul": dcnv3_matmul}
# 'auto' on TPU: matmul for maps of at most this many positions (56 x 56), gather above (module
# docstring: the TPU compiler's figures).
TPU_MATMUL_MAX_POSITIONS = 56 * 56


def resolve_method(method: str, height: int, width: int) -> str:
  """'gather' or 'matmul' for `method`; 'auto' follows the platform being compiled for: on TPU
  matmul for maps of up to TPU_MATMUL_MAX_POSITIONS positions and gather above, elsewhere gather."""
  if method == "auto":
    if target.platform() == "tpu" and height * width <= TPU_MATMUL_MAX_POSITIONS:
      return "matmul"
    return "gather"
  if method not in _METHODS:
    raise ValueError(f"unknown dcnv3 method {method!r}; use one of {sorted(_METHODS) + ['auto']}")
  return method


def dcnv3_core(x, offset, mask, *, kernel_size=3, stride=1, pad=1, dilation=1, group,
               offset_scale, method="auto"):
  """See the module docstring; method is 'auto', 'gather' or 'matmul'."""
  method = resolve_method(method, *x.shape[1:3])
  n, h, w, c = x.shape
  ho, wo = (output_size(s, kernel_size, stride, pad, dilation) for s in (h, w))
  p = kernel_size * kernel_size
  if c % group or offset.shape != (n, ho, wo, group * p * 2) or mask.shape != (n, ho, wo, group * p):
    raise ValueError(f"dcnv3_core: x {x.shape}, offset {offset.shape}, mask {mask.shape} do not "
                     f"fit group={group}, kernel_size={kernel_size} (expected Ho, Wo = {ho}, {wo})")
  loc_x, loc_y = sampling_locations(offset, kernel_size=kernel_size, stride=stride, pad=pad,
                                    dilation=dilation, group=group, offset_scale=offset_scale)
  out = _METHODS[method](x, loc_x, loc_y, _mask_by_group(mask, group))
  return _to_channels_last(out, ho, wo).astype(x.dtype)
