"""Softmax attention over all keys, optionally in blocks of queries to bound its memory.

`dot_product_attention(q, k, v, query_block)`: q (B, N, H, C) already scaled, k (B, M, H, C),
v (B, M, H, Cv) -> (B, N, H, Cv), the softmax in float32 (cast back to v's dtype before the
weighted sum). One einsum pair holds the (B, H, N, M) weights, and its backward keeps them: at
1024 px and patch 16 (4,096 tokens) that is 384 MiB per head group of 6 and copy, several copies
per global block. With `query_block` the queries go through `lax.map` in blocks of that many, each
under `jax.checkpoint`: the forward holds one block's weights at a time and the backward
recomputes them block by block (one more q . k matmul) instead of keeping them. Each query's
softmax is its own, so the values equal the one-block form; gradients of k and v are sums over
the blocks, equal up to float summation order.
"""

import jax
import jax.numpy as jnp


def _attend(q, k, v):
  logits = jnp.einsum("bqhc,bkhc->bhqk", q, k)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhc->bqhc", weights, v)


def dot_product_attention(q, k, v, query_block: int = 0):
  """See the module docstring. `query_block` <= 0 or >= N: one block (no loop)."""
  b, n, h, c = q.shape
  if query_block <= 0 or query_block >= n:
    return _attend(q, k, v)
  num = -(-n // query_block)
  q = jnp.pad(q, ((0, 0), (0, num * query_block - n), (0, 0), (0, 0)))   # padded queries: dropped
  blocks = q.reshape(b, num, query_block, h, c).swapaxes(0, 1)           # (num, B, block, H, C)
  out = jax.lax.map(jax.checkpoint(lambda block: _attend(block, k, v)), blocks)
  return out.swapaxes(0, 1).reshape(b, num * query_block, h, v.shape[-1])[:, :n]
