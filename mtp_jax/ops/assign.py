"""Max-IoU assignment and fixed-count random sampling (mmdet `MaxIoUAssigner`, `RandomSampler`).

Static shapes: ground truth is padded to G boxes with `gt_valid`, priors (anchors or proposals)
to N with `prior_valid`. An assignment is an int32 (N,) array: -1 ignored, 0 negative, k + 1
positive for ground-truth box k. `max_iou_assign_blocked` takes the IoU function instead of the
matrix and works through the priors block by block (the RPN's 1000 x 261,888 matrix at 1024 px
would be 1 GiB per float32 copy); `max_iou_assign` is the same rules on a given matrix, as one
block. Both two-stage heads use these with their own IoU: Mask R-CNN and the oriented RPN
horizontal `box_iou` (of the rotated ground truth's enclosing boxes, as mmrotate's `RBbox2HBboxOverlaps2D`), the oriented R-CNN `box_iou_rotated`.
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
  """`max_iou_assign_blocked` on a precomputed padded (G, N) IoU matrix, as one block of N priors.

  For N in the hundreds of thousands (anchors) pass the IoU function and the boxes to
  `max_iou_assign_blocked` instead, which never holds a (G, N) array.
  """
  overlaps = jnp.asarray(overlaps, jnp.float32)
  return max_iou_assign_blocked(_columns_of, None, overlaps.T, gt_valid, prior_valid, pos_iou_thr,
                                neg_iou_thr, min_pos_iou, match_low_quality, gt_max_assign_all)


def _columns_of(_, overlaps_t_block):
  """IoU "function" of a precomputed matrix: its (B, G) transposed rows back to (G, B)."""
  return overlaps_t_block.T


def max_iou_assign_blocked(iou_fn, gts, priors, gt_valid, prior_valid, pos_iou_thr, neg_iou_thr,
                           min_pos_iou=0.0, match_low_quality=True, gt_max_assign_all=True,
                           block_size=None):
  """mmdet `MaxIoUAssigner.assign_wrt_overlaps` with overlaps = iou_fn(gts, priors), computed
  over blocks of `block_size` priors so that no (G, N) array exists.

  1. Priors whose best IoU is in [0, neg_iou_thr) (or in [lo, hi) for a tuple) become negative.
  2. Priors whose best IoU is >= pos_iou_thr go to their best gt (lowest index on ties).
  3. With `match_low_quality`, each gt k whose best IoU is >= min_pos_iou also takes the priors
     reaching that best IoU (all of them with `gt_max_assign_all`, else its first), later gts
     overriding earlier ones, as mmdet's loop over gts does.
  Without any valid gt every valid prior is negative. Invalid priors are always ignored (-1);
  a gt's best IoU is over valid priors only.

  Args:
    iou_fn: (gts, (B, ...) block of priors) -> (G, B) IoU; called on zero-padded blocks, the
      padding rows being invalid priors. Pure, so both passes below see identical values.
    gts: whatever `iou_fn` takes for the ground truth (e.g. (G, 4) boxes), padded.
    priors: (N, ...) boxes (e.g. (N, 4) anchors). gt_valid: (G,) bool. prior_valid: (N,) bool.
    block_size: priors per block (None: one block of all N). N is padded up to a multiple.
  Returns:
    `Assignment` with (N,) gt_index and max_overlaps; identical for every block size.

  Two passes over the blocks: the first gives each prior its best IoU and gt, and each gt its best
  IoU over valid priors (with the first prior reaching it); the second recomputes each block's
  IoU to find the priors reaching a gt's best IoU (float equality on the same values). Memory:
  a few (G, block_size) float32 arrays at a time. Long because the rules above and the two
  passes that keep them exact are best read beside each other (the code is about 45 lines).
  """
  gt_valid = jnp.asarray(gt_valid, bool)
  prior_valid = jnp.asarray(prior_valid, bool)
  num_gt, num_priors = gt_valid.shape[0], prior_valid.shape[0]
  if num_gt == 0:
    return Assignment(jnp.where(prior_valid, 0, -1).astype(jnp.int32),
                      jnp.full((num_priors,), -1.0, jnp.float32))
  block = max(1, min(block_size or num_priors, num_priors))
  num_blocks = max(1, -(-num_priors // block))
  blocks, valid_blocks = _split_blocks(priors, prior_valid, block, num_blocks)
  starts = jnp.arange(num_blocks, dtype=jnp.int32) * block

  def overlaps_of(prior_block, valid_block):
    """(G, B) IoU, -1 at invalid gts; and the same with -1 at invalid priors ("masked")."""
    # The barrier keeps the IoU one computation in both passes (no pass fuses it differently).
    iou = jax.lax.optimization_barrier(jnp.asarray(iou_fn(gts, prior_block), jnp.float32))
    overlaps = jnp.where(gt_valid[:, None], iou, -1.0)
    return overlaps, jnp.where(valid_block[None, :], overlaps, -1.0)

  def best_per_prior_and_gt(args):
    overlaps, masked = overlaps_of(*args)
    return (overlaps.max(0), overlaps.argmax(0).astype(jnp.int32),
            masked.max(1), masked.argmax(1).astype(jnp.int32))

  max_ov, argmax, block_gt_max, block_gt_argmax = _map_blocks(
      best_per_prior_and_gt, (blocks, valid_blocks))
  max_overlaps = max_ov.reshape(-1)[:num_priors]
  argmax = argmax.reshape(-1)[:num_priors]
  gt_index = jnp.full((num_priors,), -1, jnp.int32)
  lo, hi = (0.0, neg_iou_thr) if not isinstance(neg_iou_thr, (tuple, list)) else neg_iou_thr
  gt_index = jnp.where((max_overlaps >= lo) & (max_overlaps < hi), 0, gt_index)
  gt_index = jnp.where(max_overlaps >= pos_iou_thr, argmax + 1, gt_index)
  if match_low_quality:
    gt_max = block_gt_max.max(0)                                      # (G,) over valid priors
    eligible = gt_valid & (gt_max >= min_pos_iou)
    if gt_max_assign_all:
      def reaching(args):
        return _last_gt_reaching_max(overlaps_of(*args)[1], gt_max, eligible)
      low = _map_blocks(reaching, (blocks, valid_blocks)).reshape(-1)[:num_priors]
    else:
      first_block = block_gt_max.argmax(0)                            # first block reaching it
      in_block = jnp.take_along_axis(block_gt_argmax, first_block[None], 0)[0]
      low = _last_gt_of_first_priors(starts[first_block] + in_block, eligible, num_priors)
    gt_index = jnp.where(low > 0, low, gt_index)
  gt_index = jnp.where(gt_valid.any(), gt_index, 0)
  gt_index = jnp.where(prior_valid, gt_index, -1)
  return Assignment(gt_index, max_overlaps)


def _split_blocks(priors, prior_valid, block, num_blocks):
  """(N, ...) priors and (N,) flags -> (num_blocks, block, ...) and (num_blocks, block), padded
  with zero boxes flagged invalid."""
  priors = jnp.asarray(priors)
  pad = num_blocks * block - priors.shape[0]
  priors = jnp.pad(priors, [(0, pad)] + [(0, 0)] * (priors.ndim - 1))
  prior_valid = jnp.pad(prior_valid, (0, pad))
  return (priors.reshape(num_blocks, block, *priors.shape[1:]),
          prior_valid.reshape(num_blocks, block))


def _map_blocks(fn, xs):
  """`jax.lax.map` of fn over the leading (block) axis; one block is a plain call (no loop)."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    return jax.tree.map(lambda y: y[None], fn(jax.tree.map(lambda x: x[0], xs)))
  return jax.lax.map(fn, xs)


def _last_gt_reaching_max(masked, gt_max, eligible):
  """(B,) int32 per prior of a block: k + 1 for the last eligible gt k whose best IoU gt_max[k]
  the prior reaches (masked (G, B) has -1 at invalid gts and priors), else 0."""
  hits = (masked == gt_max[:, None]) & eligible[:, None]
  number = jnp.arange(1, masked.shape[0] + 1, dtype=jnp.int32)[:, None]
  return jnp.max(jnp.where(hits, number, 0), axis=0)   # one reduction: no reversed copy of hits


def _last_gt_of_first_priors(gt_argmax, eligible, num_priors):
  """(N,) int32: k + 1 for the last eligible gt k whose first best prior is this one, else 0."""
  ids = jnp.where(eligible, jnp.arange(1, eligible.shape[0] + 1, dtype=jnp.int32), 0)
  return jnp.zeros((num_priors,), jnp.int32).at[gt_argmax].max(ids)


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
