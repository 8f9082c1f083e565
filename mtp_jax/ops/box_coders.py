"""Box coders: regression targets <-> boxes, the formulas of mmdet 3.x / mmrotate 1.x (le90).

Every coder is a frozen dataclass with `encode(proposals, targets) -> deltas` and
`decode(proposals, deltas, max_shape=None) -> boxes`; shapes broadcast over leading dims, so a
per-class decode is `decode(proposals[:, None], deltas.reshape(n, classes, d))`. Horizontal boxes
are (x1, y1, x2, y2), rotated boxes (cx, cy, w, h, angle) le90 (DESIGN.md §4), in pixels.
`max_shape` is (height, width). Oriented R-CNN's settings (MTP_SPEC.md §3.3) are the constants
`ORIENTED_RPN_CODER` and `ORIENTED_RCNN_CODER`; Mask R-CNN's are `RPN_CODER` and `RCNN_CODER`.
"""

import dataclasses
import math

import jax.numpy as jnp

from mtp_jax.ops.boxes import norm_angle_le90, poly_to_rbox, rbox_to_hbox, rbox_to_poly, regularize_le90

_WH_RATIO_CLIP = 16 / 1000


def _centre_size(hboxes):
  x1, y1, x2, y2 = (hboxes[..., i] for i in range(4))
  return (x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1


def _normalise(deltas, means, stds):
  return (deltas - jnp.asarray(means, deltas.dtype)) / jnp.asarray(stds, deltas.dtype)


def _denormalise(deltas, means, stds):
  return deltas * jnp.asarray(stds, deltas.dtype) + jnp.asarray(means, deltas.dtype)


def _clamp(coder, shift_x, shift_y, dw, dh):
  """mmdet/mmrotate decode clamps: log-size deltas to |log(wh_ratio_clip)|; with `add_ctr_clamp`
  the centre shift (px) to +-ctr_clamp and the log-size deltas from above only."""
  max_ratio = abs(math.log(coder.wh_ratio_clip))
  if coder.add_ctr_clamp:
    shift_x = jnp.clip(shift_x, -coder.ctr_clamp, coder.ctr_clamp)
    shift_y = jnp.clip(shift_y, -coder.ctr_clamp, coder.ctr_clamp)
    return shift_x, shift_y, jnp.minimum(dw, max_ratio), jnp.minimum(dh, max_ratio)
  return shift_x, shift_y, jnp.clip(dw, -max_ratio, max_ratio), jnp.clip(dh, -max_ratio, max_ratio)


@dataclasses.dataclass(frozen=True)
class DeltaXYWH:
  """mmdet `DeltaXYWHBBoxCoder`: (dx, dy, dw, dh) = ((gx-px)/pw, (gy-py)/ph, log gw/pw, log gh/ph).

  Decoding clamps dw, dh to |log(wh_ratio_clip)| (only from above with `add_ctr_clamp`, which also
  clamps the centre shift to +-ctr_clamp px) and, with `clip_border` and a `max_shape`, clips x
  to [0, W] and y to [0, H].
  """
  means: tuple = (0.0, 0.0, 0.0, 0.0)
  stds: tuple = (1.0, 1.0, 1.0, 1.0)
  clip_border: bool = True
  add_ctr_clamp: bool = False
  ctr_clamp: float = 32.0
  wh_ratio_clip: float = _WH_RATIO_CLIP

  def encode(self, proposals, targets):
    px, py, pw, ph = _centre_size(jnp.asarray(proposals, jnp.float32))
    gx, gy, gw, gh = _centre_size(jnp.asarray(targets, jnp.float32))
    deltas = jnp.stack([(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)], -1)
    return _normalise(deltas, self.means, self.stds)

  def decode(self, proposals, deltas, max_shape=None):
    px, py, pw, ph = _centre_size(jnp.asarray(proposals, jnp.float32))
    d = _denormalise(jnp.asarray(deltas, jnp.float32), self.means, self.stds)
    dx, dy, dw, dh = (d[..., i] for i in range(4))
    shift_x, shift_y, dw, dh = _clamp(self, pw * dx, ph * dy, dw, dh)
    gx, gy = px + shift_x, py + shift_y
    gw, gh = pw * jnp.exp(dw), ph * jnp.exp(dh)
    x1, y1, x2, y2 = gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5
    if self.clip_border and max_shape is not None:
      height, width = max_shape[0], max_shape[1]
      x1, x2 = jnp.clip(x1, 0, width), jnp.clip(x2, 0, width)
      y1, y2 = jnp.clip(y1, 0, height), jnp.clip(y2, 0, height)
    return jnp.stack([x1, y1, x2, y2], -1)


@dataclasses.dataclass(frozen=True)
class MidpointOffset:
  """mmrotate `MidpointOffsetCoder` (Oriented R-CNN's RPN): horizontal anchor -> rotated box.

  Six deltas: the enclosing horizontal box's (dx, dy, dw, dh) as in `DeltaXYWH`, plus the offsets
  of two midpoints: da = (ga - gx) / gw, where ga is the largest x among the corners on the top
  edge (within 0.1 px of the smallest y: mmrotate's pixel tolerance), and db = (gb - gy) / gh,
  where gb is the largest y among the corners within 0.1 px of the largest x. Targets are
  regularised to le90 first. Decoding clamps dw, dh as `DeltaXYWH` and da, db to [-0.5, 0.5],
  builds the quadrilateral (ga, y1), (x2, gb), (gx - da*gw, y2), (x1, gy - db*gh), stretches its
  half-diagonals to the longest one (making it a rectangle) and fits the le90 box exactly (mmrotate
  calls cv2.minAreaRect, which gives the same rectangle). `max_shape` is ignored, as in mmrotate.
  """
  means: tuple = (0.0,) * 6
  stds: tuple = (1.0,) * 6
  wh_ratio_clip: float = _WH_RATIO_CLIP

  def encode(self, proposals, targets):
    px, py, pw, ph = _centre_size(jnp.asarray(proposals, jnp.float32))
    targets = regularize_le90(jnp.asarray(targets, jnp.float32))
    gx, gy, gw, gh = _centre_size(rbox_to_hbox(targets))
    poly = rbox_to_poly(targets)
    xs, ys = poly[..., 0], poly[..., 1]
    on_top = jnp.abs(ys - ys.min(-1, keepdims=True)) <= 0.1
    on_right = jnp.abs(xs - xs.max(-1, keepdims=True)) <= 0.1
    ga = jnp.where(on_top, xs, -1000.0).max(-1)
    gb = jnp.where(on_right, ys, -1000.0).max(-1)
    deltas = jnp.stack([(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph),
                        (ga - gx) / gw, (gb - gy) / gh], -1)
    return _normalise(deltas, self.means, self.stds)

  def decode(self, proposals, deltas, max_shape=None):
    del max_shape   # mmrotate ignores it for this coder
    px, py, pw, ph = _centre_size(jnp.asarray(proposals, jnp.float32))
    d = _denormalise(jnp.asarray(deltas, jnp.float32), self.means, self.stds)
    dx, dy, dw, dh, da, db = (d[..., i] for i in range(6))
    max_ratio = abs(math.log(self.wh_ratio_clip))
    dw, dh = jnp.clip(dw, -max_ratio, max_ratio), jnp.clip(dh, -max_ratio, max_ratio)
    gw, gh = pw * jnp.exp(dw), ph * jnp.exp(dh)
    gx, gy = px + pw * dx, py + ph * dy
    da, db = jnp.clip(da, -0.5, 0.5), jnp.clip(db, -0.5, 0.5)
    # Corners relative to the centre: top, right, bottom, left (opposite corners are opposite).
    rel_x = jnp.stack([da * gw, gw * 0.5, -da * gw, -gw * 0.5], -1)
    rel_y = jnp.stack([-gh * 0.5, db * gh, gh * 0.5, -db * gh], -1)
    length = jnp.sqrt(rel_x ** 2 + rel_y ** 2)
    longest = length.max(-1, keepdims=True)
    scale = jnp.where(length > 0, longest / jnp.where(length > 0, length, 1.0), 0.0)
    poly = jnp.stack([rel_x * scale + gx[..., None], rel_y * scale + gy[..., None]], -1)
    return poly_to_rbox(poly)   # w >= h, le90 (a square's angle is either of its edges')


@dataclasses.dataclass(frozen=True)
class DeltaXYWHT:
  """mmrotate `DeltaXYWHTRBBoxCoder`, le90: rotated proposal -> rotated box.

  dx, dy are the centre shift divided by the proposal's w, h, in the proposal's own axes with
  `proj_xy` (else in image axes); dw, dh = log ratios; dtheta = le90-wrapped angle difference.
  With `edge_swap` the target is also considered turned by pi/2 with w and h swapped, and the
  variant with the smaller |dtheta| is used (a strict < prefers the unturned one). Targets are
  regularised to le90 first. Decoding clamps dw, dh as `DeltaXYWH`, clips the centre to
  [0, W-1] x [0, H-1] given `max_shape`, and with `edge_swap` regularises the result to w > h.
  `norm_factor` divides dtheta by norm_factor * pi (mmrotate's option; None keeps radians).
  """
  means: tuple = (0.0,) * 5
  stds: tuple = (1.0,) * 5
  edge_swap: bool = False
  proj_xy: bool = False
  norm_factor: float | None = None
  add_ctr_clamp: bool = False
  ctr_clamp: float = 32.0
  wh_ratio_clip: float = _WH_RATIO_CLIP

  def encode(self, proposals, targets):
    p = jnp.asarray(proposals, jnp.float32)
    g = regularize_le90(jnp.asarray(targets, jnp.float32))
    px, py, pw, ph, pt = (p[..., i] for i in range(5))
    gx, gy, gw, gh, gt = (g[..., i] for i in range(5))
    if self.proj_xy:
      cos, sin = jnp.cos(pt), jnp.sin(pt)
      dx = (cos * (gx - px) + sin * (gy - py)) / pw
      dy = (-sin * (gx - px) + cos * (gy - py)) / ph
    else:
      dx, dy = (gx - px) / pw, (gy - py) / ph
    if self.edge_swap:
      dtheta1 = norm_angle_le90(gt - pt)
      dtheta2 = norm_angle_le90(gt - pt + math.pi / 2)
      unturned = jnp.abs(dtheta1) < jnp.abs(dtheta2)
      dtheta = jnp.where(unturned, dtheta1, dtheta2)
      gw, gh = jnp.where(unturned, gw, gh), jnp.where(unturned, gh, gw)
    else:
      dtheta = norm_angle_le90(gt - pt)
    if self.norm_factor:
      dtheta = dtheta / (self.norm_factor * math.pi)
    deltas = jnp.stack([dx, dy, jnp.log(gw / pw), jnp.log(gh / ph), dtheta], -1)
    return _normalise(deltas, self.means, self.stds)

  def decode(self, proposals, deltas, max_shape=None):
    p = jnp.asarray(proposals, jnp.float32)
    px, py, pw, ph, pt = (p[..., i] for i in range(5))
    d = _denormalise(jnp.asarray(deltas, jnp.float32), self.means, self.stds)
    dx, dy, dw, dh, dtheta = (d[..., i] for i in range(5))
    if self.norm_factor:
      dtheta = dtheta * (self.norm_factor * math.pi)
    shift_x, shift_y, dw, dh = _clamp(self, pw * dx, ph * dy, dw, dh)
    gw, gh = pw * jnp.exp(dw), ph * jnp.exp(dh)
    if self.proj_xy:   # mmrotate uses the unclamped shifts on this branch
      cos, sin = jnp.cos(pt), jnp.sin(pt)
      gx = dx * pw * cos - dy * ph * sin + px
      gy = dx * pw * sin + dy * ph * cos + py
    else:
      gx, gy = px + shift_x, py + shift_y
    gt = norm_angle_le90(pt + dtheta)
    if max_shape is not None:
      gx = jnp.clip(gx, 0, max_shape[1] - 1)
      gy = jnp.clip(gy, 0, max_shape[0] - 1)
    if self.edge_swap:
      wider = gw > gh
      gw, gh, gt = (jnp.where(wider, gw, gh), jnp.where(wider, gh, gw),
                    norm_angle_le90(jnp.where(wider, gt, gt + math.pi / 2)))
    return jnp.stack([gx, gy, gw, gh, gt], -1)


# Mask R-CNN (MTP_SPEC.md §3.3): RPN and R-CNN box coders.
RPN_CODER = DeltaXYWH()
RCNN_CODER = DeltaXYWH(stds=(0.1, 0.1, 0.2, 0.2))
# Oriented R-CNN, le90 (MTP_SPEC.md §3.3).
ORIENTED_RPN_CODER = MidpointOffset(stds=(1.0, 1.0, 1.0, 1.0, 0.5, 0.5))
ORIENTED_RCNN_CODER = DeltaXYWHT(stds=(0.1, 0.1, 0.2, 0.2, 0.1), edge_swap=True, proj_xy=True)
