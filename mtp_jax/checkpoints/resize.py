"""Bicubic resizing of position tables, as PyTorch's `F.interpolate(mode='bicubic',
align_corners=False)` computes it, in numpy (no torch needed to finetune at a new image size).

PyTorch's bicubic (aten upsample_bicubic2d): output index d samples the input at
src = (d + 0.5) * in / out - 0.5 (not clamped), from the 4 taps floor(src) - 1 .. floor(src) + 2
with indices clamped to [0, in - 1], weighted by the cubic convolution kernel with A = -0.75.
The 2-D resize is separable: rows, then columns. Computed in float64, returned as float32.
"""

import numpy as np

_A = -0.75


def _weights(t: np.ndarray) -> np.ndarray:
  """(n,) fractional offsets -> (n, 4) cubic-convolution weights of the taps -1, 0, 1, 2."""
  near = lambda x: ((_A + 2) * x - (_A + 3)) * x * x + 1                   # |x| <= 1
  far = lambda x: ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A            # 1 < |x| < 2
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix M with M @ x = the bicubic resize of x along its first axis."""
  dst = np.arange(out_size, dtype=np.float64)
  src = (dst + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(src)
  w = _weights(src - base)
  m = np.zeros((out_size, in_size))
  for tap in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
    np.add.at(m, (np.arange(out_size), idx), w[:, tap])
  return m


def bicubic_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(H, W, ...) -> (size[0], size[1], ...) bicubic, align_corners=False (PyTorch's)."""
  x = np.asarray(x, np.float64)
  rows = np.tensordot(bicubic_matrix(x.shape[0], size[0]), x, axes=(1, 0))
  cols = np.tensordot(bicubic_matrix(x.shape[1], size[1]), np.swapaxes(rows, 0, 1), axes=(1, 0))
  return np.swapaxes(cols, 0, 1).astype(np.float32)
