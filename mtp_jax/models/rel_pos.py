"""Relative position terms of the MTP ViT (MTP_SPEC §1.2).

- Decomposed relative positions (MViTv2 `calc_rel_pos_spatial`, q and k grids of equal size K):
  attn[..., (qy, qx), (ky, kx)] += sum_c q[..., qy, qx, c] * Rh[qy - ky + K - 1, c]
                                 + sum_c q[..., qy, qx, c] * Rw[qx - kx + K - 1, c].
  The term is rel_h[q, ky] + rel_w[q, kx]: a dot product of the query's 2K coefficients
  (`rel_pos_coefficients`) with the key's one-hot position, so the models add it as one small
  matmul (`rel_pos_logits`) to q . k, with no (K, K, K, K) array (on TPU the reshape to that grid
  and back padded K to 128 lanes and moved 15 of the ViT-B+RVSA encoder's 61 GB per step,
  docs/benchmarks.md). Its own matmul rather than features appended to q and k: the TPU
  compiler moves fewer bytes without the (tokens, heads, hd + 2K) copies of q and k.
  tests/test_layers.py checks it against the direct formula.
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


def rel_pos_logits(coefficients, size: int):
  """(..., Q, size*size) decomposed term of the attention logits from `rel_pos_coefficients`
  (..., Q, 2*size): their product with the keys' one-hot positions, in their dtype."""
  positions = jnp.asarray(key_positions(size), coefficients.dtype)
  return jnp.einsum("...qj,kj->...qk", coefficients, positions)


def window_bias_index(ws: int) -> np.ndarray:
  """(ws*ws, ws*ws) int64 index into the ((2 ws - 1)^2, heads) bias table."""
  ys, xs = np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  dy = ys[:, None] - ys[None, :] + ws - 1
  dx = xs[:, None] - xs[None, :] + ws - 1
  return (dy * (2 * ws - 1) + dx).astype(np.int64)
