"""Bilinear grid sampling with `torch.nn.functional.grid_sample(align_corners=True,
padding_mode='zeros')` semantics, in two formulations.

x: (N, H, W, C) NHWC values; grid: (N, Ho, Wo, 2) normalised coordinates, last axis (x, y),
-1 and +1 being the centres of the first and last pixel (align_corners=True): pixel = (g + 1) / 2 *
(size - 1). Sampling points outside the map read zeros for the missing neighbours. Returns
(N, Ho, Wo, C).

- `grid_sample_gather`: the four neighbours are gathered and blended (memory ~ output size).
- `grid_sample_matmul`: per axis, hat weights max(0, 1 - |p - i|) over every pixel index i form
  an interpolation matrix; the output is a batched matmul with the (H*W) map. Zero padding is
  implicit (indices outside the map do not exist). Cost ~ Ho*Wo*H*W*C, MXU-friendly on TPU.

`grid_sample` picks one by `method`. Measured on a 2-core CPU at ViT-B+RVSA shapes
(benchmarks/grid_sample.py, docs/benchmarks.md): gather is 3-100x faster (448 px fwd+bwd 51 ms
vs 238 ms), so it is the default; matmul is quadratic in the token count but pure MXU work, to be
measured on TPU before preferring it there.
"""

import jax.numpy as jnp


def _pixel_coords(grid, height, width):
  gx, gy = grid[..., 0], grid[..., 1]
  return (gx + 1) * 0.5 * (width - 1), (gy + 1) * 0.5 * (height - 1)


def grid_sample_gather(x, grid):
  n, h, w, c = x.shape
  px, py = _pixel_coords(grid.astype(jnp.float32), h, w)
  x0, y0 = jnp.floor(px), jnp.floor(py)
  flat = x.reshape(n, h * w, c)
  out = 0.0
  for dy in (0, 1):
    for dx in (0, 1):
      xi, yi = x0 + dx, y0 + dy
      weight = (1 - jnp.abs(px - xi)) * (1 - jnp.abs(py - yi))
      inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
      vals = jnp.take_along_axis(flat, idx.reshape(n, -1, 1), axis=1).reshape(*idx.shape, c)
      out = out + vals * jnp.where(inside, weight, 0.0)[..., None].astype(x.dtype)
  return out.astype(x.dtype)


def grid_sample_matmul(x, grid):
  n, h, w, c = x.shape
  ho, wo = grid.shape[1:3]
  px, py = _pixel_coords(grid.astype(jnp.float32), h, w)
  wx = jnp.maximum(0.0, 1 - jnp.abs(px.reshape(n, -1, 1) - jnp.arange(w)))  # (N, P, W)
  wy = jnp.maximum(0.0, 1 - jnp.abs(py.reshape(n, -1, 1) - jnp.arange(h)))  # (N, P, H)
  m = (wy[:, :, :, None] * wx[:, :, None, :]).reshape(n, ho * wo, h * w).astype(x.dtype)
  return jnp.einsum("npq,nqc->npc", m, x.reshape(n, h * w, c)).reshape(n, ho, wo, c)


def grid_sample(x, grid, method: str = "gather"):
  """See the module docstring; method is 'gather' or 'matmul'."""
  if method == "gather":
    return grid_sample_gather(x, grid)
  if method == "matmul":
    return grid_sample_matmul(x, grid)
  raise ValueError(f"unknown grid_sample method {method!r}; use 'gather' or 'matmul'")
