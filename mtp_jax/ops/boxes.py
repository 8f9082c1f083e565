"""Box conversions, the one place that owns them (DESIGN.md §4).

Conventions: rotated boxes are (cx, cy, w, h, angle) in pixels and radians, `le90`: w >= h and
angle in [-pi/2, pi/2), image coordinates (x right, y down), so a positive angle turns the w-axis
from +x towards +y (clockwise on screen). Polygons are (..., 4, 2) corner arrays; horizontal boxes
are (x1, y1, x2, y2). Every function works on numpy arrays (host-side data code) and on jax arrays
(inside jit): the array module is taken from the input.
"""

import numpy as np
import jax.numpy as jnp


def _xp(x):
  return np if isinstance(x, (np.ndarray, np.generic, float, int, list, tuple)) else jnp


def norm_angle_le90(angle):
  """Wraps angles (radians) into [-pi/2, pi/2)."""
  xp = _xp(angle)
  return xp.mod(angle + np.pi / 2, np.pi) - np.pi / 2


def regularize_le90(rboxes):
  """mmrotate `le90` regularisation: swap w/h (and turn by pi/2) unless w > h, then wrap the angle.

  Squares (w == h) are turned by pi/2, as mmrotate's `RotatedBoxes.regularize_boxes` does.
  """
  xp = _xp(rboxes)
  rboxes = xp.asarray(rboxes)
  x, y, w, h, t = (rboxes[..., i] for i in range(5))
  keep = w > h
  w2 = xp.where(keep, w, h)
  h2 = xp.where(keep, h, w)
  t2 = xp.where(keep, t, t + np.pi / 2)
  return xp.stack([x, y, w2, h2, norm_angle_le90(t2)], axis=-1)


def poly_to_rbox(polys):
  """(..., 4, 2) quadrilateral corners in order -> (..., 5) le90 rotated boxes.

  mmrotate's `poly2obb_le90` rules: the centre is the midpoint of corners 0 and 2, w is the longer
  of the edges 0->1 and 1->2 and h the shorter; the angle is that of edge 0->1 when it is the
  longer one, otherwise that of edge 0->3 (a tie, a square, takes edge 0->3), wrapped into
  [-pi/2, pi/2). Exact for rectangles (SAMRS, DOTA and decoded midpoint-offset boxes); for a
  general quadrilateral it is mmrotate's edge-based fit, not the minimum-area rectangle.
  """
  xp = _xp(polys)
  p = xp.asarray(polys)
  centre = (p[..., 0, :] + p[..., 2, :]) / 2
  e1 = p[..., 1, :] - p[..., 0, :]
  e2 = p[..., 2, :] - p[..., 1, :]
  e3 = p[..., 3, :] - p[..., 0, :]
  len1 = xp.sqrt((e1 ** 2).sum(-1))
  len2 = xp.sqrt((e2 ** 2).sum(-1))
  first_longer = len1 > len2
  angle = xp.where(first_longer, xp.arctan2(e1[..., 1], e1[..., 0]),
                   xp.arctan2(e3[..., 1], e3[..., 0]))
  return xp.stack([centre[..., 0], centre[..., 1], xp.maximum(len1, len2),
                   xp.minimum(len1, len2), norm_angle_le90(angle)], axis=-1)


def quad_to_rbox_min_area(polys) -> np.ndarray:
  """(N, 4, 2) quadrilaterals -> (N, 5) le90 rotated boxes as mmrotate 1.x converts annotations
  (`qbox2rbox`: OpenCV's minimum-area rectangle of the 4 points, then the le90 regularisation).
  Host only (numpy + cv2). For a rectangle it is the rectangle itself, as `poly_to_rbox`; for
  DOTA's general quadrilaterals the two differ (SAMRS pretraining keeps `poly_to_rbox`, the rule
  of MTP's pretraining code)."""
  import cv2  # noqa: PLC0415 (host-side data code only)
  polys = np.asarray(polys, np.float32).reshape(-1, 4, 2)
  out = np.zeros((len(polys), 5), np.float64)
  for i, p in enumerate(polys):
    (cx, cy), (w, h), degrees = cv2.minAreaRect(p)
    out[i] = (cx, cy, w, h, np.deg2rad(degrees))
  return regularize_le90(out)


def rbox_to_poly(rboxes):
  """(..., 5) rotated boxes -> (..., 4, 2) corners: (-w,-h), (+w,-h), (+w,+h), (-w,+h) in the box frame."""
  xp = _xp(rboxes)
  r = xp.asarray(rboxes)
  cx, cy, w, h, t = (r[..., i] for i in range(5))
  cos, sin = xp.cos(t), xp.sin(t)
  ux, uy = cos * w / 2, sin * w / 2     # half w-axis
  vx, vy = -sin * h / 2, cos * h / 2    # half h-axis
  xs = xp.stack([cx - ux - vx, cx + ux - vx, cx + ux + vx, cx - ux + vx], axis=-1)
  ys = xp.stack([cy - uy - vy, cy + uy - vy, cy + uy + vy, cy - uy + vy], axis=-1)
  return xp.stack([xs, ys], axis=-1)


def poly_to_hbox(polys):
  """(..., K, 2) polygons -> (..., 4) enclosing horizontal boxes (x1, y1, x2, y2)."""
  xp = _xp(polys)
  p = xp.asarray(polys)
  return xp.concatenate([p.min(axis=-2), p.max(axis=-2)], axis=-1)


def rbox_to_hbox(rboxes):
  """(..., 5) rotated boxes -> (..., 4) enclosing horizontal boxes (x1, y1, x2, y2)."""
  xp = _xp(rboxes)
  r = xp.asarray(rboxes)
  cx, cy, w, h, t = (r[..., i] for i in range(5))
  cos, sin = xp.cos(t), xp.sin(t)
  half_x = xp.abs(w / 2 * cos) + xp.abs(h / 2 * sin)
  half_y = xp.abs(w / 2 * sin) + xp.abs(h / 2 * cos)
  return xp.stack([cx - half_x, cy - half_y, cx + half_x, cy + half_y], axis=-1)


def hbox_to_rbox(hboxes):
  """(..., 4) horizontal boxes -> (..., 5) rotated boxes with angle 0, as mmrotate's `hbox2rbox`.

  w and h are kept as they are (not regularised); apply `regularize_le90` for w >= h.
  """
  xp = _xp(hboxes)
  b = xp.asarray(hboxes)
  zero = xp.zeros_like(b[..., 0])
  return xp.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2, b[..., 2] - b[..., 0],
                   b[..., 3] - b[..., 1], zero], axis=-1)
