"""ViT and ViT+RVSA encoders with the MTP multi-scale outputs (fpn1-fpn4, MTP_SPEC §1).

With `rvsa=True` every block but each `interval`-th is a Rotated Varied-Size window Attention
block (mtp_jax/models/rvsa.py) and the global blocks carry decomposed relative positions;
`global_rel_pos=False` leaves them out (plain global attention, no `full_attn_rel_pos_{h,w}`), as
the original's detection backbones (`vit_rvsa_mtp_branches.py` of its mmdet and mmrotate
finetuning) do.
The module and parameter names are those of the official `ViT_Win_RVSA_V3_WSZ7` (`patch_embed.proj`,
`pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `fpn1.{0,1.ln,3}`,
`fpn2.0`) so checkpoints convert by a path join plus transposes.

Input: NHWC float images of exactly img_size x img_size (pos_embed fixes the grid) with
`in_chans` bands (3: RGB, as every official checkpoint; multispectral finetunes use more).
Output: four NHWC maps of `embed_dim` channels at strides 4, 8, 16, 32 (fpn1..fpn4 on the outputs of
blocks `out_indices`), or with `multi_scale=False` the four raw stride-16 maps.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax.models import layers
from mtp_jax.models.rel_pos import key_positions, rel_pos_coefficients
from mtp_jax.models.rvsa import RotatedVariedSizeWindowAttention
from mtp_jax.ops.attention import dot_product_attention


class Attention(nnx.Module):
  """Global multi-head self-attention: qkv Linear(D, 3D) in timm order [q|k|v][head][hd], proj.

  With `rel_pos_grid` = Hp (the RVSA models' global blocks), decomposed relative positions over
  the Hp x Hp grid are added, computed with the SCALED q (MTP_SPEC §1.3; deliberate, unlike RVSA
  blocks). The grid is fixed by img_size, as in the original. `query_block`: queries per block
  of `mtp_jax/ops/attention.py` (0: all at once, None: the platform's); it bounds memory, never
  changes the values.
  """

  def __init__(self, dim, num_heads, *, rngs, dtype=None, rel_pos_grid: int = 0,
               query_block: int | None = 0):
    self.num_heads = num_heads
    self.query_block = query_block
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = layers.linear(dim, 3 * dim, in_axis="embed", out_axis="qkv", dtype=dtype, rngs=rngs)
    self.proj = layers.linear(dim, dim, in_axis="qkv", out_axis="embed", dtype=dtype, rngs=rngs)
    self.rel_pos_grid = rel_pos_grid
    if rel_pos_grid:
      shape = (2 * rel_pos_grid - 1, dim // num_heads)
      self.full_attn_rel_pos_h = nnx.Param(jnp.zeros(shape), **layers.axes(None, None))
      self.full_attn_rel_pos_w = nnx.Param(jnp.zeros(shape), **layers.axes(None, None))

  def __call__(self, x, grid_hw: int = 0):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, nH, hd)
    q = q * self.scale
    rel_pos = None
    if self.rel_pos_grid:   # the decomposed term, added to q . k (mtp_jax/models/rel_pos.py)
      coefficients = rel_pos_coefficients(q.transpose(0, 2, 1, 3), self.rel_pos_grid,
                                          self.full_attn_rel_pos_h[...], self.full_attn_rel_pos_w[...])
      rel_pos = (coefficients, key_positions(self.rel_pos_grid))
    out = dot_product_attention(q, k, v, self.query_block, rel_pos).reshape(b, n, d)
    return self.proj(out)


class Mlp(nnx.Module):
  def __init__(self, dim, hidden, *, rngs, dtype=None):
    self.fc1 = layers.linear(dim, hidden, in_axis="embed", out_axis="mlp", dtype=dtype, rngs=rngs)
    self.fc2 = layers.linear(hidden, dim, in_axis="mlp", out_axis="embed", dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """Pre-norm block: x + DP(attn(LN1 x)); x + DP(mlp(LN2 x)); LayerNorm eps 1e-6 (MTP_SPEC §1.1).

  `attn` is global attention, or RVSA when `window_size` is set.
  """

  def __init__(self, dim, num_heads, mlp_ratio, drop_path, *, rngs, dtype=None, grid: int,
               window_size: int = 0, rel_pos_grid: int = 0, grid_sample_method: str = "gather",
               query_block: int | None = 0):
    self.norm1 = layers.layer_norm(dim, dtype=dtype, rngs=rngs)
    if window_size:
      self.attn = RotatedVariedSizeWindowAttention(dim, num_heads, window_size=window_size, dtype=dtype,
                                                   grid_sample_method=grid_sample_method, rngs=rngs)
    else:
      self.attn = Attention(dim, num_heads, dtype=dtype, rel_pos_grid=rel_pos_grid,
                            query_block=query_block, rngs=rngs)
    self.grid = grid
    self.norm2 = layers.layer_norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.drop_path = drop_path

  def __call__(self, x, key, train: bool, drop_path=None):
    """`drop_path` (a float or a traced scalar) replaces the block's own rate (scanned blocks)."""
    rate = self.drop_path if drop_path is None else drop_path
    k1, k2 = jax.random.split(key)
    with jax.named_scope("attn"):
      x = x + layers.drop_path(self.attn(self.norm1(x), self.grid), rate, k1, train)
    with jax.named_scope("mlp"):
      return x + layers.drop_path(self.mlp(self.norm2(x)), rate, k2, train)


class ViTEncoder(nnx.Module):
  """Plain ViT with the MTP fpn neck. See the module docstring for inputs and outputs.

  `attention_query_block`: the global blocks attend in blocks of this many queries when the
  grid has more tokens (1024 px at patch 16: 4,096), so that neither step holds every head's
  (tokens x tokens) weights (`mtp_jax/ops/attention.py`); 0 attends all at once; None (the
  default) follows the platform: 1,024 on the CPU, all at once on accelerators. Same values.
  """

  def __init__(self, *, img_size: int, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
               num_heads: int = 12, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1,
               out_indices=(3, 5, 7, 11), rvsa: bool = False, interval: int = 3,
               window_size: int = 7, grid_sample_method: str = "gather", remat: bool = False,
               scan_blocks: bool = False, in_chans: int = 3, global_rel_pos: bool = True,
               attention_query_block: int | None = None, dtype=None, rngs: nnx.Rngs):
    if img_size % patch_size:
      raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    if rvsa and img_size // patch_size < window_size:
      # The original would divide the offsets by H // ws = 0 here (inf / NaN): refuse instead.
      raise ValueError(f"RVSA needs a token grid of at least {window_size}x{window_size}: "
                       f"img_size {img_size} / patch_size {patch_size} gives {img_size // patch_size}")
    if max(out_indices) >= depth:
      raise ValueError(f"out_indices {tuple(out_indices)} reach past depth {depth}")
    self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
    self.out_channels = (embed_dim,) * 4   # the four maps' widths (every encoder says them)
    self.out_indices = tuple(out_indices)
    self.remat = remat
    # Scanned blocks: one period of the block pattern (RVSA: `interval` blocks, the last global;
    # plain ViT: one block) traced once and run depth / period times by lax.scan (see _scan_blocks).
    self.scan_period = interval if rvsa else 1
    if scan_blocks and depth % self.scan_period:
      raise ValueError(f"scan_blocks needs depth {depth} to be a multiple of the block pattern's "
                       f"period {self.scan_period} (interval)")
    self.scan_blocks = scan_blocks
    self.dtype = dtype
    self.grid = img_size // patch_size
    self.in_chans = in_chans
    self.patch_embed = nnx.Dict(proj=layers.conv(
        in_chans, embed_dim, patch_size, stride=patch_size, padding="VALID", in_axis=None,
        out_axis="embed", dtype=dtype, rngs=rngs))
    self.pos_embed = nnx.Param(layers.trunc_normal_002(rngs.params(), (1, self.grid ** 2, embed_dim)),
                               **layers.axes(None, None, "embed"))
    dpr = np.linspace(0.0, drop_path_rate, depth)
    # RVSA models: block i is global when (i + 1) % interval == 0, RVSA otherwise (MTP_SPEC §1.1).
    is_global = [not rvsa or (i + 1) % interval == 0 for i in range(depth)]
    self.blocks = nnx.List([
        Block(embed_dim, num_heads, mlp_ratio, float(dpr[i]), dtype=dtype, grid=self.grid,
              window_size=0 if is_global[i] else window_size,
              rel_pos_grid=self.grid if (rvsa and is_global[i] and global_rel_pos) else 0,
              grid_sample_method=grid_sample_method, query_block=attention_query_block, rngs=rngs)
        for i in range(depth)])
    # fix_init_weight (MTP_SPEC §1.5): block l (1-based) scales attn.proj and mlp.fc2 by 1/sqrt(2l).
    for i, blk in enumerate(self.blocks):
      blk.attn.proj.kernel[...] = blk.attn.proj.kernel[...] / np.sqrt(2.0 * (i + 1))
      blk.mlp.fc2.kernel[...] = blk.mlp.fc2.kernel[...] / np.sqrt(2.0 * (i + 1))
    # Deliberate: `norm` exists (it is in the official checkpoints) but no forward pass applies it.
    self.norm = layers.layer_norm(embed_dim, dtype=dtype, rngs=rngs)
    self.fpn1 = nnx.List([layers.ConvTranspose2x2(embed_dim, embed_dim, dtype=dtype, rngs=rngs),
                          layers.Norm2d(embed_dim, dtype=dtype, rngs=rngs), layers.Gelu(),
                          layers.ConvTranspose2x2(embed_dim, embed_dim, dtype=dtype, rngs=rngs)])
    self.fpn2 = nnx.List([layers.ConvTranspose2x2(embed_dim, embed_dim, dtype=dtype, rngs=rngs)])

  def __call__(self, images, *, train: bool = False, key=None, multi_scale: bool = True):
    """images: (B, img_size, img_size, 3) float. Returns a list of 4 NHWC maps (see module doc)."""
    b, h, w, _ = images.shape
    if (h, w) != (self.img_size, self.img_size):
      raise ValueError(f"encoder built for {self.img_size}x{self.img_size} images got {h}x{w}")
    if key is None:
      if train:
        raise ValueError("train=True needs a PRNG key for stochastic depth")
      key = jax.random.key(0)
    x = self.patch_embed["proj"](images.astype(self.dtype or images.dtype))
    x = x.reshape(b, self.grid * self.grid, self.embed_dim)
    x = x + self.pos_embed[...].astype(x.dtype)
    keys = jax.random.split(key, len(self.blocks))
    if self.scan_blocks:
      outputs = self._scan_blocks(x, keys, train)
    else:
      outputs = []
      for i, blk in enumerate(self.blocks):
        with jax.named_scope(f"blocks.{i}"):
          x = self._block(blk, x, keys[i], train)
        outputs.append(x)
    # an index may repeat (tiny test models)
    features = [outputs[i].reshape(b, self.grid, self.grid, self.embed_dim) for i in self.out_indices]
    if not multi_scale:
      return features
    with jax.named_scope("fpn"):
      return self._fpn(features)

  def _fpn(self, features):
    f1 = features[0]
    for op in self.fpn1:
      f1 = op(f1)
    f2 = self.fpn2[0](features[1])
    f4 = _max_pool2(features[3])  # fpn4: MaxPool2d(2, 2)
    return [f1, f2, features[2], f4]

  def _block(self, blk, x, key, train, drop_path=None):
    if self.remat:  # activation checkpointing: only the block's input is kept for the backward
      return nnx.remat(lambda m, y, k, r: m(y, k, train, r))(blk, x, key, drop_path)
    return blk(x, key, train, drop_path)

  def _scan_blocks(self, x, keys, train):
    """The blocks as one lax.scan over depth / period groups of `scan_period` consecutive blocks.

    XLA compiles one group instead of `depth` blocks, so compile time stays flat with depth.
    The parameters stay one set per block (`blocks.{i}`: checkpoints, export, layer decay and
    sharding rules see the same tree); the step stacks group g's copies at trace time (a copy
    of the encoder's parameters per step) and the gradients flow back to each block. Block i's
    stochastic depth rate and PRNG key are scanned inputs, so the maths and the random draws are
    those of the Python loop. Returns every block's output (an array of (depth, B, N, D)).
    """
    period, depth = self.scan_period, len(self.blocks)
    groups = depth // period
    graphdefs = [nnx.split(self.blocks[p])[0] for p in range(period)]
    stacked = tuple(
        jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(self.blocks[g * period + p]) for g in range(groups)])
        for p in range(period))
    rates = jnp.asarray([blk.drop_path for blk in self.blocks], jnp.float32).reshape(groups, period)

    def group(x, scanned):
      states, group_keys, group_rates = scanned
      outs = []
      for p in range(period):
        x = self._block(nnx.merge(graphdefs[p], states[p]), x, group_keys[p], train, group_rates[p])
        outs.append(x)
      return x, jnp.stack(outs)

    _, outs = jax.lax.scan(group, x, (stacked, keys.reshape(groups, period), rates))
    return outs.reshape(depth, *x.shape)


def _max_pool2(x):
  """MaxPool2d(2, 2) on NHWC (odd last row / column dropped); the gradient goes to one maximum
  of each window (the first on ties), as PyTorch's.

  Deliberately lax.reduce_window, not a reshape + max: JAX differentiates a max reduction by
  comparing the input with the maximum, and XLA may recompute the input in the backward with
  different rounding, so no element matched. On jax 0.10.2 CPU with stochastic depth in the last
  block that gave the last block's attn.proj / mlp.fc2 kernels wrong gradients (-O2) or NaN
  gradients everywhere (-O0) under jit (tests/test_layers.py)."""
  b, h, w, c = x.shape
  return jax.lax.reduce_window(x[:, : h // 2 * 2, : w // 2 * 2], -jnp.inf, jax.lax.max,
                               (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
