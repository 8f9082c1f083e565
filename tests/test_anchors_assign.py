"""Anchors, max-IoU assignment and random sampling against mmdet's definitions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.ops import anchors as anchors_lib
from mtp_jax.ops import assign, box_iou, box_iou_rotated, rbox_to_hbox


def test_base_anchors_hand_values_and_grid_order():
  gen = anchors_lib.AnchorGenerator()
  r = 16 * np.sqrt(2)
  np.testing.assert_allclose(gen.base_anchors()[0], [[-r, -r / 2, r, r / 2], [-16, -16, 16, 16],
                                                      [-r / 2, -r, r / 2, r]], rtol=1e-6)
  sizes = gen.feature_sizes((100, 60))
  assert sizes == [(25, 15), (13, 8), (7, 4), (4, 2), (2, 1)]
  grid = gen.grid_anchors(sizes)
  assert [g.shape for g in grid] == [(h * w * 3, 4) for h, w in sizes]
  level, (_, width) = 1, sizes[1]
  y, x, a = 5, 6, 2                                          # anchor k = (y * W + x) * A + a
  k = (y * width + x) * 3 + a
  np.testing.assert_allclose(grid[level][k], gen.base_anchors()[level][a] + [x * 8, y * 8, x * 8, y * 8])
  flags = gen.valid_flags(sizes, (90, 50))                   # padded to 100 x 60
  cell = np.asarray(flags[0]).reshape(25, 15, 3)[..., 0]
  assert cell[:23, :13].all() and not cell[23:].any() and not cell[:, 13:].any()
  with pytest.raises(ValueError, match="2 feature maps for 5"):
    gen.grid_anchors(sizes[:2])


def test_anchor_inside_flags_strict_right_edge():
  anchors = jnp.array([[0, 0, 10, 10], [-1, 0, 5, 5], [0, 0, 20, 10], [0, 0, 19.9, 10]], jnp.float32)
  flags = anchors_lib.anchor_inside_flags(anchors, jnp.ones(4, bool), (10.1, 20), allowed_border=0)
  np.testing.assert_array_equal(flags, [True, False, False, True])
  np.testing.assert_array_equal(anchors_lib.anchor_inside_flags(anchors, jnp.ones(4, bool), (10, 20), -1),
                                [True] * 4)


def assign_reference(overlaps, pos_thr, neg_thr, min_pos, low_quality, assign_all):
  """mmdet MaxIoUAssigner.assign_wrt_overlaps, transcribed loop by loop (no padding)."""
  k, n = overlaps.shape
  gt_inds = np.full(n, -1)
  if k == 0:
    gt_inds[:] = 0
    return gt_inds
  max_ov, argmax = overlaps.max(0), overlaps.argmax(0)
  gt_max, gt_argmax = overlaps.max(1), overlaps.argmax(1)
  lo, hi = (0, neg_thr) if not isinstance(neg_thr, tuple) else neg_thr
  gt_inds[(max_ov >= lo) & (max_ov < hi)] = 0
  pos = max_ov >= pos_thr
  gt_inds[pos] = argmax[pos] + 1
  if low_quality:
    for i in range(k):
      if gt_max[i] >= min_pos:
        if assign_all:
          gt_inds[overlaps[i] == gt_max[i]] = i + 1
        else:
          gt_inds[gt_argmax[i]] = i + 1
  return gt_inds


def padded_reference(overlaps, gt_valid, prior_valid, params):
  """`assign_reference` on the valid gts and priors only, mapped back to padded indices."""
  gts, priors = np.nonzero(gt_valid)[0], np.nonzero(prior_valid)[0]
  want_sub = assign_reference(overlaps[np.ix_(gts, priors)], *params)
  want = np.full(len(prior_valid), -1)
  want[priors] = np.where(want_sub > 0, np.r_[gts, 0][np.maximum(want_sub - 1, 0)] + 1, want_sub)
  return want


@pytest.mark.parametrize("case", range(6))
def test_max_iou_assign_equals_mmdet_on_padded_inputs(case):
  rng = np.random.default_rng(case)
  num_gt, num_priors = 7, 60
  overlaps = np.round(rng.uniform(0, 1, (num_gt, num_priors)) ** 3, 2).astype(np.float32)  # ties
  gt_valid = rng.uniform(size=num_gt) > 0.3 if case != 5 else np.zeros(num_gt, bool)
  prior_valid = rng.uniform(size=num_priors) > 0.2
  params = [(0.7, 0.3, 0.3, True, True), (0.5, 0.5, 0.5, False, True), (0.5, (0.1, 0.5), 0.0, True, True),
            (0.7, 0.3, 0.3, True, False), (0.4, 0.4, 0.0, True, True), (0.7, 0.3, 0.3, True, True)][case]
  got = assign.max_iou_assign(overlaps, gt_valid, prior_valid, *params[:3], match_low_quality=params[3],
                              gt_max_assign_all=params[4])
  want = padded_reference(overlaps, gt_valid, prior_valid, params)
  np.testing.assert_array_equal(np.asarray(got.gt_index), want)
  if case == 0:
    assert (want > 0).sum() > 3 and (want == 0).sum() > 3 and (want[prior_valid] == -1).sum() > 3


@functools.partial(jax.jit, static_argnames=("params", "block_size"))
def blocked_assign(gts, priors, gt_valid, prior_valid, params, block_size):
  return assign.max_iou_assign_blocked(box_iou, gts, priors, gt_valid, prior_valid, *params[:3],
                                       match_low_quality=params[3], gt_max_assign_all=params[4],
                                       block_size=block_size)


def check_blocked(gts, priors, gt_valid, prior_valid, params, block_sizes):
  """Every block size gives the single-block result bit for bit, and mmdet's assignment."""
  one = blocked_assign(gts, priors, gt_valid, prior_valid, params, None)
  want = padded_reference(np.asarray(box_iou(gts, priors)), gt_valid, prior_valid, params)
  np.testing.assert_array_equal(one.gt_index, want)
  for block in block_sizes:
    got = blocked_assign(gts, priors, gt_valid, prior_valid, params, block)
    np.testing.assert_array_equal(got.gt_index, one.gt_index, err_msg=f"block {block}")
    np.testing.assert_array_equal(got.max_overlaps, one.max_overlaps, err_msg=f"block {block}")
  return np.asarray(one.gt_index)


def test_blocked_assign_hand_made_ties_across_blocks():
  """Blocks of 4 priors (10 priors: padded to 12). Priors 2 and 7 equal gt0 = gt1 (a best IoU
  reached in blocks 0 and 1; the gt tie goes to gt0 for the positive, to the later gt1 for the
  low-quality match), priors 1 and 4 equal gt2; prior 5 equals gt4 but is invalid, so gt4's best
  is prior 6 (IoU 2/3, low quality); prior 8 sits on the invalid gt3."""
  gts = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60],
                  [100, 100, 110, 110]], np.float32)
  priors = np.array([[0, 0, 10, 5], [20, 20, 30, 30], [0, 0, 10, 10], [40, 40, 41, 41],
                     [20, 20, 30, 30], [100, 100, 110, 110], [100, 100, 110, 115],
                     [0, 0, 10, 10], [50, 50, 60, 60], [25, 20, 35, 30]], np.float32)
  gt_valid = np.array([1, 1, 1, 0, 1], bool)
  prior_valid = np.arange(10) != 5
  blocks = (1, 3, 4, 10, 64)
  every = check_blocked(gts, priors, gt_valid, prior_valid, (0.7, 0.3, 0.3, True, True), blocks)
  np.testing.assert_array_equal(every, [-1, 3, 2, 0, 3, -1, 5, 2, 0, -1])
  first = check_blocked(gts, priors, gt_valid, prior_valid, (0.7, 0.3, 0.3, True, False), blocks)
  np.testing.assert_array_equal(first, [-1, 3, 2, 0, 3, -1, 5, 1, 0, -1])
  none = check_blocked(gts, priors, np.zeros(5, bool), prior_valid, (0.7, 0.3, 0.3, True, True),
                       blocks)
  np.testing.assert_array_equal(none, np.where(prior_valid, 0, -1))


@pytest.mark.parametrize("case", range(4))
def test_blocked_assign_equals_mmdet_on_grid_boxes(case):
  """Boxes on a coarse grid: many exact IoU ties, within and across blocks."""
  rng = np.random.default_rng(case)
  def boxes(n):
    xy = rng.integers(0, 6, (n, 2)) * 4
    return np.concatenate([xy, xy + rng.integers(1, 4, (n, 2)) * 4], 1).astype(np.float32)
  gts, priors = boxes(9), boxes(50)
  gt_valid = rng.uniform(size=9) > 0.3
  prior_valid = rng.uniform(size=50) > 0.2
  params = [(0.7, 0.3, 0.3, True, True), (0.7, 0.3, 0.3, True, False),
            (0.5, (0.1, 0.5), 0.0, True, True), (0.5, 0.5, 0.5, False, True)][case]
  got = check_blocked(gts, priors, gt_valid, prior_valid, params, (7, 16, 50))
  assert (got > 0).sum() > 3 and (got == 0).sum() > 3


def test_rpn_targets_blocked_equals_one_block():
  """The whole RPN target path: blocks of 100 anchors against one block, same key, 2 images."""
  from mtp_jax.models.detection import rpn as rpn_lib
  gen = rpn_lib.RPNConfig().anchors
  sizes = gen.feature_sizes((64, 64))
  anchors = jnp.concatenate(gen.grid_anchors(sizes))
  valid = jnp.concatenate(gen.valid_flags(sizes, (60, 64)))
  rng = np.random.default_rng(0)
  gt = np.concatenate([rng.uniform(8, 56, (2, 12, 2)), rng.uniform(4, 40, (2, 12, 2)),
                       rng.uniform(-1.5, 1.5, (2, 12, 1))], -1).astype(np.float32)
  gt[..., 2:4] = np.sort(gt[..., 2:4], -1)[..., ::-1]
  gt[:, 5] = gt[:, 3]                                            # a duplicated gt: ties
  gt_valid = np.arange(12)[None].repeat(2, 0) < np.array([[10], [7]])
  targets = jax.jit(rpn_lib.batch_rpn_targets, static_argnames="cfg")
  one = targets(anchors, valid, gt, gt_valid, jax.random.key(3),
                rpn_lib.RPNConfig(assign_block_size=anchors.shape[0]), (60, 64))
  got = targets(anchors, valid, gt, gt_valid, jax.random.key(3),
                rpn_lib.RPNConfig(assign_block_size=100), (60, 64))
  assert anchors.shape[0] % 100 and int(one.num_pos.sum()) > 10
  for name, a, b in zip(one._fields, one, got):
    np.testing.assert_array_equal(a, b, err_msg=name)
  # Unset, the block size follows the platform traced for: blocks on the CPU, one on accelerators.
  from mtp_jax.ops import target
  default = rpn_lib.RPNConfig()
  assert rpn_lib._assign_block_size(default) == rpn_lib.CPU_ASSIGN_BLOCK_SIZE
  with target.compiling_for("tpu"):
    assert rpn_lib._assign_block_size(default) is None
    assert rpn_lib._assign_block_size(rpn_lib.RPNConfig(assign_block_size=100)) == 100


def test_oriented_rpn_and_rcnn_overlaps_plug_in():
  gt = jnp.array([[50, 50, 40, 10, 0.5], [0, 0, 1, 1, 0]], jnp.float32)
  anchors = jnp.array([[30, 30, 70, 70], [40, 45, 60, 55], [200, 200, 210, 210]], jnp.float32)
  rpn = assign.max_iou_assign(box_iou(rbox_to_hbox(gt), anchors), jnp.array([True, False]),
                              jnp.ones(3, bool), 0.7, 0.3, 0.3)
  assert np.asarray(rpn.gt_index)[2] == 0 and np.asarray(rpn.gt_index)[0] == 1   # low-quality match
  proposals = jnp.array([[50, 50, 40, 10, 0.45], [50, 50, 40, 10, -1.0]], jnp.float32)
  rcnn = assign.max_iou_assign(box_iou_rotated(gt, proposals), jnp.array([True, False]),
                               jnp.ones(2, bool), 0.5, 0.5, 0.5, match_low_quality=False)
  np.testing.assert_array_equal(rcnn.gt_index, [1, 0])
  with_gt = assign.prepend_gt_as_proposals(rcnn, jnp.array([True, False]))
  np.testing.assert_array_equal(with_gt.gt_index, [1, -1, 1, 0])


def test_random_sample_counts_uniformity_and_bounds():
  gt_index = jnp.asarray(np.r_[np.full(30, 2), np.zeros(500, int), np.full(70, -1)])
  sample = jax.jit(lambda k: assign.random_sample(k, gt_index, 256, 0.25))(jax.random.key(0))
  idx, pos, valid = map(np.asarray, (sample.indices, sample.positive, sample.valid))
  assert int(sample.num_positive) == 30 and int(sample.num_negative) == 226 and valid.all()
  assert len(set(idx.tolist())) == 256                                    # no repeats
  assert (np.asarray(gt_index)[idx[pos]] > 0).all() and (np.asarray(gt_index)[idx[~pos]] == 0).all()
  assert pos[:30].all() and not pos[30:].any()                            # positives first
  # More positives than the quota: exactly 64 of them; each chosen with probability 64 / 200.
  many = jnp.asarray(np.r_[np.ones(200, int), np.zeros(10, int)])
  counts = np.zeros(210)
  draw = jax.jit(jax.vmap(lambda k: assign.random_sample(k, many, 256, 0.25).indices))
  keys = jax.random.split(jax.random.key(1), 2000)
  valid = jax.jit(jax.vmap(lambda k: assign.random_sample(k, many, 256, 0.25).valid))(keys)
  for row, ok in zip(np.asarray(draw(keys)), np.asarray(valid)):
    counts[row[ok]] += 1
  assert (counts[200:] == 2000).all()                                     # every negative, always
  freq = counts[:200] / 2000
  assert abs(freq.mean() - 64 / 200) < 1e-9 and freq.std() < 0.03        # uniform across positives
  few = assign.random_sample(jax.random.key(2), jnp.asarray(np.r_[np.ones(3, int), np.zeros(100, int)]),
                             64, 0.5, neg_pos_ub=2.5)
  assert int(few.num_positive) == 3 and int(few.num_negative) == 7 and int(np.asarray(few.valid).sum()) == 10
