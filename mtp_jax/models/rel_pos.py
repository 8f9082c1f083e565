"""Relative position terms of the MTP ViT (MTP_SPEC §1.2).

- Decomposed relative positions (MViTv2 `calc_rel_pos_spatial`, q and k grids of equal size K):
  attn[..., (qy, qx), (ky, kx)] += sum_c q[..., qy, qx, c] * Rh[qy - ky + K - 1, c]
                                 + sum_c q[..., qy, qx, c] * Rw[qx - kx + K - 1, c].
  The models compute it inside the attention matmul (`augment_query_key`): the term is
  rel_h[q, ky] + rel_w[q, kx], a dot product of the query's 2K coefficients with the key's
  one-hot position, so appending both to q and k adds it to q . k with no (K, K, K, K) array (on
  TPU the reshape to that grid and back padded K to 128 lanes and moved 15 of the ViT-B+RVSA
  encoder's 61 GB per step, docs/benchmarks.md). With a head size of 64 the extra 2K <= 64
  features fill lanes the MXU pads anyway. tests/test_layers.py checks it against the direct formula.
- The Swin-style bias index of RVSA windows: index[i, j] = (yi - yj + ws - 1) * (2 ws - 1) +
  (xi - xj + ws - 1), i and j row-major over the ws x ws window.
"""

import jax.numpy as jnp
import numpy as np


def rel_pos_coefficients(q, size: int, rel_pos_h, rel_pos_w):
  """(..., size*size, 2*size): per query, sum_c q * Rh[qy - ky + K - 1] for each ky, then
  sum_c q * Rw[qx - kx + K - 1] for each kx; q (..., size*size, d), in q's dtype."""
  idx = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
  rh, rw = rel_pos_h[idx].astype(q.dtype), rel_pos_w[idx].astype(q.dtype)   # (size, size, d)
  r_q = q.reshape(*q.shape[:-2], size, size, q.shape[-1])
  rel_h = jnp.einsum("...hwc,hkc->...hwk", r_q, rh)
  rel_w = jnp.einsum("...hwc,wkc->...hwk", r_q, rw)
  return jnp.concatenate([rel_h, rel_w], axis=-1).reshape(*q.shape[:-2], size * size, 2 * size)


def key_positions(size: int) -> np.ndarray:
  """(size*size, 2*size) float32: key (ky, kx) row-major has a 1 at column ky and at size + kx."""
  ky, kx = np.divmod(np.arange(size * size), size)
  out = np.zeros((size * size, 2 * size), np.float32)
  out[np.arange(size * size), ky] = 1.0
  out[np.arange(size * size), size + kx] = 1.0
  return out


def augment_query_key(q, k, coefficients, size: int, axis: int = -2):
  """(q', k') with q' . k' = q . k + the decomposed term: q's rel_pos_coefficients appended to
  its features, the keys' one-hot positions to theirs. q, k (..., d) with the size*size tokens
  on `axis` of k; coefficients as q's leading shape + (2*size,)."""
  positions = jnp.asarray(key_positions(size), k.dtype)
  shape = [1] * k.ndim
  shape[axis] = size * size
  shape[-1] = 2 * size
  positions = jnp.broadcast_to(positions.reshape(shape), (*k.shape[:-1], 2 * size))
  return (jnp.concatenate([q, coefficients.astype(q.dtype)], axis=-1),
          jnp.concatenate([k, positions], axis=-1))


def window_bias_index(ws: int) -> np.ndarray:
  """(ws*ws, ws*ws) int64 index into the ((2 ws - 1)^2, heads) bias table."""
  ys, xs = np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  dy = ys[:, None] - ys[None, :] + ws - 1
  dx = xs[:, None] - xs[None, :] + ws - 1
  return (dy * (2 * ws - 1) + dx).astype(np.int64)
