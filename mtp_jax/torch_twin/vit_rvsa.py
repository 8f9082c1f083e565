"""ViT + RVSA in PyTorch, written from MTP_SPEC §1 with the official module and parameter names
(`ViT_Win_RVSA_V3_WSZ7`), as the numerical reference for the JAX encoder and as the module that
exported checkpoints load into with `strict=True`.

    from mtp_jax.torch_twin.vit_rvsa import build_twin
    model = build_twin("vit_b_rvsa", img_size=448)     # forward(x NCHW) -> 4 NCHW maps

Inference-level twin: dropout and stochastic depth are not applied (eval semantics).
"""


import torch
import torch.nn.functional as F
from torch import nn

from mtp_jax.models import ENCODER_PRESETS


def calc_rel_pos_spatial(attn, q, size, rel_pos_h, rel_pos_w):
  """MViTv2 decomposed relative positions for equal q/k grids of size x size."""
  dist = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
  rh, rw = rel_pos_h[dist], rel_pos_w[dist]
  b, heads, n, d = q.shape
  r_q = q.reshape(b, heads, size, size, d)
  rel_h = torch.einsum("byhwc,hkc->byhwk", r_q, rh)
  rel_w = torch.einsum("byhwc,wkc->byhwk", r_q, rw)
  attn = attn.view(b, heads, size, size, size, size) + rel_h[..., None] + rel_w[..., None, :]
  return attn.view(b, heads, n, n)


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
  def __init__(self, dim, num_heads, grid, rel_pos=True):
    super().__init__()
    self.num_heads, self.grid, self.rel_pos = num_heads, grid, rel_pos
    self.scale = (dim // num_heads) ** -0.5
    self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
    if rel_pos:   # the detection copies (vit_rvsa_mtp_branches.py) have none
      self.full_attn_rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, dim // num_heads))
      self.full_attn_rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, dim // num_heads))

  def forward(self, x, H, W):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * self.scale
    attn = q @ k.transpose(-2, -1)
    if self.rel_pos:
      attn = calc_rel_pos_spatial(attn, q, self.grid, self.full_attn_rel_pos_h, self.full_attn_rel_pos_w)
    attn = attn.softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class RotatedVariedSizeWindowAttention(nn.Module):
  def __init__(self, dim, num_heads, ws=7):
    super().__init__()
    self.num_heads, self.ws = num_heads, ws
    self.head_dim = dim // num_heads
    self.scale = self.head_dim ** -0.5
    self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
    pred = lambda out: nn.Sequential(nn.AvgPool2d(ws, ws), nn.LeakyReLU(), nn.Conv2d(dim, out, 1))
    self.sampling_offsets = pred(num_heads * 2)
    self.sampling_scales = pred(num_heads * 2)
    self.sampling_angles = pred(num_heads)
    self.rel_pos_h = nn.Parameter(torch.zeros(2 * ws - 1, self.head_dim))
    self.rel_pos_w = nn.Parameter(torch.zeros(2 * ws - 1, self.head_dim))
    self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
    nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    self.register_buffer("relative_position_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])

  def forward(self, x, H, W):
    b, n, c = x.shape
    ws, heads, hd = self.ws, self.num_heads, self.head_dim
    x_img = x.transpose(1, 2).reshape(b, c, H, W)
    pad_td, pad_lr = (ws - H % ws) % ws, (ws - W % ws) % ws
    top, left = pad_td // 2, pad_lr // 2
    pad = (left, pad_lr - left, top, pad_td - top)
    eh, ew = H + pad_td, W + pad_lr
    nwh, nww = eh // ws, ew // ws
    x_pad = F.pad(x_img, pad)

    ref_h, ref_w = torch.linspace(-1, 1, eh), torch.linspace(-1, 1, ew)
    image_ref = torch.stack(torch.meshgrid(ref_w, ref_h, indexing="ij"), 0).permute(0, 2, 1)[None]
    window_ref = F.avg_pool2d(image_ref, ws).reshape(1, 2, nwh, 1, nww, 1)
    base_h = torch.arange(ws) * 2 * ws / ws / (eh - 1)
    base_h = base_h - base_h.mean()
    base_w = torch.arange(ws) * 2 * ws / ws / (ew - 1)
    base_w = base_w - base_w.mean()
    coords = torch.stack(torch.meshgrid(base_w.repeat(nww), base_h.repeat(nwh), indexing="ij"), 0)
    window_coords = coords.permute(0, 2, 1).reshape(1, 2, nwh, ws, nww, ws)

    offsets = self.sampling_offsets(x_pad).reshape(b * heads, 2, nwh, nww)
    offsets = torch.stack([offsets[:, 0] / (H // ws), offsets[:, 1] / (W // ws)], 1)
    scales = self.sampling_scales(x_pad).reshape(b * heads, 2, nwh, nww)
    angle = self.sampling_angles(x_pad).reshape(b * heads, 1, nwh, nww)
    wc = window_coords * (scales[:, :, :, None, :, None] + 1)
    sin, cos = torch.sin(angle[:, 0, :, None, :, None]), torch.cos(angle[:, 0, :, None, :, None])
    wc_r = torch.stack([wc[:, 0] * cos - wc[:, 1] * sin, wc[:, 0] * sin + wc[:, 1] * cos], 1)
    grid = (window_ref + wc_r + offsets[:, :, :, None, :, None])
    grid = grid.permute(0, 2, 3, 4, 5, 1).reshape(b * heads, nwh * ws, nww * ws, 2)

    qkv = self.qkv(x).reshape(b, H, W, 3, heads, hd).permute(3, 0, 4, 5, 1, 2)  # 3 B h d H W
    qkv = F.pad(qkv.reshape(3 * b, heads * hd, H, W), pad).reshape(3, b * heads, hd, eh, ew)
    q, k, v = qkv[0], qkv[1], qkv[2]
    k = F.grid_sample(k, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    v = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def windows(t):  # (B*h, d, Eh, Ew) -> (B*nh*nw, h, ws*ws, d)
      t = t.reshape(b, heads, hd, nwh, ws, nww, ws).permute(0, 3, 5, 1, 4, 6, 2)
      return t.reshape(b * nwh * nww, heads, ws * ws, hd)

    qw, kw, vw = windows(q), windows(k), windows(v)
    attn = (qw @ kw.transpose(-2, -1)) * self.scale
    attn = calc_rel_pos_spatial(attn, qw, ws, self.rel_pos_h, self.rel_pos_w)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
    attn = attn + bias.view(ws * ws, ws * ws, heads).permute(2, 0, 1)[None]
    out = attn.softmax(dim=-1) @ vw
    out = out.reshape(b, nwh, nww, heads, ws, ws, hd).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, c, eh, ew)
    out = out[:, :, top:top + H, left:left + W].reshape(b, c, n).transpose(1, 2)
    return self.proj(out)


class Block(nn.Module):
  def __init__(self, dim, num_heads, mlp_ratio, grid, window, rel_pos=True):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = RotatedVariedSizeWindowAttention(dim, num_heads) if window else Attention(dim, num_heads, grid, rel_pos)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x, H, W):
    x = x + self.attn(self.norm1(x), H, W)
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)


class Norm2d(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.ln = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x):
    return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ViT_Win_RVSA_V3_WSZ7(nn.Module):
  def __init__(self, img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12,
               mlp_ratio=4.0, out_indices=(3, 5, 7, 11), interval=3, global_rel_pos=True):
    super().__init__()
    self.grid, self.out_indices = img_size // patch_size, tuple(out_indices)
    self.patch_embed = PatchEmbed(patch_size, embed_dim)
    self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, embed_dim))
    nn.init.trunc_normal_(self.pos_embed, std=0.02)
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, self.grid, (i + 1) % interval != 0,
                                       global_rel_pos) for i in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)  # in the checkpoints, never applied
    self.fpn1 = nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2), Norm2d(embed_dim), nn.GELU(),
                              nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2))
    self.fpn2 = nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2))
    self.fpn3 = nn.Identity()
    self.fpn4 = nn.MaxPool2d(2, 2)

  def forward(self, x):
    b = x.shape[0]
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
    feats = {}
    for i, blk in enumerate(self.blocks):
      x = blk(x, self.grid, self.grid)
      if i in self.out_indices:
        feats[i] = x.transpose(1, 2).reshape(b, -1, self.grid, self.grid)
    f = [feats[i] for i in self.out_indices]
    return [self.fpn1(f[0]), self.fpn2(f[1]), self.fpn3(f[2]), self.fpn4(f[3])]


def build_twin(name: str, img_size: int, **overrides) -> ViT_Win_RVSA_V3_WSZ7:
  """The twin of `mtp_jax.models.build_encoder(name, img_size, **overrides)` (RVSA presets)."""
  kw = {**ENCODER_PRESETS[name], **overrides}
  if not kw.pop("rvsa", False):
    raise ValueError(f"the twin covers the RVSA encoders; {name!r} is plain")
  for unused in ("drop_path_rate", "remat", "scan_blocks", "dtype", "grid_sample_method", "window_size"):
    kw.pop(unused, None)
  return ViT_Win_RVSA_V3_WSZ7(img_size=img_size, **kw).eval()
