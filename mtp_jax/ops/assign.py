"""Max-IoU assignment and fixed-count random sampling (mmdet `MaxIoUAssigner`, `RandomSampler`).

Static shapes: ground truth is padded to G boxes with `gt_valid`, priors (anchors or proposals)
to N with `prior_valid`. An assignment is an int32 (N,) array: -1 ignored, 0 negative, k + 1
positive for ground-truth box k. Both two-stage heads use these with their own IoU: Mask R-CNN
and the oriented RPN horizontal `box_iou` (of the rotated ground truth's enclosing boxes, as
mmrotate's `RBbox2HBboxOverlaps2D`), the oriented R-CNN `box_iou_rotated`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Assignment(NamedTuple):
  gt_index: jax.Array       # (N,) int32: -1 ignore, 0 negative, k + 1 matched to gt k
  max_overlaps: jax.Array   # (N,) float: best IoU with any valid gt (-1 without gt)


class Sample(NamedTuple):
  indices: jax.Array        # (num,) int32 prior indices: positives first, then negatives
  positive: jax.Array       # (num,) bool
  valid: jax.Array          # (num,) bool: False for unfilled slots (too few candidates)
  num_positive: jax.Array   # () int32
  num_negative: jax.Array   # () int32


def max_iou_assign(overlaps, gt_valid, prior_valid, pos_iou_thr, neg_iou_thr, min_pos_iou=0.0,
                   match_low_quality=True, gt_max_assign_all=True):
  """mmdet `MaxIoUAssigner.assign_wrt_overlaps` on a padded (G, N) IoU matrix.

  1. Priors whose best IoU is in [0, neg_iou_thr) (or in [lo, hi) for a tuple) become negative.
  2. Priors whose best IoU is >= pos_iou_thr go to their best gt (lowest index on ties).
  3. With `match_low_quality`, each gt k whose best IoU is >= min_pos_iou also takes the priors
     reaching that best IoU (all of them with `gt_max_assign_all`, else its first), later gts
     overriding earlier ones, as mmdet's loop over gts does.
  Without any valid gt every valid prior is negative. Invalid priors are always ignored (-1).
  """
  overlaps = jnp.asarray(overlaps, jnp.float32)
  num_gt, num_priors = overlaps.shape
  gt_valid = jnp.asarray(gt_valid, bool)
  prior_valid = jnp.asarray(prior_valid, bool)
  overlaps = jnp.where(gt_valid[:, None], overlaps, -1.0)
  max_overlaps = overlaps.max(0) if num_gt else jnp.full((num_priors,), -1.0)
  argmax = overlaps.argmax(0) if num_gt else jnp.zeros((num_priors,), jnp.int32)
  gt_index = jnp.full((num_priors,), -1, jnp.int32)
  lo, hi = (0.0, neg_iou_thr) if not isinstance(neg_iou_thr, (tuple, list)) else neg_iou_thr
  gt_index = jnp.where((max_overlaps >= lo) & (max_overlaps < hi), 0, gt_index)
  gt_index = jnp.where(max_overlaps >= pos_iou_thr, argmax.astype(jnp.int32) + 1, gt_index)
  if match_low_quality and num_gt:
    masked = jnp.where(prior_valid[None, :], overlaps, -1.0)
    gt_max = masked.max(1)                                           # (G,)
    eligible = gt_valid & (gt_max >= min_pos_iou)
    if gt_max_assign_all:
      hits = (masked == gt_max[:, None]) & eligible[:, None]
    else:
      hits = jax.nn.one_hot(masked.argmax(1), num_priors, dtype=bool) & eligible[:, None]
    last = num_gt - 1 - jnp.argmax(hits[::-1], axis=0)               # last gt hitting the prior
    gt_index = jnp.where(hits.any(0), last.astype(jnp.int32) + 1, gt_index)
  gt_index = jnp.where(gt_valid.any(), gt_index, 0)
  gt_index = jnp.where(prior_valid, gt_index, -1)
  return Assignment(gt_index, max_overlaps)


def prepend_gt_as_proposals(assignment, gt_valid):
  """mmdet `add_gt_as_proposals`: the assignment of [gt boxes; priors], each gt matched to itself.

  The caller concatenates the boxes the same way (gt first). Padding gts are ignored (-1).
  """
  gt_valid = jnp.asarray(gt_valid, bool)
  own = jnp.where(gt_valid, jnp.arange(1, gt_valid.shape[0] + 1, dtype=jnp.int32), -1)
  return Assignment(jnp.concatenate([own, assignment.gt_index]),
                    jnp.concatenate([jnp.where(gt_valid, 1.0, -1.0), assignment.max_overlaps]))


def random_sample(key, gt_index, num, pos_fraction, neg_pos_ub=-1):
  """mmdet `RandomSampler`: up to int(num * pos_fraction) random positives, then random negatives
  to fill `num` (at most neg_pos_ub * max(1, positives) with neg_pos_ub >= 0).

  Uniform without replacement, by ranking i.i.d. keys; fixed output size with a `valid` mask.
  mmdet returns each part sorted by index; the order here is random, which no loss depends on.
  """
  num_pos_max = int(num * pos_fraction)
  pos_key, neg_key = jax.random.split(key)
  is_pos, is_neg = gt_index > 0, gt_index == 0
  # Smallest keys win; non-candidates get +inf so they rank last.
  pos_rank_key = jnp.where(is_pos, jax.random.uniform(pos_key, gt_index.shape), jnp.inf)
  neg_rank_key = jnp.where(is_neg, jax.random.uniform(neg_key, gt_index.shape), jnp.inf)
  _, pos_idx = jax.lax.top_k(-pos_rank_key, min(num_pos_max, gt_index.shape[0]))
  _, neg_idx = jax.lax.top_k(-neg_rank_key, min(num, gt_index.shape[0]))
  num_pos = jnp.minimum(is_pos.sum(dtype=jnp.int32), num_pos_max)
  num_neg = num - num_pos
  if neg_pos_ub >= 0:
    bound = jnp.floor(neg_pos_ub * jnp.maximum(num_pos, 1).astype(jnp.float32)).astype(jnp.int32)
    num_neg = jnp.minimum(num_neg, bound)
  num_neg = jnp.minimum(num_neg, is_neg.sum(dtype=jnp.int32))
  slots = jnp.arange(num, dtype=jnp.int32)
  from_pos = slots < num_pos
  pos_part = pos_idx[jnp.clip(slots, 0, pos_idx.shape[0] - 1)] if pos_idx.shape[0] else slots
  neg_part = neg_idx[jnp.clip(slots - num_pos, 0, neg_idx.shape[0] - 1)]
  indices = jnp.where(from_pos, pos_part, neg_part).astype(jnp.int32)
  valid = slots < num_pos + num_neg
  return Sample(jnp.where(valid, indices, 0), from_pos & valid, valid, num_pos, num_neg)
