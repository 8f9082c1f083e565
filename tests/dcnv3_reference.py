"""The DCNv3 core by its definition, loop by loop over groups and points, in float64 numpy: the
oracle of tests/test_dcnv3.py and the baseline of benchmarks/dcnv3.py (not library)."""

import numpy as np


def _bilinear_zeros(img, px, py):
  """img (N, H, W, c); px, py (N, Ho, Wo) pixel coordinates -> (N, Ho, Wo, c); zero outside."""
  n, h, w, _ = img.shape
  x0, y0 = np.floor(px), np.floor(py)
  batch = np.arange(n)[:, None, None]
  out = 0.0
  for yi in (y0, y0 + 1):
    for xi in (x0, x0 + 1):
      weight = (1 - np.abs(px - xi)) * (1 - np.abs(py - yi))
      inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      vals = img[batch, np.clip(yi, 0, h - 1).astype(int), np.clip(xi, 0, w - 1).astype(int)]
      out = out + np.where(inside, weight, 0.0)[..., None] * vals
  return out


def reference(x, offset, mask, *, k, stride, pad, dilation, group, offset_scale):
  """dcnv3_core's definition (mtp_jax/ops/dcnv3.py) in the official normalised form: reference
  points and taps divided by the padded size, grid_sample(align_corners=False) on the padded map."""
  x, offset, mask = (np.asarray(a, np.float64) for a in (x, offset, mask))
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  n, hin, win, c = xp.shape
  gc = c // group
  ho = (hin - (dilation * (k - 1) + 1)) // stride + 1
  wo = (win - (dilation * (k - 1) + 1)) // stride + 1
  half = (dilation * (k - 1)) // 2
  ref_x = ((half + 0.5 + stride * np.arange(wo)) / win)[None, None, :]
  ref_y = ((half + 0.5 + stride * np.arange(ho)) / hin)[None, :, None]
  off = offset.reshape(n, ho, wo, group, k * k, 2)
  m = mask.reshape(n, ho, wo, group, k * k)
  out = np.zeros((n, ho, wo, c))
  for g in range(group):
    for ix in range(k):
      for iy in range(k):
        p = ix * k + iy
        loc_x = ref_x + ((-half + ix * dilation) + off[..., g, p, 0]) * offset_scale / win
        loc_y = ref_y + ((-half + iy * dilation) + off[..., g, p, 1]) * offset_scale / hin
        sample = _bilinear_zeros(xp[..., g * gc:(g + 1) * gc], loc_x * win - 0.5, loc_y * hin - 0.5)
        out[..., g * gc:(g + 1) * gc] += sample * m[..., g, p, None]
  return out
