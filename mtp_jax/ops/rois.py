"""RoIAlign for horizontal and rotated boxes on NHWC maps, mmcv semantics, static shapes.

`roi_align` follows mmcv `RoIAlign` (= torchvision `roi_align`): with `aligned`, box corners are
shifted by -0.5 px after scaling; each output bin averages a grid of bilinear samples at the
centres of a `sampling_ratio` x `sampling_ratio` sub-grid, or of ceil(bin size) x ceil(bin size)
with `sampling_ratio=0` (adaptive). `roi_align_rotated` follows mmcv `RoIAlignRotated`: the same
grid laid out in the box's own axes, turned by the box angle (`clockwise=True`, as Oriented R-CNN
configures it, matches the le90 convention of DESIGN.md §4: the w-axis is (cos, sin) in image
coordinates). Bilinear sampling is mmcv's: a sample with y < -1, y > H, x < -1 or x > W reads 0
(and still counts in the average), coordinates in [-1, 0] read the border row or column.

Static shapes: the adaptive grid is data-dependent, so at most `max_samples` per axis per bin are
evaluated; bins that would need more use `max_samples` evenly spaced samples (exact whenever
ceil(bin size in feature pixels) <= max_samples, which FPN level mapping keeps true for all but
very elongated boxes). Boxes are processed `roi_chunk` at a time to bound the gather memory.

Multi-level variants assign each box to an FPN level like mmdet's `SingleRoIExtractor`
(level = floor(log2(sqrt(area) / finest_scale + 1e-6)), clamped) and sample from that level
through one flat gather over all levels.
"""

import jax
import jax.numpy as jnp


def roi_align(features, boxes, batch_indices, output_size, spatial_scale, sampling_ratio=0,
              aligned=True, max_samples=4, roi_chunk=128):
  """Horizontal RoIAlign.

  Args:
    features: (B, H, W, C) map. boxes: (R, 4) (x1, y1, x2, y2) in image pixels.
    batch_indices: (R,) int, the image of each box. output_size: int or (out_h, out_w).
    spatial_scale: feature pixels per image pixel (1 / stride).
  Returns:
    (R, out_h, out_w, C).
  """
  return _roi_align_levels([features], boxes, batch_indices, output_size, [spatial_scale],
                           jnp.zeros(jnp.shape(boxes)[0], jnp.int32), sampling_ratio, aligned,
                           None, max_samples, roi_chunk)


def roi_align_rotated(features, rboxes, batch_indices, output_size, spatial_scale,
                      sampling_ratio=2, aligned=True, clockwise=True, max_samples=4, roi_chunk=128):
  """Rotated RoIAlign of (R, 5) boxes (cx, cy, w, h, angle) -> (R, out_h, out_w, C); see above."""
  return _roi_align_levels([features], rboxes, batch_indices, output_size, [spatial_scale],
                           jnp.zeros(jnp.shape(rboxes)[0], jnp.int32), sampling_ratio, aligned,
                           clockwise, max_samples, roi_chunk)


def map_roi_levels(scales, num_levels, finest_scale=56):
  """mmdet's FPN level of a box from its scale sqrt(w * h) in pixels: (R,) float -> (R,) int32."""
  level = jnp.floor(jnp.log2(scales / finest_scale + 1e-6))
  return jnp.clip(level, 0, num_levels - 1).astype(jnp.int32)


def multilevel_roi_align(features, boxes, batch_indices, output_size, strides, finest_scale=56,
                         sampling_ratio=0, aligned=True, max_samples=4, roi_chunk=128):
  """mmdet `SingleRoIExtractor` + `RoIAlign`: features is a list of (B, H_l, W_l, C) maps."""
  boxes = jnp.asarray(boxes)
  scale = jnp.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
  levels = map_roi_levels(scale, len(features), finest_scale)
  return _roi_align_levels(features, boxes, batch_indices, output_size,
                           [1.0 / s for s in strides], levels, sampling_ratio, aligned, None,
                           max_samples, roi_chunk)


def multilevel_roi_align_rotated(features, rboxes, batch_indices, output_size, strides,
                                 finest_scale=56, sampling_ratio=2, aligned=True, clockwise=True,
                                 max_samples=4, roi_chunk=128):
  """mmrotate `RotatedSingleRoIExtractor` + `RoIAlignRotated` (level from sqrt(w * h))."""
  rboxes = jnp.asarray(rboxes)
  levels = map_roi_levels(jnp.sqrt(rboxes[:, 2] * rboxes[:, 3]), len(features), finest_scale)
  return _roi_align_levels(features, rboxes, batch_indices, output_size,
                           [1.0 / s for s in strides], levels, sampling_ratio, aligned, clockwise,
                           max_samples, roi_chunk)


def _roi_align_levels(features, boxes, batch_indices, output_size, scales, levels,
                      sampling_ratio, aligned, clockwise, max_samples, roi_chunk):
  """Shared body; `clockwise` None means horizontal boxes."""
  out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
  batch, channels = features[0].shape[0], features[0].shape[-1]
  heights = [f.shape[1] for f in features]
  widths = [f.shape[2] for f in features]
  flat = jnp.concatenate([f.reshape(-1, channels) for f in features], 0)
  bases = [0]
  for h, w in zip(heights, widths):
    bases.append(bases[-1] + batch * h * w)
  level_table = lambda values, dtype: jnp.asarray(values, dtype)[levels]
  per_roi = dict(
      boxes=jnp.asarray(boxes, jnp.float32),
      base=level_table(bases[:-1], jnp.int32) + jnp.asarray(batch_indices, jnp.int32)
      * level_table([h * w for h, w in zip(heights, widths)], jnp.int32),
      height=level_table(heights, jnp.int32), width=level_table(widths, jnp.int32),
      scale=level_table(scales, jnp.float32))
  grid = sampling_ratio if sampling_ratio > 0 else max_samples
  one = lambda r: _align_chunk(flat, r, out_h, out_w, grid, sampling_ratio, aligned, clockwise)
  num = per_roi["boxes"].shape[0]
  if num <= roi_chunk:
    return one(per_roi)
  chunks = -(-num // roi_chunk)
  padded = jax.tree.map(lambda x: jnp.pad(x, [(0, chunks * roi_chunk - num)] + [(0, 0)] * (x.ndim - 1)),
                        per_roi)
  out = jax.lax.map(one, jax.tree.map(lambda x: x.reshape(chunks, roi_chunk, *x.shape[1:]), padded))
  return out.reshape(chunks * roi_chunk, out_h, out_w, channels)[:num]


def _align_chunk(flat, rois, out_h, out_w, grid, sampling_ratio, aligned, clockwise):
  boxes, scale = rois["boxes"], rois["scale"]
  offset = 0.5 if aligned else 0.0
  if clockwise is None:                               # horizontal: corners
    start_w, start_h = boxes[:, 0] * scale - offset, boxes[:, 1] * scale - offset
    roi_w = boxes[:, 2] * scale - offset - start_w
    roi_h = boxes[:, 3] * scale - offset - start_h
  else:                                               # rotated: centre, size, angle
    centre_x, centre_y = boxes[:, 0] * scale - offset, boxes[:, 1] * scale - offset
    roi_w, roi_h = boxes[:, 2] * scale, boxes[:, 3] * scale
    theta = -boxes[:, 4] if clockwise else boxes[:, 4]
  if not aligned:
    roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
  bin_h, bin_w = roi_h / out_h, roi_w / out_w
  if sampling_ratio > 0:
    grid_h = grid_w = jnp.full(roi_h.shape, sampling_ratio, jnp.int32)
  else:   # mmcv: ceil of the bin size, capped to the static grid
    grid_h = jnp.clip(jnp.ceil(bin_h), 0, grid).astype(jnp.int32)
    grid_w = jnp.clip(jnp.ceil(bin_w), 0, grid).astype(jnp.int32)
  count = jnp.maximum(grid_h * grid_w, 1).astype(jnp.float32)
  steps = jnp.arange(grid, dtype=jnp.float32) + 0.5
  safe = lambda g: jnp.maximum(g, 1).astype(jnp.float32)[:, None, None]
  # In-box offsets of the sample rows (R, out_h, grid) and columns (R, out_w, grid).
  rows = (jnp.arange(out_h, dtype=jnp.float32)[None, :, None] * bin_h[:, None, None]
          + steps[None, None, :] * bin_h[:, None, None] / safe(grid_h))
  cols = (jnp.arange(out_w, dtype=jnp.float32)[None, :, None] * bin_w[:, None, None]
          + steps[None, None, :] * bin_w[:, None, None] / safe(grid_w))
  row_ok = jnp.arange(grid)[None, None, :] < grid_h[:, None, None]
  col_ok = jnp.arange(grid)[None, None, :] < grid_w[:, None, None]
  yy = rows[:, :, :, None, None]                      # (R, out_h, grid, 1, 1)
  xx = cols[:, None, None, :, :]                      # (R, 1, 1, out_w, grid)
  expand = lambda v: v[:, None, None, None, None]
  shape = (boxes.shape[0], out_h, grid, out_w, grid)
  if clockwise is None:
    y = jnp.broadcast_to(expand(start_h) + yy, shape)
    x = jnp.broadcast_to(expand(start_w) + xx, shape)
  else:
    yy = yy - expand(roi_h) / 2
    xx = xx - expand(roi_w) / 2
    cos, sin = expand(jnp.cos(theta)), expand(jnp.sin(theta))
    y = yy * cos - xx * sin + expand(centre_y)
    x = yy * sin + xx * cos + expand(centre_x)
  mask = row_ok[:, :, :, None, None] & col_ok[:, None, None, :, :]
  values = _bilinear(flat, rois["base"], rois["height"], rois["width"], y, x)
  values = jnp.where(mask[..., None], values, 0.0).sum((2, 4))
  return values / count[:, None, None, None]


def _bilinear(flat, base, height, width, y, x):
  """mmcv `bilinear_interpolate` at (R, ...) points of each box's map -> (R, ..., C)."""
  extra = (1,) * (y.ndim - 1)
  height = height.reshape(-1, *extra)
  width = width.reshape(-1, *extra)
  base = base.reshape(-1, *extra)
  h_f, w_f = height.astype(y.dtype), width.astype(y.dtype)
  outside = (y < -1.0) | (y > h_f) | (x < -1.0) | (x > w_f)
  y, x = jnp.maximum(y, 0.0), jnp.maximum(x, 0.0)
  y_low, x_low = jnp.floor(y).astype(jnp.int32), jnp.floor(x).astype(jnp.int32)
  at_bottom, at_right = y_low >= height - 1, x_low >= width - 1
  y_low = jnp.where(at_bottom, height - 1, y_low)
  x_low = jnp.where(at_right, width - 1, x_low)
  y = jnp.where(at_bottom, y_low.astype(y.dtype), y)
  x = jnp.where(at_right, x_low.astype(x.dtype), x)
  y_high = jnp.where(at_bottom, y_low, y_low + 1)
  x_high = jnp.where(at_right, x_low, x_low + 1)
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  read = lambda yi, xi: flat[base + yi * width + xi]
  value = ((hy * hx)[..., None] * read(y_low, x_low) + (hy * lx)[..., None] * read(y_low, x_high)
           + (ly * hx)[..., None] * read(y_high, x_low) + (ly * lx)[..., None] * read(y_high, x_high))
  return jnp.where(outside[..., None], 0.0, value)

