"""Global attention in blocks of queries (mtp_jax/ops/attention.py): the same values and
gradients as all queries at once, with far less compiled memory for the backward."""

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.ops.attention import dot_product_attention


def _qkv(n=300, m=300, heads=2, channels=8):
  keys = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(k, (2, s, heads, channels)) for k, s in zip(keys, (n, m, m)))


def _loss(q, k, v, block):
  return (dot_product_attention(q, k, v, block) ** 2).sum()


def test_blocks_of_queries_give_the_one_block_values_and_gradients():
  q, k, v = _qkv()
  whole = dot_product_attention(q, k, v, 0)
  reference = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(jnp.einsum("bqhc,bkhc->bhqk", q, k), -1), v)
  np.testing.assert_allclose(whole, reference, rtol=1e-5, atol=1e-6)
  grad = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)), static_argnums=3)
  want = grad(q, k, v, 0)
  for block in (64, 100, 299):          # ragged last block, exact division, one short of N
    np.testing.assert_allclose(jax.jit(dot_product_attention, static_argnums=3)(q, k, v, block),
                               whole, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grad(q, k, v, block), want):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_the_backward_does_not_keep_every_querys_weights():
  q, k, v = _qkv(n=2048, m=2048, heads=2, channels=8)
  grad = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)), static_argnums=3)
  temp = {b: grad.lower(q, k, v, b).compile().memory_analysis().temp_size_in_bytes for b in (0, 256)}
  weights = 2 * 2 * 2048 * 2048 * 4      # one float32 (B, H, N, M) array: 64 MiB
  assert temp[0] >= weights and temp[256] < weights / 2, temp


def test_unset_query_block_follows_the_platform():
  """None: blocks of CPU_QUERY_BLOCK on the CPU (host memory), one block on accelerators."""
  from mtp_jax.ops import attention, target
  q, k, v = _qkv(n=attention.CPU_QUERY_BLOCK + 8, m=16, heads=1, channels=4)
  # A new function each time: jit's trace cache does not key on the platform traced for.
  has_loop = lambda: "while" in jax.jit(lambda *a: dot_product_attention(*a, None)).lower(q, k, v).as_text()
  assert has_loop()
  with target.compiling_for("tpu"):
    assert not has_loop()
