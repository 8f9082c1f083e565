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
evaluated. Exact whenever ceil(bin size in feature pixels) <= max_samples, which FPN level mapping
keeps true for all but very elongated boxes. On the CPU boxes are processed `roi_chunk` (default
128) at a time to bound host memory; on accelerators all at once by default (a loop over chunks
moves its carried outputs and gradients once per chunk: 3x the bytes on the TPU compiler).

Horizontal boxes are sampled separably: bilinear sampling on an axis-aligned grid, mmcv's
out-of-map rule included, is a product of one weight per row and one per column, so a box's
output is A_long . P . A_short^T, with P the feature pixels it reads along its longer and shorter
side and A_* the (output, K) averaging weights of each side. Along the longer side P takes the two
pixels of each sample (K = 2 x output x max_samples): the same samples as the gather of four
corners, for any box. Along the shorter side P is a window of consecutive pixels, all that the
samples touch (K = output x max_samples + 2), exact whenever ceil(bin) <= max_samples; a shorter
side that spans more (a box over 4 x 7 feature pixels in both sides for the 7 x 7 box branch:
only at the top level of large images) takes max_samples / 2 samples per bin there. A fixed
`sampling_ratio` is exact on both sides. K is rounded up to a multiple of 8. Against four corner
reads per sample and their sample-sized intermediates, this moves 5-13x fewer bytes on the TPU
compiler (docs/benchmarks.md). Rotated boxes are not separable: each sample reads its four corners
(samples along one axis padded to a multiple of 8, feature vectors along the other, the layout the
gather returns) and each bin's average is a matmul with a 0/1 pooling matrix; 4x fewer bytes than
a (box, out_h, grid, out_w, grid) layout, whose small minor dimensions pad out on TPU tiles.

On small maps, on the CPU, horizontal boxes take a dense form instead: each box's per-axis
averaging weights over every row and column of its level's map, applied as two matmuls
(A_y . map . A_x^T). XLA:CPU runs gathers and their scatter-add gradients element by element and
matmuls at full rate, so where the map has few pixels this is several times faster forward and
backward (`dense_pays` decides by a cost ratio measured with benchmarks/roi_align_cpu.py;
accelerators keep the gathers). Same values to float rounding.

Multi-level variants assign each box to an FPN level like mmdet's `SingleRoIExtractor`
(level = floor(log2(sqrt(area) / finest_scale + 1e-6)), clamped) and sample from that level
through one flat gather over all levels.
"""

import jax
import jax.numpy as jnp

from mtp_jax.ops import target


def roi_align(features, boxes, batch_indices, output_size, spatial_scale, sampling_ratio=0,
              aligned=True, max_samples=4, roi_chunk=None, dense=None):
  """Horizontal RoIAlign.

  Args:
    features: (B, H, W, C) map. boxes: (R, 4) (x1, y1, x2, y2) in image pixels.
    batch_indices: (R,) int, the image of each box. output_size: int or (out_h, out_w).
    spatial_scale: feature pixels per image pixel (1 / stride).
    dense: sample through whole-map matmuls (True) or gathers (False); None chooses by cost
      (`dense_pays`). The same values either way, to float rounding.
  Returns:
    (R, out_h, out_w, C).
  """
  return _roi_align_levels([features], boxes, batch_indices, output_size, [spatial_scale],
                           jnp.zeros(jnp.shape(boxes)[0], jnp.int32), sampling_ratio, aligned,
                           None, max_samples, roi_chunk, dense)


def roi_align_rotated(features, rboxes, batch_indices, output_size, spatial_scale,
                      sampling_ratio=2, aligned=True, clockwise=True, max_samples=4, roi_chunk=None):
  """Rotated RoIAlign of (R, 5) boxes (cx, cy, w, h, angle) -> (R, out_h, out_w, C); see above."""
  return _roi_align_levels([features], rboxes, batch_indices, output_size, [spatial_scale],
                           jnp.zeros(jnp.shape(rboxes)[0], jnp.int32), sampling_ratio, aligned,
                           clockwise, max_samples, roi_chunk, False)


def map_roi_levels(scales, num_levels, finest_scale=56):
  """mmdet's FPN level of a box from its scale sqrt(w * h) in pixels: (R,) float -> (R,) int32."""
  level = jnp.floor(jnp.log2(scales / finest_scale + 1e-6))
  return jnp.clip(level, 0, num_levels - 1).astype(jnp.int32)


def multilevel_roi_align(features, boxes, batch_indices, output_size, strides, finest_scale=56,
                         sampling_ratio=0, aligned=True, max_samples=4, roi_chunk=None, dense=None):
  """mmdet `SingleRoIExtractor` + `RoIAlign`: features is a list of (B, H_l, W_l, C) maps
  (`dense` as in `roi_align`)."""
  boxes = jnp.asarray(boxes)
  scale = jnp.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
  levels = map_roi_levels(scale, len(features), finest_scale)
  return _roi_align_levels(features, boxes, batch_indices, output_size,
                           [1.0 / s for s in strides], levels, sampling_ratio, aligned, None,
                           max_samples, roi_chunk, dense)


def multilevel_roi_align_rotated(features, rboxes, batch_indices, output_size, strides,
                                 finest_scale=56, sampling_ratio=2, aligned=True, clockwise=True,
                                 max_samples=4, roi_chunk=None):
  """mmrotate `RotatedSingleRoIExtractor` + `RoIAlignRotated` (level from sqrt(w * h))."""
  rboxes = jnp.asarray(rboxes)
  levels = map_roi_levels(jnp.sqrt(rboxes[:, 2] * rboxes[:, 3]), len(features), finest_scale)
  return _roi_align_levels(features, rboxes, batch_indices, output_size,
                           [1.0 / s for s in strides], levels, sampling_ratio, aligned, clockwise,
                           max_samples, roi_chunk, False)


def _roi_align_levels(features, boxes, batch_indices, output_size, scales, levels,
                      sampling_ratio, aligned, clockwise, max_samples, roi_chunk, dense):
  """Shared body; `clockwise` None means horizontal boxes."""
  out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
  grid = sampling_ratio if sampling_ratio > 0 else max_samples
  shapes = [f.shape[:3] for f in features]
  if dense is None:
    dense = clockwise is None and dense_pays(shapes, (out_h, out_w), grid, sampling_ratio)
  if dense:
    if clockwise is not None:
      raise ValueError("the dense form samples horizontal boxes only (rotated grids are not separable)")
    return _align_dense(features, jnp.asarray(boxes, jnp.float32), batch_indices, levels, scales,
                        out_h, out_w, grid, sampling_ratio, aligned)
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
  if clockwise is None:
    one = lambda r: _align_chunk_separable(flat, r, out_h, out_w, grid, sampling_ratio, aligned)
  else:
    one = lambda r: _align_chunk(flat, r, out_h, out_w, grid, sampling_ratio, aligned, clockwise)
  num = per_roi["boxes"].shape[0]
  if roi_chunk is None:
    roi_chunk = target.by_platform(cpu=128, accelerator=num)
  if num <= roi_chunk:
    return one(per_roi)
  chunks = -(-num // roi_chunk)
  padded = jax.tree.map(lambda x: jnp.pad(x, [(0, chunks * roi_chunk - num)] + [(0, 0)] * (x.ndim - 1)),
                        per_roi)
  out = jax.lax.map(one, jax.tree.map(lambda x: x.reshape(chunks, roi_chunk, *x.shape[1:]), padded))
  return out.reshape(chunks * roi_chunk, out_h, out_w, channels)[:num]


def _align_chunk(flat, rois, out_h, out_w, grid, sampling_ratio, aligned, clockwise):
  """Rotated RoIAlign of a chunk of boxes: four corner reads per sample, averaged per bin."""
  boxes, scale = rois["boxes"], rois["scale"]
  offset = 0.5 if aligned else 0.0
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
  expand = lambda v: v[:, None, None, None, None]
  yy = rows[:, :, :, None, None] - expand(roi_h) / 2          # (R, out_h, grid, 1, 1)
  xx = cols[:, None, None, :, :] - expand(roi_w) / 2          # (R, 1, 1, out_w, grid)
  cos, sin = expand(jnp.cos(theta)), expand(jnp.sin(theta))
  y = yy * cos - xx * sin + expand(centre_y)                  # (R, out_h, grid, out_w, grid)
  x = yy * sin + xx * cos + expand(centre_x)
  used = jnp.broadcast_to(row_ok[:, :, :, None, None] & col_ok[:, None, None, :, :], y.shape)
  # Samples flattened to one axis (S = out_h * grid * out_w * grid, feature vectors along the
  # minor axis, as the gather returns them); each bin's average is a matmul with a 0/1 pooling
  # matrix (bins, S).
  # S is padded to whole (8, 128) tiles with unused samples: no relayout of the gathered values.
  samples = out_h * grid * out_w * grid
  pad = lambda v, fill=0: jnp.pad(v.reshape(*v.shape[:-4], samples),
                                  [(0, 0)] * (v.ndim - 4) + [(0, _tiles(samples) - samples)],
                                  constant_values=fill)
  values = _bilinear(flat, rois["base"], rois["height"], rois["width"], pad(y), pad(x),
                     pad(used))                                      # (R, S, C)
  bins = jnp.arange(out_h)[:, None, None, None] * out_w + jnp.arange(out_w)[None, None, :, None]
  bins = pad(jnp.broadcast_to(bins, (out_h, grid, out_w, grid)), fill=-1)
  pool = (bins[None, :] == jnp.arange(out_h * out_w)[:, None]).astype(values.dtype)
  pooled = jnp.einsum("bs,rsc->rbc", pool, values, preferred_element_type=jnp.float32)
  return pooled.reshape(-1, out_h, out_w, pooled.shape[-1]) / count[:, None, None, None]


def _align_chunk_separable(flat, rois, out_h, out_w, grid, sampling_ratio, aligned):
  """Horizontal RoIAlign of a chunk of boxes as A_long . pixels . A_short^T (module docstring)."""
  boxes, scale = rois["boxes"], rois["scale"]
  start_w, start_h, roi_w, roi_h = _box_extent(boxes, scale, aligned)
  k_long, k_short, half = _separable_widths(out_h, out_w, grid, sampling_ratio)
  rows = lambda k, cap: _axis_weights(start_h, roi_h, rois["height"], k, cap, out_h, grid, sampling_ratio)
  cols = lambda k, cap: _axis_weights(start_w, roi_w, rois["width"], k, cap, out_w, grid, sampling_ratio)
  y_long, y_short = rows(k_long, grid), rows(k_short, half)
  x_long, x_short = cols(k_long, grid), cols(k_short, half)
  rows_long = (roi_h >= roi_w) if out_h == out_w else jnp.ones(roi_h.shape, bool)
  pick = lambda a, b: jax.tree.map(lambda u, v: jnp.where(rows_long.reshape(-1, *(1,) * (u.ndim - 1)), u, v), a, b)
  (w_long, p_long, n_long), (w_short, p_short, n_short) = pick(y_long, x_long), pick(x_short, y_short)
  width = rois["width"][:, None, None]
  index = rois["base"][:, None, None] + jnp.where(
      rows_long[:, None, None], p_long[:, :, None] * width + p_short[:, None, :],
      p_short[:, None, :] * width + p_long[:, :, None])
  pixels = flat[index]                                               # (R, K_long, K_short, C)
  dtype = pixels.dtype
  # The short axis first, then the long one (the order with the fewest bytes on the TPU
  # compiler); the intermediate in the features' dtype. Weights in that dtype: exact in float32,
  # in bfloat16 rounded as the features are.
  hi = jax.lax.Precision.HIGHEST
  partial = jnp.einsum("rabc,rqb->raqc", pixels, w_short.astype(dtype), precision=hi,
                       preferred_element_type=jnp.float32).astype(dtype)
  values = jnp.einsum("rpa,raqc->rpqc", w_long.astype(dtype), partial, precision=hi,
                      preferred_element_type=jnp.float32)
  if out_h == out_w:
    values = jnp.where(rows_long[:, None, None, None], values, values.transpose(0, 2, 1, 3))
  count = jnp.maximum(n_long * n_short, 1).astype(jnp.float32)
  return values / count[:, None, None, None]


# How many multiply-adds of the dense form one gathered pixel is worth: on the CPU XLA's
# gathers and their scatter-add gradients run element by element, matmuls at full rate (measured
# with `python benchmarks/roi_align_cpu.py`); on accelerators the gathers are the measured form
# (docs/benchmarks.md), so the dense form is used only when asked for.
DENSE_MACS_PER_GATHERED_PIXEL = {"cpu": 40.0, "accelerator": 0.0}


def dense_pays(shapes, output_size, grid, sampling_ratio) -> bool:
  """Whether whole-map matmuls cost less than the separable gathers for horizontal boxes on maps
  of `shapes` [(B, H_l, W_l)], by multiply-adds per box and channel against pixels gathered per
  box and channel, weighed by `DENSE_MACS_PER_GATHERED_PIXEL` of the platform traced for."""
  out_h, out_w = output_size
  k_long, k_short, _ = _separable_widths(out_h, out_w, grid, sampling_ratio)
  dense_macs = sum(out_h * b * h * w + out_h * w * out_w for b, h, w in shapes)
  weight = target.by_platform(cpu=DENSE_MACS_PER_GATHERED_PIXEL["cpu"],
                              accelerator=DENSE_MACS_PER_GATHERED_PIXEL["accelerator"])
  return dense_macs <= weight * k_long * k_short


def _align_dense(features, boxes, batch_indices, levels, scales, out_h, out_w, grid, sampling_ratio,
                 aligned):
  """Horizontal RoIAlign as A_y . map . A_x^T over whole maps: per level, each box's (out, H) and
  (out, W) averaging weights (its image's rows only: the batch is folded into H), zero for boxes
  of other levels. Matmuls forward and backward, no gather or scatter; the same samples and
  weights as the gather forms, exact up to `grid` samples per bin and axis (no narrower cap on
  a box's shorter side)."""
  batch_indices = jnp.asarray(batch_indices, jnp.int32)
  hi = jax.lax.Precision.HIGHEST
  total = 0.0
  for level, (f, scale) in enumerate(zip(features, scales)):
    b, h, w, c = f.shape
    start_w, start_h, roi_w, roi_h = _box_extent(boxes, scale, aligned)
    a_y, n_y = _dense_axis_weights(start_h, roi_h, h, out_h, grid, sampling_ratio)   # (R, out_h, H)
    a_x, n_x = _dense_axis_weights(start_w, roi_w, w, out_w, grid, sampling_ratio)   # (R, out_w, W)
    scale_by = jnp.where(levels == level, 1.0 / jnp.maximum(n_y * n_x, 1).astype(jnp.float32), 0.0)
    a_y = a_y * scale_by[:, None, None]
    if b > 1:   # the box's image's rows of the (B * H) stacked rows
      a_y = a_y[:, :, None, :] * (batch_indices[:, None] == jnp.arange(b))[:, None, :, None]
    a_y = a_y.reshape(-1, b * h).astype(f.dtype)
    rows = jnp.dot(a_y, f.reshape(b * h, w * c), precision=hi, preferred_element_type=jnp.float32)
    rows = rows.astype(f.dtype).reshape(-1, out_h, w, c)                                 # (R, out_h, W, C)
    total = total + jnp.einsum("rqw,rpwc->rpqc", a_x.astype(f.dtype), rows, precision=hi,
                               preferred_element_type=jnp.float32)
  return total


def _dense_axis_weights(start, length, size: int, out, grid, sampling_ratio):
  """One axis of `_align_dense`: (R, out, size) sums of the bilinear weights of each bin's samples
  over the axis' pixels, and the (R,) samples per bin."""
  bin_size = length / out
  per_bin = _samples_per_bin(bin_size, grid, sampling_ratio)
  low, high, w_low, w_high, _ = _axis_taps(start, bin_size, jnp.full(start.shape, size, jnp.int32),
                                           out, grid, per_bin)
  return _spread(low, high, w_low, w_high, size), per_bin


def _spread(slot_low, slot_high, w_low, w_high, k: int):
  """Tap weights (R, out, n) at slots (R, out, n) in [0, k) -> (R, out, k) sums per slot."""
  slots = jnp.arange(k)
  return (jnp.sum(w_low[..., None] * (slot_low[..., None] == slots), 2)
          + jnp.sum(w_high[..., None] * (slot_high[..., None] == slots), 2))


def _box_extent(boxes, scale, aligned):
  """Horizontal boxes (R, 4) in image pixels -> (start_w, start_h, roi_w, roi_h) in feature
  pixels, mmcv's: corners scaled, shifted by -0.5 with `aligned`, else sides at least 1."""
  offset = 0.5 if aligned else 0.0
  start_w, start_h = boxes[:, 0] * scale - offset, boxes[:, 1] * scale - offset
  roi_w = boxes[:, 2] * scale - offset - start_w
  roi_h = boxes[:, 3] * scale - offset - start_h
  if not aligned:
    roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
  return start_w, start_h, roi_w, roi_h


def _separable_widths(out_h, out_w, grid, sampling_ratio):
  """(K_long, K_short, samples per bin on a wide short side) of the separable gathers: the long
  axis lists two pixels per sample (any box, exact up to `grid`); the short one reads a window
  (exact while it spans <= K pixels; a fixed sampling ratio is always exact)."""
  out = max(out_h, out_w)
  half = grid if sampling_ratio > 0 else max(grid // 2, 1)
  k_long = _tiles(2 * out * grid)
  k_short = k_long if out_h != out_w else _tiles(max(out * grid + 2, 2 * out * half))
  return k_long, k_short, half


def _tiles(k: int) -> int:
  """k rounded up to a multiple of 8: whole (8, 128) tiles, so the gathered pixels need no
  relayout before the matmuls."""
  return -(-k // 8) * 8


def _axis_weights(start, length, size, k, wide_cap, out, grid, sampling_ratio):
  """One axis of a horizontal RoIAlign: mmcv's samples of `out` bins over [start, start + length)
  (feature pixels) on an axis of `size` pixels, as averaging weights over K pixels it reads.

  The K pixels are a window of consecutive pixels when the samples (at most `grid` per bin) span
  at most K of them; otherwise two pixels for each of at most `wide_cap` samples per bin
  (2 * out * wide_cap <= K). Returns weights (R, out, K), the pixel of each of the K (R, K) and
  the samples per bin (R,). Sums of weights, not averages: the caller divides by the 2-D count.
  """
  num = start.shape[0]
  bin_size = length / out
  per_bin = _samples_per_bin(bin_size, grid, sampling_ratio)

  # A window: every pixel the samples touch, when they span at most K.
  low, high, w_low, w_high, inside = _axis_taps(start, bin_size, size, out, grid, per_bin)
  first = jnp.min(jnp.where(inside, low, jnp.iinfo(jnp.int32).max), (1, 2))
  last = jnp.max(jnp.where(inside, high, -1), (1, 2))
  first = jnp.where(last >= 0, first, 0)
  fits = last - first < k
  window_weights = _spread(low - first[:, None, None], high - first[:, None, None], w_low, w_high, k)
  window_pixels = jnp.minimum(first[:, None] + jnp.arange(k), size[:, None] - 1)
  # Wider: two pixels for each of at most wide_cap evenly spaced samples per bin.
  per_bin_wide = jnp.minimum(per_bin, wide_cap)
  low, high, w_low, w_high, _ = _axis_taps(start, bin_size, size, out, wide_cap, per_bin_wide)
  slot = 2 * (jnp.arange(out)[:, None] * wide_cap + jnp.arange(wide_cap)[None, :])[None]
  wide_weights = _spread(slot, slot + 1, w_low, w_high, k)
  wide_pixels = jnp.zeros((num, k), jnp.int32)
  wide_pixels = wide_pixels.at[:, slot.reshape(-1)].set(low.reshape(num, -1))
  wide_pixels = wide_pixels.at[:, slot.reshape(-1) + 1].set(high.reshape(num, -1))
  weights = jnp.where(fits[:, None, None], window_weights, wide_weights)
  pixels = jnp.where(fits[:, None], window_pixels, wide_pixels)
  return weights, pixels, jnp.where(fits, per_bin, per_bin_wide)


def _samples_per_bin(bin_size, grid, sampling_ratio):
  """(R,) samples per bin along one axis: the fixed ratio, or mmcv's adaptive ceil of the bin size
  capped to the static grid."""
  if sampling_ratio > 0:
    return jnp.full(bin_size.shape, sampling_ratio, jnp.int32)
  return jnp.clip(jnp.ceil(bin_size), 0, grid).astype(jnp.int32)


def _axis_taps(start, bin_size, size, out, n, count):
  """Bilinear taps of mmcv's samples along one axis: `out` bins of (R,) `bin_size` feature pixels
  from (R,) `start` on an axis of (R,) `size` pixels, n sample slots per bin of which (R,) `count`
  are used. Returns (R, out, n) pixels (low, high), their weights and whether a sample counts."""
  steps = jnp.arange(n, dtype=jnp.float32) + 0.5
  safe = jnp.maximum(count, 1).astype(jnp.float32)[:, None, None]
  samples = start[:, None, None] + (jnp.arange(out, dtype=jnp.float32)[None, :, None]
                                    + steps[None, None, :] / safe) * bin_size[:, None, None]
  used = jnp.arange(n)[None, None, :] < count[:, None, None]
  size_f = size.astype(jnp.float32)[:, None, None]
  top = size[:, None, None] - 1
  inside = used & (samples >= -1.0) & (samples <= size_f)
  v = jnp.maximum(samples, 0.0)
  low = jnp.floor(v).astype(jnp.int32)
  at_end = low >= top
  low = jnp.where(at_end, top, low)
  v = jnp.where(at_end, low.astype(v.dtype), v)
  high = jnp.where(at_end, low, low + 1)
  frac = v - low
  return low, high, jnp.where(inside, 1.0 - frac, 0.0), jnp.where(inside, frac, 0.0), inside


def _bilinear(flat, base, height, width, y, x, used):
  """mmcv `bilinear_interpolate` at (R, S) points of each box's map, `used` ones only -> (R, S, C)
  in the features' dtype (the four corners summed in float32, then rounded once)."""
  height, width, base = height[:, None], width[:, None], base[:, None]
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
  keep = jnp.where(outside | ~used, 0.0, 1.0)
  read = lambda yi, xi: flat[base + yi * width + xi].astype(jnp.float32)
  value = ((keep * hy * hx)[..., None] * read(y_low, x_low) + (keep * hy * lx)[..., None] * read(y_low, x_high)
           + (keep * ly * hx)[..., None] * read(y_high, x_low) + (keep * ly * lx)[..., None] * read(y_high, x_high))
  return value.astype(flat.dtype)
