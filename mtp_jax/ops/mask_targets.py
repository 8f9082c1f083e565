"""Mask R-CNN mask targets from box-sized mask crops: crop on the host, resize on the device.

mmdet (`FCNMaskHead.get_targets` -> `mask_target_single` -> `BitmapMasks.crop_and_resize`) makes
the target of a positive RoI (x1, y1, x2, y2) matched to ground truth j as mmcv
`roi_align(mask_j as float, roi, (28, 28), spatial_scale 1, sampling_ratio 0, 'avg',
aligned=True) >= 0.5`, reading the full image-sized mask. Shipping full masks costs M x S x S
bytes per image (256 x 448 x 448 = 51 MB); here, as in the TPU Mask R-CNN, the host ships each
mask cropped to its own box at R x R (`crop_masks`, M x R x R bytes), and the device resizes
that crop to the sampled RoIs (`mask_targets`).

Conventions (DESIGN.md §4): boxes are (x1, y1, x2, y2) in continuous pixel-edge image
coordinates, a pixel's centre at (x + 0.5, y + 0.5); masks are at image resolution. RoIAlign is
mmcv's with `aligned=True`: a box's bin j of n covers [x1 + j w / n, x1 + (j + 1) w / n] and
averages k x k bilinear samples at the centres of a k x k sub-grid, k = ceil(box side / n) per
axis (sampling_ratio 0, "adaptive"); a sample reads the mask bilinearly between pixel centres
(mmcv's border rules: outside [-1, H] x [-1, W] in pixel-index coordinates it reads 0, in
[-1, 0] the border pixel). On an axis-aligned grid this is separable: rows, then columns.

`roi_align_masks(masks, boxes, size) -> (M, size, size) float32` (numpy): that RoIAlign, exact
(adaptive grid, no cap); with RoIs and their matched gt masks it is mmdet's target before the
>= 0.5 (the reference of the tests and the benchmark).

`crop_masks(masks (M, H, W), boxes (M, 4), size R) -> (M, R, R) uint8` (numpy, host):
`roi_align_masks` of each mask over its own box, quantised to round(255 v): soft coverage, so a
crop keeps sub-pixel edges. Boxes of zero width or height give zeros (mmcv's empty grid). Cost
on the loaded 2-core development CPU (`benchmarks/mask_target_fidelity.py`), 256 masks at
R = 56: 56 ms for a 1024 px image (boxes 8-256 px), 34 ms for a 448 px one (boxes 8-112 px);
about 0.15-0.2 ms per mask, mostly per-mask numpy overhead.

`mask_targets(crops (G, R, R), crop_boxes (G, 4), rois (S, 4), gt_index (S,), out_size=28,
max_samples=4) -> (S, out_size, out_size) float32 in {0, 1}` (jax, one image, jittable; vmap
over images): each RoI bin averages samples at mmcv's sample points, read from the matched crop:
crop pixel k of a box [b1, b2] sits at b1 + (k + 0.5)(b2 - b1) / R; bilinear between crop
pixel centres, the border crop value beyond the outer centres, tapering linearly to 0 at half a
pixel outside the box (the mask is taken as empty outside its box, and mmcv's bilinear read of
the image-sized mask falls from the border pixel to 0 over that half pixel); then >= 0.5.
Computed as A_y @ crop @ A_x^T with per-axis (out_size, R) averaging matrices: matmuls (at
HIGHEST precision), no per-sample gathers. Samples per bin and axis: mmcv's adaptive
k = ceil(RoI side / out_size), capped at `max_samples` (static; default 4, exact for RoIs up to
112 px; measured, 8 changes nothing at R = 56: a crop has ~2 pixels per target bin, more samples
read no new detail). Rows with gt_index -1 are zeros.

Choice of R = `MASK_CROP_SIZE` = 56 (data_pipelines/instances.py), by measurement
(`python benchmarks/mask_target_fidelity.py --images 24`: synthetic SAMRS training examples
after augmentation, 54 images at 448 px (RoI sides 35-196 px, median 90) and 54 at 128 px
(small objects, 10-49 px, median 24); per instance its gt box and 4 jittered RoIs of IoU >= 0.5;
crops at the tight boxes, as in training; reference: mmdet's full-mask targets):

  R     bytes per image, M = 256   target pixels that differ   mean target IoU   1% worst IoU
  28      200 KB                    0.30 % / 0.30 %              0.994 / 0.994      0.979 / 0.973
  56      803 KB                    0.10 % / 0.10 %              0.998 / 0.998      0.989 / 0.985
  112     3.2 MB                    0.06 % / 0.04 %              0.999 / 0.999      0.992 / 0.991
  (448 px / 128 px images, max_samples 4; dense masks at S = 448: 51 MB; float instead of
  uint8 crops: the same figures to 0.005 %)

R = 56 is within 0.1 % of mmdet's targets for 1/64 of the dense masks' bytes; 112 gains 0.05 %
for 4x the bytes, 28 loses 0.2 %.

Known deviations from mmdet:
  - The mask is taken as empty outside its crop box. In training the box is the mask's tight box
    (augment.crop recomputes it), so this holds; evaluation examples carry annotation boxes,
    which may cut a mask that overflows them.
  - The crop is a resampling: a RoI bin reads interpolated R x R box-bin averages, not the mask's
    own pixels (the 0.1 % above), quantised to 1/255.
  - Bins of RoIs larger than out_size x max_samples px use max_samples evenly spaced samples.
"""

import jax
import jax.numpy as jnp
import numpy as np


# ---------------------------------------------------------------------------------------------
# Host: crop each mask to its box (exact mmcv RoIAlign, numpy)
# ---------------------------------------------------------------------------------------------

def _axis_taps(e1: np.ndarray, e2: np.ndarray, size: int, extent: int):
  """mmcv's aligned adaptive RoIAlign along one axis, for M boxes [e1, e2] at once.

  Returns (start, stop, k, index, weight): the pixels start..stop-1 the samples can touch, the
  samples per bin k (M,), and per bin the taps (M, size, 2 K) (index relative to start, weight;
  two bilinear taps per sample, mmcv's border rules, the 1 / k of the average folded in; unused
  taps have weight 0).
  """
  length = e2 - e1
  k = np.maximum(np.ceil(length / size), 1).astype(np.int64)          # sampling_ratio 0
  kmax = int(k.max(initial=1))
  i = np.arange(kmax)
  used = i[None, :] < k[:, None]                                       # (M, K)
  frac = (np.arange(size)[None, :, None] + ((i[None, :] + 0.5) / k[:, None])[:, None, :])
  pos = (e1 - 0.5)[:, None, None] + frac * (length / size)[:, None, None]   # (M, size, K)
  inside = (pos >= -1.0) & (pos <= extent) & used[:, None, :]
  p = np.clip(pos, 0.0, extent - 1)
  low = np.floor(p)
  w_high = (p - low) * inside / k[:, None, None]
  w_low = inside / k[:, None, None] - w_high
  low = low.astype(np.int64)
  start = np.clip(np.floor(e1 - 0.5), 0, extent - 1).astype(np.int64)
  stop = np.clip(np.floor(e2 - 0.5) + 2, 1, extent).astype(np.int64)
  span = np.maximum(stop - start, 1)[:, None, None]
  low = np.clip(low - start[:, None, None], 0, span - 1)
  high = np.minimum(low + 1, span - 1)
  return (start, stop, k, np.concatenate([low, high], -1),
          np.concatenate([w_low, w_high], -1).astype(np.float32))


def roi_align_masks(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
  """(M, H, W) masks, (M, 4) boxes -> (M, size, size) float32: mmcv `roi_align(mask_i, box_i,
  size, spatial_scale 1, sampling_ratio 0, 'avg', aligned=True)`, exact (mmdet's
  `crop_and_resize` before binarising when boxes are RoIs and masks their matched gt).

  Separable: the rows of each mask's window are sampled first (two taps per sample, averaged
  over the bin's samples), then the columns. The taps of all boxes are computed at once; per
  mask there remain two gathers and two einsums. No BLAS: OpenBLAS's threads on a busy host run
  such small products 100x slower than one thread.
  """
  masks = np.asarray(masks)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  m, h, w = masks.shape
  out = np.zeros((m, size, size), np.float32)
  if not m:
    return out
  r0, r1, ky, iy, wy = _axis_taps(boxes[:, 1], boxes[:, 3], size, h)
  c0, c1, kx, ix, wx = _axis_taps(boxes[:, 0], boxes[:, 2], size, w)
  kmax_y, kmax_x = iy.shape[-1] // 2, ix.shape[-1] // 2
  valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # else mmcv's grid is empty: 0
  for i in np.flatnonzero(valid):
    window = masks[i, r0[i]:r1[i], c0[i]:c1[i]]
    ty = np.r_[0:ky[i], kmax_y:kmax_y + ky[i]]   # this box's taps
    tx = np.r_[0:kx[i], kmax_x:kmax_x + kx[i]]
    rows = np.einsum("st,stc->sc", wy[i][:, ty], window[iy[i][:, ty]])       # (size, cols)
    out[i] = np.einsum("pt,spt->sp", wx[i][:, tx], rows[:, ix[i][:, tx]])
  return out


def crop_masks(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
  """(M, H, W) bool/uint8 masks, (M, 4) boxes -> (M, size, size) uint8: round(255 x mmcv aligned
  RoIAlign of each mask over its box, adaptive sampling). See the module docstring."""
  soft = roi_align_masks(masks, boxes, size)
  return np.rint(np.clip(soft, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Device: resize the crops to the sampled RoIs (jax)
# ---------------------------------------------------------------------------------------------

def _roi_axis_weights(r1, r2, b1, b2, out_size: int, crop_size: int, max_samples: int):
  """(S, out_size, crop_size) averaging matrices along one axis: mmcv's aligned adaptive sample
  points of RoI [r1, r2], read from the crop of `crop_size` pixels over box [b1, b2] (module
  docstring: bilinear between crop pixel centres, tapering to 0 half a pixel outside the box)."""
  length = r2 - r1                                                  # (S,)
  k = jnp.clip(jnp.ceil(length / out_size), 1, max_samples)         # (S,) samples per bin
  i = jnp.arange(max_samples, dtype=jnp.float32)
  used = (i[None, :] < k[:, None]).astype(jnp.float32)              # (S, K)
  frac = (i[None, :] + 0.5) / k[:, None]                            # (S, K)
  bins = jnp.arange(out_size, dtype=jnp.float32)
  x = r1[:, None, None] + (bins[None, :, None] + frac[:, None, :]) * (length / out_size)[:, None, None]
  # x: (S, out, K) sample points in image coordinates (the -0.5 of `aligned` and the +0.5 back
  # from pixel-index coordinates cancel).
  box_len = b2 - b1
  cell = jnp.where(box_len > 0, box_len, 1.0) / crop_size           # crop pixel, image px
  lo, hi, cell = b1[:, None, None], b2[:, None, None], cell[:, None, None]
  v = jnp.clip((x - lo) / cell - 0.5, 0.0, crop_size - 1)           # crop-index coordinates
  ramp = jnp.minimum(cell / 2, 0.5) + 0.5   # from 0 at 0.5 px outside to the border crop value
  taper = jnp.clip((x - lo + 0.5) / ramp, 0.0, 1.0) * jnp.clip((hi + 0.5 - x) / ramp, 0.0, 1.0)
  taps = jnp.arange(crop_size, dtype=jnp.float32)
  w = jnp.maximum(0.0, 1.0 - jnp.abs(v[..., None] - taps))         # (S, out, K, R)
  w = w * (taper * used[:, None, :])[..., None]
  valid = ((length > 0) & (box_len > 0)).astype(jnp.float32)
  return jnp.sum(w, axis=2) * (valid / k)[:, None, None]            # (S, out, R)


def mask_targets(crops, crop_boxes, rois, gt_index, out_size: int = 28, max_samples: int = 4):
  """Binary mask targets of sampled RoIs from their matched ground truth's box crops.

  Args:
    crops: (G, R, R) uint8 (0..255, as `crop_masks` writes) or float in [0, 1].
    crop_boxes: (G, 4) the boxes the crops were taken at (x1, y1, x2, y2), image pixels.
    rois: (S, 4) RoIs, image pixels. gt_index: (S,) int, matched ground truth or -1.
    out_size: target side (mmdet mask_size 28). max_samples: cap of the adaptive samples per
      bin and axis (static; exact for RoIs up to out_size * max_samples px).
  Returns:
    (S, out_size, out_size) float32 in {0, 1}; zeros where gt_index is -1.
  """
  crops = jnp.asarray(crops)
  scale = 1.0 / 255.0 if crops.dtype == jnp.uint8 else 1.0
  size = crops.shape[-1]
  gt_index = jnp.asarray(gt_index, jnp.int32)
  g = jnp.clip(gt_index, 0, crops.shape[0] - 1)
  crop = crops[g].astype(jnp.float32) * scale                      # (S, R, R)
  box = jnp.asarray(crop_boxes, jnp.float32)[g]                     # (S, 4)
  rois = jnp.asarray(rois, jnp.float32)
  ay = _roi_axis_weights(rois[:, 1], rois[:, 3], box[:, 1], box[:, 3], out_size, size, max_samples)
  ax = _roi_axis_weights(rois[:, 0], rois[:, 2], box[:, 0], box[:, 2], out_size, size, max_samples)
  hi = jax.lax.Precision.HIGHEST  # accelerators' default float32 matmul (one bfloat16 pass)
  # moves soft values by ~1e-2 and flips pixels near the 0.5 threshold
  soft = jnp.einsum("sor,src->soc", ay, crop, precision=hi)
  soft = jnp.einsum("soc,spc->sop", soft, ax, precision=hi)
  return ((soft >= 0.5) & (gt_index >= 0)[:, None, None]).astype(jnp.float32)

