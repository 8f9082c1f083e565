"""Anchors of mmdet's `AnchorGenerator`, as used by both RPNs of MTP (MTP_SPEC.md §3.3).

Per level with stride s and base size b (default b = s): base anchors centred at
(center_offset * b, center_offset * b) with h = b * sqrt(ratio) * scale and w = b / sqrt(ratio) *
scale, ordered ratio-major then scale (`scale_major=True`). Grid anchors add the shifts
(x * s, y * s) over the feature map, ordered (y, x, anchor): the same order as a head's NHWC output
flattened to (H * W * A), so prediction k belongs to anchor k. Boxes are (x1, y1, x2, y2) pixels.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AnchorGenerator:
  """mmdet `AnchorGenerator` (the MTP default: scale 8, ratios 0.5/1/2, strides 4..64)."""
  strides: tuple = (4, 8, 16, 32, 64)
  ratios: tuple = (0.5, 1.0, 2.0)
  scales: tuple = (8.0,)
  base_sizes: tuple | None = None
  center_offset: float = 0.0
  scale_major: bool = True

  @property
  def num_base_anchors(self):
    return len(self.ratios) * len(self.scales)

  def base_anchors(self):
    """List over levels of (A, 4) numpy float32 anchors centred on the level's origin cell."""
    sizes = self.base_sizes or self.strides
    out = []
    for size in sizes:
      h_ratios = np.sqrt(np.asarray(self.ratios, np.float64))
      w_ratios = 1 / h_ratios
      scales = np.asarray(self.scales, np.float64)
      if self.scale_major:
        ws = (size * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (size * h_ratios[:, None] * scales[None, :]).reshape(-1)
      else:
        ws = (size * scales[:, None] * w_ratios[None, :]).reshape(-1)
        hs = (size * scales[:, None] * h_ratios[None, :]).reshape(-1)
      centre = self.center_offset * size
      out.append(np.stack([centre - 0.5 * ws, centre - 0.5 * hs, centre + 0.5 * ws,
                           centre + 0.5 * hs], -1).astype(np.float32))
    return out

  def grid_anchors(self, feature_sizes):
    """[(H_l, W_l)] -> list of (H_l * W_l * A, 4) anchors in (y, x, anchor) order (jnp)."""
    self._check_levels(feature_sizes)
    out = []
    for base, stride, (height, width) in zip(self.base_anchors(), self.strides, feature_sizes):
      ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) * stride,
                            jnp.arange(width, dtype=jnp.float32) * stride, indexing="ij")
      shifts = jnp.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4)
      out.append((shifts + jnp.asarray(base)[None]).reshape(-1, 4))
    return out

  def valid_flags(self, feature_sizes, pad_shape):
    """Anchors whose cell lies inside the unpadded image: [(H_l, W_l)], (h, w) -> list of bool.

    mmdet: valid rows are the first min(ceil(h / stride), H_l), valid columns likewise.
    """
    self._check_levels(feature_sizes)
    out = []
    for stride, (height, width) in zip(self.strides, feature_sizes):
      valid_h = min(math.ceil(pad_shape[0] / stride), height)
      valid_w = min(math.ceil(pad_shape[1] / stride), width)
      cell = (jnp.arange(height)[:, None] < valid_h) & (jnp.arange(width)[None, :] < valid_w)
      out.append(jnp.repeat(cell.reshape(-1), self.num_base_anchors))
    return out

  def feature_sizes(self, image_size):
    """(H, W) image -> the FPN map sizes ceil(H / s), ceil(W / s) per level."""
    return [(math.ceil(image_size[0] / s), math.ceil(image_size[1] / s)) for s in self.strides]

  def _check_levels(self, feature_sizes):
    if len(feature_sizes) != len(self.strides):
      raise ValueError(f"{len(feature_sizes)} feature maps for {len(self.strides)} anchor strides "
                       f"{self.strides}")


def anchor_inside_flags(anchors, valid, image_shape, allowed_border=0):
  """mmdet `anchor_inside_flags`: valid anchors that lie inside the image widened by the border.

  x1 >= -border, y1 >= -border, x2 < W + border, y2 < H + border (strict, as `HorizontalBoxes.
  is_inside`). A negative `allowed_border` disables the test (returns `valid`).
  """
  if allowed_border < 0:
    return valid
  height, width = image_shape[0], image_shape[1]
  return (valid & (anchors[..., 0] >= -allowed_border) & (anchors[..., 1] >= -allowed_border)
          & (anchors[..., 2] < width + allowed_border) & (anchors[..., 3] < height + allowed_border))
