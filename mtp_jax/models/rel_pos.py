"""Relative position terms of the MTP ViT (MTP_SPEC §1.2).

- Decomposed relative positions (MViTv2 `calc_rel_pos_spatial`, q and k grids of equal size K):
  attn[..., (qy, qx), (ky, kx)] += sum_c q[..., qy, qx, c] * Rh[qy - ky + K - 1, c]
                                 + sum_c q[..., qy, qx, c] * Rw[qx - kx + K - 1, c].
- The Swin-style bias index of RVSA windows: index[i, j] = (yi - yj + ws - 1) * (2 ws - 1) +
  (xi - xj + ws - 1), i and j row-major over the ws x ws window.
"""

import jax.numpy as jnp
import numpy as np


def add_decomposed_rel_pos(attn, q, size: int, rel_pos_h, rel_pos_w):
  """attn (..., size*size, size*size) + the decomposed term of q (..., size*size, d)."""
  idx = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
  rh, rw = rel_pos_h[idx], rel_pos_w[idx]                     # (size, size, d)
  r_q = q.reshape(*q.shape[:-2], size, size, q.shape[-1])
  rel_h = jnp.einsum("...hwc,hkc->...hwk", r_q, rh.astype(q.dtype))
  rel_w = jnp.einsum("...hwc,wkc->...hwk", r_q, rw.astype(q.dtype))
  lead = attn.shape[:-2]
  attn = attn.reshape(*lead, size, size, size, size)
  attn = attn + rel_h[..., :, :, :, None] + rel_w[..., :, :, None, :]
  return attn.reshape(*lead, size * size, size * size)


def window_bias_index(ws: int) -> np.ndarray:
  """(ws*ws, ws*ws) int64 index into the ((2 ws - 1)^2, heads) bias table."""
  ys, xs = np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  dy = ys[:, None] - ys[None, :] + ws - 1
  dx = xs[:, None] - xs[None, :] + ws - 1
  return (dy * (2 * ws - 1) + dx).astype(np.int64)
