"""Softmax attention over all keys, optionally in blocks of queries to bound its memory.

`dot_product_attention(q, k, v, query_block)`: q (B, N, H, C) already scaled, k (B, M, H, C),
v (B, M, H, Cv) -> (B, N, H, Cv), the softmax in float32 (cast back to v's dtype before the
weighted sum). One einsum pair holds the (B, H, N, M) weights, and its backward keeps them: at
1024 px and patch 16 (4,096 tokens) that is 384 MiB per head group of 6 and copy, several copies
per global block. With `query_block` the queries go through `lax.map` in blocks of that many, each
under `jax.checkpoint`: the forward holds one block's weights at a time and the backward
recomputes them block by block (one more q . k matmul) instead of keeping them. Each query's
softmax is its own, so the values equal the one-block form; gradients of k and v are sums over
the blocks, equal up to float summation order. `query_block=None` follows the platform traced
for: blocks of 1,024 queries on the CPU, where the weights are host memory, and one block on
accelerators, where the loop and its recomputed q . k only add bytes (the DOTA-v1.0 finetune step
on the TPU compiler, docs/benchmarks.md).
"""

import jax
import jax.numpy as jnp

from mtp_jax.ops import target

CPU_QUERY_BLOCK = 1024


def _attend(q, k, v, query_factors=None, key_factors=None):
  logits = jnp.einsum("bqhc,bkhc->bhqk", q, k)
  if query_factors is not None:
    logits = logits + jnp.einsum("bhqe,ke->bhqk", query_factors, key_factors.astype(query_factors.dtype))
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhc->bqhc", weights, v)


def dot_product_attention(q, k, v, query_block: int | None = 0, logit_factors=None):
  """See the module docstring. `query_block` <= 0 or >= N: one block (no loop); None: the
  platform's (CPU_QUERY_BLOCK on the CPU, one block elsewhere).
  `logit_factors`: None, or (query_factors (B, H, N, E), key_factors (M, E)) whose product is
  added to the logits (the decomposed relative positions, `mtp_jax/models/rel_pos.py`)."""
  b, n, h, c = q.shape
  query_factors, key_factors = logit_factors if logit_factors is not None else (None, None)
  if query_block is None:
    query_block = target.by_platform(cpu=CPU_QUERY_BLOCK, accelerator=0)
  if query_block <= 0 or query_block >= n:
    return _attend(q, k, v, query_factors, key_factors)
  num = -(-n // query_block)

  def split(x, axis):   # (num, ...) blocks of the query axis; the padded queries are dropped
    x = jnp.pad(x, [(0, num * query_block - n) if i == axis else (0, 0) for i in range(x.ndim)])
    return jnp.moveaxis(x.reshape(*x.shape[:axis], num, query_block, *x.shape[axis + 1:]), axis, 0)

  blocks = (split(q, 1), None if query_factors is None else split(query_factors, 2))
  attend = lambda block: _attend(block[0], k, v, block[1], key_factors)
  out = jax.lax.map(jax.checkpoint(attend), blocks)
  return out.swapaxes(0, 1).reshape(b, num * query_block, h, v.shape[-1])[:, :n]
