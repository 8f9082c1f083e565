"""Mask R-CNN mask pasting on the host: (K, 28, 28) probabilities in box frames -> (K, H, W) image masks.

Reproduces mmdet 3.x `FCNMaskHead._predict_by_feat_single` on the CPU (one detection per chunk,
`_do_paste_mask(..., skip_empty=True)`) bit for bit, in numpy and vectorised over detections:

  for each detection with box (x0, y0, x1, y1) (float32, pixels, not clipped, not rounded):
    window  cols [max(floor(x0) - 1, 0), min(ceil(x1) + 1, W)), rows likewise with y and H;
    pixel centre x + 0.5 -> gx = (x + 0.5 - x0) / (x1 - x0) * 2 - 1 (float32; +-inf -> 0, as mmdet;
    a 0/0 stays NaN and samples NaN, i.e. background);
    F.grid_sample(bilinear, zeros padding, align_corners=False) of its map at (gx, gy), with the
    arithmetic of torch's vectorised CPU kernel: u = (gx + 1) * (S / 2) - 0.5, corner weights
    (1 - fy)(1 - fx) ..., sum in the order nw + ne + sw + se, out-of-map corners read as 0;
    mask = value >= threshold inside the window, False outside it.

torch's AVX2 / AVX512 builds compile the unnormalisation and the three additions of that sum as
fused multiply-adds; `_fma32` reproduces them exactly, so the sampled values equal torch's bit for
bit (tests/test_mask_paste.py). A torch build without FMA (ATEN_CPU_CAPABILITY=default) rounds each
product and lands within ~1e-6 of these values; only a value within that of the threshold can flip.

`mask_probs` are probabilities (mmdet applies the sigmoid to the logits first and selects the map of
the detection's class, `mask_preds[range(N), labels]`; pass `labels` with a (K, C, S, S) array to
have that done here). Boxes are in the output image's pixel frame (mmdet divides by the scale factor
first when rescaling to the original image).

Deliberate deviation (documented, untested by mmdet): a window that starts past its end (a box lying
wholly right of or below the image; torch.arange raises there) pastes nothing here. mmdet's bbox head
clips boxes to the image before the mask head, so real detections never reach that case.

The GPU path of mmdet (skip_empty=False, whole image) differs from this only where a value outside
the box's 1-pixel margin reaches the threshold; with threshold 0.5 and probabilities <= 1 that cannot
happen (beyond the box edge the bilinear tail is below half the edge cell's value).
"""

import numpy as np
from pycocotools import mask as mask_utils

_CHUNK_ELEMENTS = 1 << 21   # window pixels per vectorised chunk (bounds the temporaries, ~100 MB)


def _fma32(a, b, c):
  """float32 a * b + c rounded once (a fused multiply-add), exactly. The product is exact in float64;
  rounding the float64 sum to float32 is a second rounding that can only be wrong when that sum lies
  exactly on a float32 midpoint (low 29 mantissa bits 1000...0) and was itself inexact: those rare
  elements are redone with the sum's exact error (TwoSum)."""
  p = np.multiply(a, b, dtype=np.float64)
  s = p + c
  r = s.astype(np.float32)
  mid = (s.view(np.int64) & 0x1FFFFFFF) == 0x10000000
  if mid.any():
    pm, sm = p[mid], s[mid]
    cm = np.broadcast_to(c, s.shape)[mid].astype(np.float64) if np.ndim(c) else np.float64(c)
    bm = sm - pm
    err = (pm - (sm - bm)) + (cm - bm)
    rm = r[mid]
    toward = np.nextafter(rm, np.where(sm > rm, np.inf, -np.inf).astype(np.float32))
    r[mid] = np.where((err != 0) & ((err > 0) == (toward > rm)), toward, rm)
  return r


def _axis_params(lo, hi, start, length, size):
  """Per detection and window column (K, L): west (north) cell index clipped to [-2, size] (the
  cells beyond the map are zero padding), and the weights of the west and east (north, south) cells."""
  f32 = np.float32
  pix = (start[:, None] + np.arange(length)[None, :]).astype(f32) + f32(0.5)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    g = (pix - lo[:, None]) / (hi - lo)[:, None] * f32(2) - f32(1)
    g[np.isinf(g)] = 0
    u = _fma32(g + f32(1), f32(size / 2), f32(-0.5))
    base = np.floor(u)
    frac = u - base          # weight of the east (south) cell
    rest = f32(1) - frac     # weight of the west (north) cell
    # a NaN or far-away coordinate reads padding only (torch's int cast masks it out); its weights
    # stay NaN, so its value is NaN, as in torch
    i0 = np.minimum(np.fmax(base, f32(-2)), f32(size)).astype(np.int64)
  return i0, rest, frac


def _prepare(mask_probs, boxes, labels):
  probs = np.asarray(mask_probs, np.float32)
  if labels is not None:
    probs = probs[np.arange(len(probs)), np.asarray(labels, np.int64).reshape(-1)]
  if probs.ndim != 3 or probs.shape[1] != probs.shape[2]:
    raise ValueError(f"paste_masks: mask_probs must be (K, S, S) (or (K, C, S, S) with labels), got {probs.shape}")
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  if len(boxes) != len(probs):
    raise ValueError(f"paste_masks: {len(probs)} masks but {len(boxes)} boxes")
  return probs, boxes


def _chunks(order, rows, cols):
  """Consecutive runs of `order` (largest windows first) whose padded (n, max rows, max cols) block
  stays within 1.5x their pixels plus 16k, and within _CHUNK_ELEMENTS."""
  start = 0
  while start < len(order):
    hh = ww = pixels = 0
    stop = start
    while stop < len(order):
      d = order[stop]
      h2, w2 = max(hh, rows[d]), max(ww, cols[d])
      padded = (stop - start + 1) * h2 * w2
      if stop > start and (padded > _CHUNK_ELEMENTS or padded > 1.5 * (pixels + rows[d] * cols[d]) + 16384):
        break
      hh, ww, pixels, stop = h2, w2, pixels + rows[d] * cols[d], stop + 1
    yield order[start:stop], int(hh), int(ww)
    start = stop


def _sampled_windows(probs, boxes, height, width):
  """Yields (detection, row slice, col slice, float32 window of sampled values) for every detection
  with a non-empty window, vectorised over chunks of detections of similar window size."""
  k, size = len(probs), probs.shape[1]
  x0, y0, x1, y1 = boxes.T
  with np.errstate(invalid="ignore"):
    c0 = np.maximum(np.floor(x0) - 1, 0).astype(np.int64)
    r0 = np.maximum(np.floor(y0) - 1, 0).astype(np.int64)
    c1 = np.minimum(np.ceil(x1) + 1, width).astype(np.int64)
    r1 = np.minimum(np.ceil(y1) + 1, height).astype(np.int64)
  cols, rows = np.maximum(c1 - c0, 0), np.maximum(r1 - r0, 0)
  nonempty = np.flatnonzero(rows * cols > 0)
  order = nonempty[np.argsort(-(rows * cols)[nonempty], kind="stable")]
  side = size + 4    # two cells of zero padding on each side
  padded = np.zeros((k, side, side), np.float32)
  padded[:, 2:-2, 2:-2] = probs
  flat = padded.reshape(-1)
  for idx, hh, ww in _chunks(order, rows, cols):
    ix, e, w = _axis_params(x0[idx], x1[idx], c0[idx], ww, size)
    iy, s, n = _axis_params(y0[idx], y1[idx], r0[idx], hh, size)
    nw_cell = ((idx * side * side)[:, None, None] + ((iy + 2) * side)[:, :, None] + (ix + 2)[:, None, :])
    total = None
    # torch's order: nw_val * (s * e) + ne_val * (s * w) + sw_val * (n * e) + se_val * (n * w), the
    # three additions fused with their products as its AVX2 build compiles them
    for offset, wy, wx in ((0, s, e), (1, s, w), (side, n, e), (side + 1, n, w)):
      val = flat[nw_cell + offset] if offset else flat[nw_cell]
      with np.errstate(invalid="ignore", over="ignore"):
        weight = wy[:, :, None] * wx[:, None, :]
        total = val * weight if total is None else _fma32(val, weight, total)
    for j, d in enumerate(idx):
      yield d, slice(r0[d], r1[d]), slice(c0[d], c1[d]), total[j, :rows[d], :cols[d]]


def paste_masks(mask_probs, boxes, height: int, width: int, threshold: float = 0.5, labels=None):
  """(K, S, S) probabilities (or (K, C, S, S) with `labels`), (K, 4) x1 y1 x2 y2 boxes ->
  (K, height, width) bool, as mmdet's CPU mask pasting (module docstring)."""
  probs, boxes = _prepare(mask_probs, boxes, labels)
  out = np.zeros((len(probs), height, width), bool)
  thr = np.float32(threshold)
  for d, rows, cols, values in _sampled_windows(probs, boxes, height, width):
    with np.errstate(invalid="ignore"):
      out[d, rows, cols] = values >= thr
  return out


def paste_mask_values(mask_probs, boxes, height: int, width: int, labels=None):
  """The sampled float32 values before the threshold, (K, height, width), 0 outside each window
  (for visualisation, and to test the sampling bit for bit)."""
  probs, boxes = _prepare(mask_probs, boxes, labels)
  out = np.zeros((len(probs), height, width), np.float32)
  for d, rows, cols, values in _sampled_windows(probs, boxes, height, width):
    out[d, rows, cols] = values
  return out


def masks_to_rles(masks) -> list:
  """(K, H, W) binary masks -> K COCO RLE dicts {"size": [H, W], "counts": ascii str}."""
  masks = np.asarray(masks)
  if masks.ndim != 3:
    raise ValueError(f"masks_to_rles: masks must be (K, H, W), got {masks.shape}")
  if len(masks) == 0:
    return []
  rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
  for rle in rles:
    rle["counts"] = rle["counts"].decode("ascii")
  return rles
