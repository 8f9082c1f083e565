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
left hold only invalid (padding) boxes: the cost follows the number of valid boxes, not N.

`by_class` visits the valid boxes class after class (each class by decreasing score). Greedy NMS
of one class never looks at another, so the kept set is the same, and the first `max_outputs`
kept in visiting order are picked at the end; a tile is compared only with the earlier tiles
that share a class with it, so C balanced classes cost about 1 / C of the blocks. This is
`mmcv/ops/nms.py` `batched_nms`'s split_thr path (NMS class by class when there are many boxes).

Class-aware NMS compares classes instead of offsetting boxes by class: offsets of thousands of
pixels would cost float32 precision in the IoU. Leading batch dimensions are vmapped.
"""

import functools

import jax
import jax.numpy as jnp

from mtp_jax.ops.iou import box_iou, box_iou_rotated


def nms(boxes, scores, iou_threshold, max_outputs, *, classes=None, valid=None, tile_size=256,
        by_class=False):
  """NMS of horizontal boxes (..., N, 4) (x1, y1, x2, y2) with scores (..., N).

  Args:
    iou_threshold: suppress when IoU > this (a Python float or a traced scalar).
    max_outputs: static number of returned indices.
    classes: optional (..., N) integer classes; boxes of different classes never suppress.
    valid: optional (..., N) bool; invalid (padding) boxes are neither kept nor suppress.
    tile_size: static tile edge; larger tiles suit accelerators, smaller ones CPUs.
    by_class: visit the classes one after the other (same result): tiles of different classes
      are never compared, at the price of not stopping early at max_outputs. Pays off when
      `classes` holds several classes and most boxes are valid.
  Returns:
    (indices (..., max_outputs) int32 padded with -1, count (...) int32).
  """
  return _batched(boxes, scores, classes, valid, iou_threshold, max_outputs, tile_size, box_iou, 4,
                  by_class)


def nms_rotated(boxes, scores, iou_threshold, max_outputs, *, classes=None, valid=None,
                tile_size=256, by_class=False):
  """NMS of rotated boxes (..., N, 5) (cx, cy, w, h, angle) by exact rotated IoU; see `nms`."""
  iou = functools.partial(box_iou_rotated, row_tile=tile_size)
  return _batched(boxes, scores, classes, valid, iou_threshold, max_outputs, tile_size, iou, 5,
                  by_class)


def _batched(boxes, scores, classes, valid, iou_threshold, max_outputs, tile_size, iou_fn, dim,
             by_class):
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  if boxes.shape[-1] != dim or boxes.shape[:-1] != scores.shape:
    raise ValueError(f"NMS expects boxes (..., N, {dim}) and scores (..., N); got {boxes.shape} "
                     f"and {scores.shape}")
  classes = jnp.zeros(scores.shape, jnp.int32) if classes is None else jnp.asarray(classes)
  valid = jnp.ones(scores.shape, bool) if valid is None else jnp.asarray(valid, bool)
  fn = functools.partial(_nms_single, iou_fn=iou_fn, max_outputs=max_outputs, tile=tile_size,
                         by_class=by_class)
  for _ in range(scores.ndim - 1):
    fn = jax.vmap(fn, in_axes=(0, 0, 0, 0, None))
  return fn(boxes, scores, classes, valid, jnp.asarray(iou_threshold, jnp.float32))


def _nms_single(boxes, scores, classes, valid, iou_threshold, *, iou_fn, max_outputs, tile,
                by_class):
  n = scores.shape[0]
  if n == 0:
    return jnp.full((max_outputs,), -1, jnp.int32), jnp.int32(0)
  tile = min(tile, n)
  num_tiles = -(-n // tile)
  pad = num_tiles * tile - n
  # Visiting order: decreasing score, ties by input index (a stable sort of the negated scores).
  visit = jnp.argsort(-jnp.where(valid, scores, -jnp.inf), stable=True).astype(jnp.int32)
  order = _class_major(visit, classes, valid) if by_class else visit
  boxes_s = jnp.pad(boxes[order], ((0, pad), (0, 0)))
  classes_s = jnp.pad(classes[order], (0, pad))
  valid_s = jnp.pad(valid[order], (0, pad))
  tiles = lambda x: x.reshape(num_tiles, tile, *x.shape[1:])
  boxes_t, classes_t, valid_t = tiles(boxes_s), tiles(classes_s), tiles(valid_s)
  earlier = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]     # row j before column i
  # First earlier tile that can suppress tile i: class-major, the first whose classes reach tile
  # i's smallest class (the tiles' class ranges only grow); otherwise tile 0.
  first_tile = (_first_shared_tile(classes_t, valid_t) if by_class
                else jnp.zeros(num_tiles, jnp.int32))

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
        first_tile[i], i + 1, by_tile, (jnp.zeros(tile, bool), jnp.zeros((tile, tile), bool)))
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
  # In visiting order, stop too once max_outputs boxes are kept (later ones are not returned).
  valid_tiles = jnp.max(jnp.where(valid_s, jnp.arange(num_tiles * tile) // tile + 1, 0))
  enough = (lambda count: jnp.bool_(False)) if by_class else (lambda count: count >= max_outputs)
  _, kept, count = jax.lax.while_loop(
      lambda s: (s[0] < valid_tiles) & ~enough(s[2]), process_tile,
      (jnp.int32(0), jnp.zeros(num_tiles * tile, bool), jnp.int32(0)))
  if by_class:
    return _first_in_visiting_order(kept[:n], order, visit, max_outputs)
  (positions,) = jnp.nonzero(kept, size=max_outputs, fill_value=-1)
  indices = jnp.where(positions >= 0, order[jnp.clip(positions, 0, n - 1)], -1)
  return indices.astype(jnp.int32), jnp.minimum(count, max_outputs)


def _class_major(visit, classes, valid):
  """(N,) int32 permutation: valid boxes by increasing class, each class in visiting order
  `visit`; invalid boxes last. Greedy NMS of one class never looks at another class, so visiting
  the classes one after the other keeps exactly the boxes that the visiting order keeps."""
  key = jnp.where(valid, classes, jnp.iinfo(jnp.int32).max)[visit]
  return visit[jnp.argsort(key, stable=True)].astype(jnp.int32)


def _first_shared_tile(classes_t, valid_t):
  """(num_tiles,) int32: for class-major tiles (num_tiles, T), the first tile whose valid boxes
  reach the smallest class of tile i; earlier tiles hold only smaller classes and cannot suppress
  anything in tile i. Tiles without valid boxes come last and are never processed."""
  big = jnp.iinfo(jnp.int32).max
  smallest = jnp.where(valid_t, classes_t, big).min(1)
  largest = jnp.where(valid_t, classes_t, -1).max(1)
  largest = jnp.where(valid_t.any(1), largest, big)             # keeps the ranges sorted
  return (largest[None, :] < smallest[:, None]).sum(1).astype(jnp.int32)


def _first_in_visiting_order(kept, order, visit, max_outputs):
  """The first max_outputs kept boxes in visiting order, from flags `kept` (N,) over the
  class-major positions `order`: (indices (max_outputs,) int32 padded with -1, count)."""
  n = kept.shape[0]
  rank = jnp.zeros(n, jnp.int32).at[visit].set(jnp.arange(n, dtype=jnp.int32))
  ranks = jnp.sort(jnp.where(kept, rank[order], n))
  ranks = jnp.pad(ranks, (0, max(max_outputs - n, 0)), constant_values=n)[:max_outputs]
  indices = jnp.where(ranks < n, visit[jnp.minimum(ranks, n - 1)], -1)
  return indices.astype(jnp.int32), jnp.minimum(kept.sum(dtype=jnp.int32), max_outputs)
