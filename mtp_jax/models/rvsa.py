"""Rotated Varied-Size window Attention (RVSA), exactly as MTP's `RotatedVariedSizeWindowAttention`
(MTP_SPEC §1.4). Each deliberate quirk of the original is marked "Deliberate".

x: (B, N, C) tokens of an Hp x Hp grid (N = Hp^2). Per head and per 7x7 window, a predicted
offset (2), scale (2) and angle (1) move, stretch and turn the window's sampling grid; k and v are
bilinearly resampled there (grid_sample, align_corners=True, zero padding); q stays on the
regular window. Output: (B, N, C).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax.models import layers
from mtp_jax.models.rel_pos import rel_pos_coefficients, rel_pos_logits, window_bias_index
from mtp_jax.ops.grid_sample import grid_sample


class _AvgPoolWs(nnx.Module):
  """AvgPool2d(k=ws, s=ws) on NHWC (position 0 of the official Sequential)."""

  def __init__(self, ws: int):
    self.ws = ws

  def __call__(self, x):
    b, h, w, c = x.shape
    return x.reshape(b, h // self.ws, self.ws, w // self.ws, self.ws, c).mean(axis=(2, 4))


class _LeakyRelu(nnx.Module):
  """LeakyReLU(0.01) (position 1 of the official Sequential)."""

  def __call__(self, x):
    return jax.nn.leaky_relu(x, 0.01)


def _predictor(dim, out, ws, *, rngs, dtype):
  # Deliberate: PyTorch default conv init (kaiming-uniform a=sqrt(5)); the original's zero-init
  # `_reset_parameters` exists but is never called (MTP_SPEC §1.4.3).
  return nnx.List([_AvgPoolWs(ws), _LeakyRelu(),
                   layers.conv(dim, out, 1, in_axis="embed", out_axis=None, dtype=dtype, rngs=rngs)])


def _window_geometry(eh: int, ew: int, ws: int):
  """Window centres (2, nh, 1, nw, 1) and base offsets (2, nh, ws, nw, ws); channel 0 = x."""
  nh, nw = eh // ws, ew // ws
  ref_x = np.linspace(-1, 1, ew).reshape(nw, ws).mean(1)
  ref_y = np.linspace(-1, 1, eh).reshape(nh, ws).mean(1)
  base_y = np.arange(ws) * 2.0 / (eh - 1)   # k * 2 ws / attn_ws / (Eh - 1) with attn_ws = ws
  base_x = np.arange(ws) * 2.0 / (ew - 1)
  base_y, base_x = base_y - base_y.mean(), base_x - base_x.mean()
  ref = np.stack([np.broadcast_to(ref_x[None, None, :, None], (nh, 1, nw, 1)),
                  np.broadcast_to(ref_y[:, None, None, None], (nh, 1, nw, 1))])
  coords = np.stack([np.broadcast_to(base_x[None, None, None, :], (nh, ws, nw, ws)),
                     np.broadcast_to(base_y[None, :, None, None], (nh, ws, nw, ws))])
  return ref.astype(np.float32), coords.astype(np.float32)


class RotatedVariedSizeWindowAttention(nnx.Module):
  def __init__(self, dim: int, num_heads: int, *, window_size: int = 7, rngs: nnx.Rngs,
               dtype=None, grid_sample_method: str = "gather"):
    self.num_heads, self.ws = num_heads, window_size
    self.head_dim = dim // num_heads
    self.scale = self.head_dim ** -0.5
    self.grid_sample_method = grid_sample_method
    self.qkv = layers.linear(dim, 3 * dim, in_axis="embed", out_axis="qkv", dtype=dtype, rngs=rngs)
    self.proj = layers.linear(dim, dim, in_axis="qkv", out_axis="embed", dtype=dtype, rngs=rngs)
    self.sampling_offsets = _predictor(dim, num_heads * 2, window_size, rngs=rngs, dtype=dtype)
    self.sampling_scales = _predictor(dim, num_heads * 2, window_size, rngs=rngs, dtype=dtype)
    self.sampling_angles = _predictor(dim, num_heads, window_size, rngs=rngs, dtype=dtype)
    k = 2 * window_size - 1
    self.rel_pos_h = nnx.Param(jnp.zeros((k, self.head_dim)), **layers.axes(None, None))
    self.rel_pos_w = nnx.Param(jnp.zeros((k, self.head_dim)), **layers.axes(None, None))
    self.relative_position_bias_table = nnx.Param(
        layers.trunc_normal_002(rngs.params(), (k * k, num_heads)), **layers.axes(None, None))

  def __call__(self, x, grid_hw: int):
    """x: (b, n, c) tokens of a grid_hw x grid_hw map -> (b, n, c).

    Long because its numbered steps follow the original's forward one to one, with each
    Deliberate quirk where it happens: that order is what a parity review reads against."""
    b, n, c = x.shape
    h = w = grid_hw
    ws, nh_ = self.ws, self.num_heads
    hd = self.head_dim
    # 1. Deliberate: centred zero padding to a multiple of ws (extra row/column at bottom/right).
    pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
    top, left = pad_h // 2, pad_w // 2
    pads = ((0, 0), (top, pad_h - top), (left, pad_w - left), (0, 0))
    eh, ew = h + pad_h, w + pad_w
    nwin_h, nwin_w = eh // ws, ew // ws
    padded = jnp.pad(x.reshape(b, h, w, c), pads)

    # 3. Per-window, per-head predictions from the padded input: (B, nh, nw, heads * k).
    def predict(seq, k):
      y = padded
      for op in seq:
        y = op(y)
      return y.reshape(b, nwin_h, nwin_w, nh_, k).transpose(0, 3, 4, 1, 2).reshape(b * nh_, k, nwin_h, nwin_w)

    offsets = predict(self.sampling_offsets, 2).astype(jnp.float32)
    # Deliberate: x is divided by the UNPADDED row-window count and y by the column count,
    # both floor divisions (MTP_SPEC §1.4.3 and §7.4).
    offsets = offsets / jnp.asarray([h // ws, w // ws], jnp.float32)[None, :, None, None]
    scales = predict(self.sampling_scales, 2).astype(jnp.float32)
    angles = predict(self.sampling_angles, 1)[:, 0].astype(jnp.float32)   # radians, unbounded

    # 2 + 4. Reference grid, scaled, rotated, shifted: (B*heads, 2, nh, ws, nw, ws).
    ref, base = _window_geometry(eh, ew, ws)
    wc = base[None] * (scales[:, :, :, None, :, None] + 1.0)
    cos, sin = jnp.cos(angles)[:, :, None, :, None], jnp.sin(angles)[:, :, None, :, None]
    rx = wc[:, 0] * cos - wc[:, 1] * sin
    ry = wc[:, 0] * sin + wc[:, 1] * cos
    coords = ref[None] + jnp.stack([rx, ry], axis=1) + offsets[:, :, :, None, :, None]
    # In window order, (B*heads, nh*nw, ws*ws, 2): k and v are sampled straight into their windows.
    grid = coords.transpose(0, 2, 4, 3, 5, 1).reshape(b * nh_, nwin_h * nwin_w, ws * ws, 2)

    # 5. qkv on the UNPADDED tokens, then zero-padded (padded q = k = v = 0, no bias).
    qkv = self.qkv(x).reshape(b, h, w, 3, nh_, hd)
    qkv = jnp.pad(qkv, ((0, 0), (top, pad_h - top), (left, pad_w - left), (0, 0), (0, 0), (0, 0)))

    # 6. Windows in (B, heads, nh, nw, ws*ws, hd), pixels row-major: q's by a transpose; k and v
    # by one bilinear sampling of both (2 * hd features per point, [k | v]; the grid stays
    # float32). The two matmuls read the sampled [k | v] as it is, never split into k and v
    # copies: q zero-padded over v's half gives q . k, and the weights times [k | v] give the
    # output in v's half (the k half, hd more features of MXU work, is dropped). On the TPU
    # compiler this moves 13 % fewer bytes per block than splitting (docs/benchmarks.md).
    qw = qkv[:, :, :, 0].reshape(b, nwin_h, ws, nwin_w, ws, nh_, hd).transpose(0, 5, 1, 3, 2, 4, 6)
    qw = qw.reshape(b, nh_, nwin_h, nwin_w, ws * ws, hd)
    kv = qkv[:, :, :, 1:].transpose(0, 4, 1, 2, 3, 5).reshape(b * nh_, eh, ew, 2 * hd)
    kv = grid_sample(kv, grid, self.grid_sample_method).reshape(b, nh_, nwin_h, nwin_w, ws * ws, 2 * hd)
    # Deliberate: the decomposed rel-pos term uses the UNSCALED q in RVSA blocks: the query's
    # coefficients times the keys' one-hot positions (mtp_jax/models/rel_pos.py).
    coefficients = rel_pos_coefficients(qw, ws, self.rel_pos_h[...], self.rel_pos_w[...])
    q_kv = jnp.pad(qw * jnp.asarray(self.scale, qw.dtype), [(0, 0)] * 5 + [(0, hd)])
    # Both terms in the compute dtype: in bfloat16 the rel-pos term is rounded once before the
    # sum (float32 parity with the torch twin: tests/test_torch_parity.py).
    attn = (jnp.einsum("...qc,...kc->...qk", q_kv, kv)
            + rel_pos_logits(coefficients, ws))
    bias = self.relative_position_bias_table[...][window_bias_index(ws).reshape(-1)]
    bias = bias.reshape(ws * ws, ws * ws, nh_).transpose(2, 0, 1)[None, :, None, None]
    attn = jax.nn.softmax((attn + bias.astype(attn.dtype)).astype(jnp.float32), axis=-1).astype(kv.dtype)
    out = jnp.einsum("...qk,...kc->...qc", attn, kv)[..., hd:]    # (B, heads, nh, nw, 49, hd)

    # 7. Un-window, crop the padding, proj.
    out = out.reshape(b, nh_, nwin_h, nwin_w, ws, ws, hd).transpose(0, 2, 4, 3, 5, 1, 6)
    out = out.reshape(b, eh, ew, c)[:, top:top + h, left:left + w]
    return self.proj(out.reshape(b, n, c))
