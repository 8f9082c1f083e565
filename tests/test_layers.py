"""Model building blocks against straightforward numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax.models import build_encoder, layers
from mtp_jax.models.heads.upernet import adaptive_avg_pool, segmentation_loss
from mtp_jax.models.subset_batch_norm import SubsetBatchNorm
from mtp_jax.parallel import sharding


def test_conv_transpose_2x2_matches_the_definition():
  m = layers.ConvTranspose2x2(3, 5, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(2, 4, 3, 3)).astype(np.float32)
  k, b = np.asarray(m.kernel[...]), np.asarray(m.bias[...])
  want = np.zeros((2, 8, 6, 5), np.float32)
  for i in range(4):
    for j in range(3):
      for a in range(2):
        for c in range(2):
          want[:, 2 * i + a, 2 * j + c] = x[:, i, j] @ k[a, c] + b
  np.testing.assert_allclose(np.asarray(m(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_adaptive_avg_pool_uses_pytorch_bins():
  x = np.random.default_rng(1).normal(size=(1, 7, 5, 2)).astype(np.float32)
  got = np.asarray(adaptive_avg_pool(jnp.asarray(x), 3))
  for i in range(3):
    for j in range(3):
      h0, h1 = (i * 7) // 3, -(-(i + 1) * 7 // 3)
      w0, w1 = (j * 5) // 3, -(-(j + 1) * 5 // 3)
      np.testing.assert_allclose(got[0, i, j], x[0, h0:h1, w0:w1].mean((0, 1)), rtol=1e-5)


def test_subset_batch_norm_normalises_each_group_alone_and_updates_running_stats_in_order():
  rng = np.random.default_rng(2)
  b, groups = 3, 3
  # Groups with very different statistics, rows interleaved (b, G) -> b*G.
  per_group = [rng.normal(loc=10 * g, scale=1 + g, size=(b, 2, 2, 4)) for g in range(groups)]
  x = np.stack(per_group, axis=1).reshape(b * groups, 2, 2, 4).astype(np.float32)
  bn = SubsetBatchNorm(4)
  y = np.asarray(bn(jnp.asarray(x), groups=groups, train=True)).reshape(b, groups, 2, 2, 4)
  running_mean, running_var = np.zeros(4), np.ones(4)
  for g in range(groups):
    data = per_group[g].reshape(-1, 4)
    want = (per_group[g] - data.mean(0)) / np.sqrt(data.var(0) + 1e-5)
    np.testing.assert_allclose(y[:, g], want, rtol=1e-4, atol=1e-4)
    running_mean = 0.9 * running_mean + 0.1 * data.mean(0)
    running_var = 0.9 * running_var + 0.1 * data.var(0, ddof=1)
  np.testing.assert_allclose(np.asarray(bn.mean[...]), running_mean, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(bn.var[...]), running_var, rtol=1e-5)


def test_segmentation_loss_ignores_255_and_averages_valid_pixels():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(1, 2, 2, 3)), jnp.float32)
  labels = jnp.asarray([[[0, 2], [255, 1]]])
  loss, count = segmentation_loss(logits, labels)
  logp = jax.nn.log_softmax(logits, -1)[0]
  want = -(logp[0, 0, 0] + logp[0, 1, 2] + logp[1, 1, 1]) / 3
  assert int(count) == 3
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


def test_encoder_outputs_four_scales_and_official_names():
  enc = build_encoder("vit_t", 64, depth=4, embed_dim=32, num_heads=2, out_indices=(0, 1, 2, 3),
                      rngs=nnx.Rngs(0))
  outs = enc(jnp.zeros((2, 64, 64, 3)))
  assert [o.shape for o in outs] == [(2, 16, 16, 32), (2, 8, 8, 32), (2, 4, 4, 32), (2, 2, 2, 32)]
  assert [o.shape for o in enc(jnp.zeros((2, 64, 64, 3)), multi_scale=False)] == [(2, 4, 4, 32)] * 4
  names = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(enc, nnx.Param))}
  for n in ("patch_embed/proj/kernel", "pos_embed", "blocks/3/attn/qkv/kernel", "blocks/0/mlp/fc2/bias",
            "norm/scale", "fpn1/0/kernel", "fpn1/1/ln/scale", "fpn1/3/bias", "fpn2/0/kernel"):
    assert n in names, n
  # fix_init_weight: deeper blocks start with smaller output projections.
  s0 = float(jnp.std(enc.blocks[0].attn.proj.kernel[...]))
  s3 = float(jnp.std(enc.blocks[3].attn.proj.kernel[...]))
  np.testing.assert_allclose(s0 / s3, np.sqrt(8 / 2), rtol=0.25)


def test_logical_axes_map_to_the_mesh():
  mesh = sharding.make_mesh((-1, 2, 1))
  assert mesh.shape == {"data": 4, "fsdp": 2, "tensor": 1}
  rules = (("embed", "fsdp"), ("mlp", None))
  spec = sharding.logical_to_mesh(jax.sharding.PartitionSpec("embed", "mlp"), rules, mesh)
  assert spec == jax.sharding.PartitionSpec("fsdp", None)
  enc = nnx.eval_shape(lambda: build_encoder("vit_t", 32, depth=1, embed_dim=16, num_heads=2,
                                             out_indices=(0, 0, 0, 0), rngs=nnx.Rngs(0)))
  shardings = sharding.tree_shardings(nnx.state(enc, nnx.Param), mesh, rules)
  assert shardings["blocks"][0]["mlp"]["fc1"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
  assert shardings["pos_embed"].spec == jax.sharding.PartitionSpec(None, None, "fsdp")


def test_remat_changes_memory_not_results():
  kw = dict(depth=2, embed_dim=32, num_heads=2, out_indices=(0, 1, 1, 1), drop_path_rate=0.2)
  plain = build_encoder("vit_t", 32, rngs=nnx.Rngs(0), **kw)
  remat = build_encoder("vit_t", 32, rngs=nnx.Rngs(0), remat=True, **kw)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 32, 32, 3)), jnp.float32)

  def loss_of(model):
    def loss(params):
      m = nnx.merge(nnx.graphdef(model), params)
      return sum(jnp.sum(f ** 2) for f in m(x, train=True, key=jax.random.key(1)))
    return loss

  # The option really checkpoints: the remat primitive appears only in the remat model's program.
  jaxprs = [str(jax.make_jaxpr(loss_of(m))(nnx.state(m))) for m in (plain, remat)]
  assert "remat" not in jaxprs[0] and "remat" in jaxprs[1]
  (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(loss_of(m)))(nnx.state(m)) for m in (plain, remat))
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _encoder_loss_and_grads(jit: bool, **overrides):
  kw = dict(patch_size=8, depth=6, out_indices=(1, 2, 4, 5), embed_dim=48, num_heads=2, drop_path_rate=0.3)
  enc = build_encoder("vit_t_rvsa", 64, rngs=nnx.Rngs(0), **{**kw, **overrides})
  graphdef, params = nnx.split(enc, nnx.Param)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)

  def loss(params, x):
    maps = nnx.merge(graphdef, params)(x, train=True, key=jax.random.key(3))
    return sum(jnp.sum(m ** 2) for m in maps)
  # jit=False: the reference, JAX's gradient of the jitted loss (forward and backward are then
  # two programs with the residuals passed between them, as op-by-op would; same sums).
  fn = jax.jit(jax.value_and_grad(loss)) if jit else jax.value_and_grad(jax.jit(loss))
  return fn(params, x)


def _assert_trees_close(got, want, rtol):
  def check(path, a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= rtol * (np.abs(b).max() + 1e-12), jax.tree_util.keystr(path)
  jax.tree_util.tree_map_with_path(check, got, want)


def test_encoder_gradients_with_drop_path_under_jit_equal_the_reference():
  # Regression: fpn4's max-pool as a reshape + max gave the last block's attn.proj / mlp.fc2
  # kernels gradients off by ~25% (XLA -O2) or NaN gradients everywhere (-O0, as the tests run)
  # under jit with stochastic depth on (jax 0.10.2, CPU); op-by-op and the reference were right.
  reference, jitted = _encoder_loss_and_grads(False), _encoder_loss_and_grads(True)
  np.testing.assert_allclose(float(jitted[0]), float(reference[0]), rtol=1e-5)
  _assert_trees_close(jitted[1], reference[1], rtol=1e-4)


def test_scanned_blocks_equal_the_python_loop():
  # One lax.scan over groups of (RVSA, RVSA, global) blocks: same loss, same gradients for every
  # block's own parameters (the tree is unchanged), stochastic depth on, with and without remat.
  loop = _encoder_loss_and_grads(True)
  for remat in (False, True):
    scanned = _encoder_loss_and_grads(True, scan_blocks=True, remat=remat)
    assert jax.tree.structure(scanned[1]) == jax.tree.structure(loop[1])
    np.testing.assert_allclose(float(scanned[0]), float(loop[0]), rtol=1e-5)
    _assert_trees_close(scanned[1], loop[1], rtol=1e-4)
  with pytest.raises(ValueError, match="multiple of the block pattern's period 3"):
    build_encoder("vit_t_rvsa", 64, rngs=nnx.Rngs(0), patch_size=8, depth=4, out_indices=(0, 1, 2, 3),
                  scan_blocks=True)


@pytest.mark.parametrize("kernel_size, padding", [(1, "SAME"), (3, "SAME"), (3, ((0, 2), (1, 1))), (2, "VALID")])
def test_conv_kernel_gradient_as_tap_matmuls_equals_xla(kernel_size, padding):
  from jax import lax
  from mtp_jax.ops.conv import conv_general_dilated
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 7, 5, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 3, 4)), jnp.float32)
  dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
  def loss(conv):
    return lambda x, k: jnp.sum(jnp.sin(conv(x, k, (1, 1), padding, dimension_numbers=dn)))
  want = jax.jit(jax.value_and_grad(loss(lax.conv_general_dilated), argnums=(0, 1)))(x, k)
  got = jax.jit(jax.value_and_grad(loss(conv_general_dilated), argnums=(0, 1)))(x, k)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  assert "custom_vjp_call" in str(jax.make_jaxpr(loss(conv_general_dilated))(x, k))  # the tap path ran
  module = layers.conv(3, 4, 3, rngs=nnx.Rngs(0))   # what every head's conv calls
  assert module.conv_general_dilated is conv_general_dilated


def add_decomposed_rel_pos(attn, q, size: int, rel_pos_h, rel_pos_w):
  """The direct formula (MViTv2 calc_rel_pos_spatial): attn (..., size*size, size*size) + the
  decomposed term of q (..., size*size, d)."""
  idx = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
  rh, rw = rel_pos_h[idx], rel_pos_w[idx]                     # (size, size, d)
  r_q = q.reshape(*q.shape[:-2], size, size, q.shape[-1])
  rel_h = jnp.einsum("...hwc,hkc->...hwk", r_q, rh.astype(q.dtype))
  rel_w = jnp.einsum("...hwc,wkc->...hwk", r_q, rw.astype(q.dtype))
  lead = attn.shape[:-2]
  attn = attn.reshape(*lead, size, size, size, size)
  attn = attn + rel_h[..., :, :, :, None] + rel_w[..., :, :, None, :]
  return attn.reshape(*lead, size * size, size * size)


@pytest.mark.parametrize("size, token_axis", [(7, -2), (14, 1)])
def test_rel_pos_as_its_own_matmul_equals_the_decomposed_term(size, token_axis):
  """q . k + the query's coefficients times the keys' one-hot positions (rel_pos_logits, as RVSA
  windows add it; the global blocks pass the same factors to dot_product_attention) = q . k + the
  decomposed relative-position term of MViTv2, with gradients to q, k and both tables."""
  from mtp_jax.models.rel_pos import key_positions, rel_pos_coefficients, rel_pos_logits
  from mtp_jax.ops.attention import dot_product_attention
  rng = np.random.default_rng(size)
  n, d = size * size, 16
  q = jnp.asarray(rng.normal(size=(2, n, 3, d)), jnp.float32)   # (B, N, heads, d)
  k = jnp.asarray(rng.normal(size=(2, n, 3, d)), jnp.float32)
  rh = jnp.asarray(rng.normal(size=(2 * size - 1, d)), jnp.float32)
  rw = jnp.asarray(rng.normal(size=(2 * size - 1, d)), jnp.float32)

  def direct(q, k, rh, rw):   # (B, heads, N, N)
    qt, kt = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
    return add_decomposed_rel_pos(jnp.einsum("bhqc,bhkc->bhqk", qt, kt), qt, size, rh, rw)

  def augmented(q, k, rh, rw):
    qt, kt = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
    return jnp.einsum("bhqc,bhkc->bhqk", qt, kt) + rel_pos_logits(rel_pos_coefficients(qt, size, rh, rw), size)

  if token_axis == 1:   # through the global blocks' attention: its output against the direct term's
    v = jnp.asarray(rng.normal(size=(2, n, 3, d)), jnp.float32)
    factors = (rel_pos_coefficients(q.transpose(0, 2, 1, 3), size, rh, rw), key_positions(size))
    want = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(direct(q, k, rh, rw), axis=-1), v)
    for block in (0, 20):
      np.testing.assert_allclose(dot_product_attention(q, k, v, block, factors), want, rtol=1e-5, atol=1e-5)
  want, got = direct(q, k, rh, rw), augmented(q, k, rh, rw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  weights = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  loss = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2, 3))(q, k, rh, rw)
  for g, w in zip(loss(augmented), loss(direct)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)
