"""Greedy non-maximum suppression with static shapes: horizontal `nms` and `nms_rotated`.

Semantics (mmcv / torchvision): boxes are visited by decreasing score, ties in input order; a box
is kept unless a kept box of the same class (with `classes`) overlaps it with IoU strictly greater
than `iou_threshold`. The result is the first `max_outputs` kept indices into the input, in that
visiting order, padded with -1, and the number of valid entries.

Tiled formulation (as TensorFlow's padded NMS): the sorted boxes are cut into tiles of
`tile_size`. A tile is first suppressed by the kept boxes of all earlier tiles (one (T, T) IoU
block per earlier tile), then resolved inside itself by iterating "kept = alive and not
suppressed by a kept earlier box of the tile" to its fixed point, which is exactly the greedy
answer (after k rounds the first k boxes are final). Work is O(N^2 / 2) IoUs in dense (T, T)
blocks, no per-box loop, and the loop stops as soon as `max_outputs` boxes are kept or the tiles
left hold only invalid (padding) boxes: the cost follows the number of valid boxes, not N (the
detectors pad their candidates to a static count, most of them invalid at test time).

Class-aware NMS compares classes instead of offsetting boxes by class: offsets of thousands of
pixels would cost float32 precision in the IoU. Leading batch dimensions are vmapped.
"""

import functools

import jax
import jax.numpy as jnp

from mtp_jax.ops.iou import box_iou, box_iou_rotated


def nms(boxes, scores, iou_threshold, max_outputs, *, classes=None, valid=None, tile_size=256):
  """NMS of horizontal boxes (..., N, 4) (x1, y1, x2, y2) with scores (..., N).

  Args:
    iou_threshold: suppress when IoU > this (a Python float or a traced scalar).
    max_outputs: static number of returned indices.
    classes: optional (..., N) integer classes; boxes of different classes never suppress.
    valid: optional (..., N) bool; invalid (padding) boxes are neither kept nor suppress.
    tile_size: static tile edge; larger tiles suit accelerators, smaller ones CPUs.
  Returns:
    (indices (..., max_outputs) int32 padded with -1, count (...) int32).
  """
  return _batched(boxes, scores, classes, valid, iou_threshold, max_outputs, tile_size, box_iou, 4)


def nms_rotated(boxes, scores, iou_threshold, max_outputs, *, classes=None, valid=None,
                tile_size=256):
  """NMS of rotated boxes (..., N, 5) (cx, cy, w, h, angle) by exact rotated IoU; see `nms`."""
  iou = functools.partial(box_iou_rotated, row_tile=tile_size)
  return _batched(boxes, scores, classes, valid, iou_threshold, max_outputs, tile_size, iou, 5)


def _batched(boxes, scores, classes, valid, iou_threshold, max_outputs, tile_size, iou_fn, dim):
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  if boxes.shape[-1] != dim or boxes.shape[:-1] != scores.shape:
    raise ValueError(f"NMS expects boxes (..., N, {dim}) and scores (..., N); got {boxes.shape} "
                     f"and {scores.shape}")
  classes = jnp.zeros(scores.shape, jnp.int32) if classes is None else jnp.asarray(classes)
  valid = jnp.ones(scores.shape, bool) if valid is None else jnp.asarray(valid, bool)
  fn = functools.partial(_nms_single, iou_fn=iou_fn, max_outputs=max_outputs, tile=tile_size)
  for _ in range(scores.ndim - 1):
    fn = jax.vmap(fn, in_axes=(0, 0, 0, 0, None))
  return fn(boxes, scores, classes, valid, jnp.asarray(iou_threshold, jnp.float32))


def _nms_single(boxes, scores, classes, valid, iou_threshold, *, iou_fn, max_outputs, tile):
  n = scores.shape[0]
  if n == 0:
    return jnp.full((max_outputs,), -1, jnp.int32), jnp.int32(0)
  tile = min(tile, n)
  num_tiles = -(-n // tile)
  pad = num_tiles * tile - n
  # Decreasing score, ties by input index (a stable sort of the negated scores).
  order = jnp.argsort(-jnp.where(valid, scores, -jnp.inf), stable=True).astype(jnp.int32)
  boxes_s = jnp.pad(boxes[order], ((0, pad), (0, 0)))
  classes_s = jnp.pad(classes[order], (0, pad))
  valid_s = jnp.pad(valid[order], (0, pad))
  tiles = lambda x: x.reshape(num_tiles, tile, *x.shape[1:])
  boxes_t, classes_t, valid_t = tiles(boxes_s), tiles(classes_s), tiles(valid_s)
  earlier = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]     # row j before column i

  def suppresses(rows_boxes, rows_classes, cols_boxes, cols_classes):
    overlap = iou_fn(rows_boxes, cols_boxes) > iou_threshold
    return overlap & (rows_classes[:, None] == cols_classes[None, :])

  def process_tile(state):
    i, kept, count = state
    kept_t = kept.reshape(num_tiles, tile)

    # Blocks (j, i) for j <= i through one IoU call site (halves compile time): earlier tiles'
    # kept boxes suppress; block (i, i) is kept for the in-tile pass (tile i has no kept yet).
    def by_tile(j, carry):
      suppressed, inner = carry
      block = suppresses(boxes_t[j], classes_t[j], boxes_t[i], classes_t[i])
      suppressed = suppressed | (block & kept_t[j][:, None]).any(0)
      return suppressed, jnp.where(j == i, block, inner)

    suppressed, inner = jax.lax.fori_loop(
        0, i + 1, by_tile, (jnp.zeros(tile, bool), jnp.zeros((tile, tile), bool)))
    alive = valid_t[i] & ~suppressed
    inner = inner & earlier

    def step(state):
      keep, _ = state
      new = alive & ~(inner & keep[:, None]).any(0)
      return new, (new != keep).any()

    keep, _ = jax.lax.while_loop(lambda s: s[1], step, (alive, jnp.bool_(True)))
    kept = jax.lax.dynamic_update_slice(kept, keep, (i * tile,))
    return i + 1, kept, count + keep.sum(dtype=jnp.int32)

  # Tiles after the last valid box hold only padding, which is never kept: stop before them.
  valid_tiles = jnp.max(jnp.where(valid_s, jnp.arange(num_tiles * tile) // tile + 1, 0))
  _, kept, count = jax.lax.while_loop(
      lambda s: (s[0] < valid_tiles) & (s[2] < max_outputs), process_tile,
      (jnp.int32(0), jnp.zeros(num_tiles * tile, bool), jnp.int32(0)))
  (positions,) = jnp.nonzero(kept, size=max_outputs, fill_value=-1)
  indices = jnp.where(positions >= 0, order[jnp.clip(positions, 0, n - 1)], -1)
  return indices.astype(jnp.int32), jnp.minimum(count, max_outputs)
