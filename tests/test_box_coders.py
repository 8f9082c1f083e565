"""Box coders: round trips, hand-computed deltas, le90 edge cases, mmrotate's clamps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.ops import box_coders as coders
from mtp_jax.ops import box_iou_rotated, boxes


def _random_hboxes(rng, n):
  xy = rng.uniform(0, 500, (n, 2))
  return np.concatenate([xy, xy + rng.uniform(4, 200, (n, 2))], -1).astype(np.float32)


def _random_rboxes(rng, n):
  wh = rng.uniform(4, 200, (n, 2))
  r = np.c_[rng.uniform(0, 500, (n, 2)), wh.max(1) * 1.05, wh.min(1), rng.uniform(-np.pi / 2, np.pi / 2, n)]
  return r.astype(np.float32)


def _same_rectangles(a, b, atol=1e-4):
  """Rotated boxes equal as rectangles: IoU 1 (angle representation aside)."""
  iou = np.asarray(box_iou_rotated(jnp.asarray(a), jnp.asarray(b), aligned=True))
  np.testing.assert_allclose(iou, 1.0, atol=atol)


def test_delta_xywh_hand_values_and_round_trip():
  coder = coders.DeltaXYWH(stds=(0.1, 0.1, 0.2, 0.2))
  proposal = np.array([10, 20, 30, 60], np.float32)     # centre (20, 40), 20 x 40
  target = np.array([12, 16, 52, 96], np.float32)       # centre (32, 56), 40 x 80
  want = np.array([12 / 20 / 0.1, 16 / 40 / 0.1, math.log(2) / 0.2, math.log(2) / 0.2])
  np.testing.assert_allclose(coder.encode(proposal, target), want, rtol=1e-6)
  rng = np.random.default_rng(0)
  p, g = _random_hboxes(rng, 500), _random_hboxes(rng, 500)
  back = jax.jit(lambda p, g: coder.decode(p, coder.encode(p, g)))(p, g)
  np.testing.assert_allclose(back, g, rtol=1e-5, atol=1e-3)


def test_delta_xywh_clamps_and_clips():
  coder = coders.DeltaXYWH()
  p = np.array([[0, 0, 10, 10]], np.float32)
  huge = np.array([[0, 0, 10.0, -10.0]], np.float32)
  out = np.asarray(coder.decode(p, huge))
  limit = 10 * 1000 / 16                      # exp(|log(16/1000)|) times the proposal size
  np.testing.assert_allclose(out[0, 2] - out[0, 0], limit, rtol=1e-5)
  np.testing.assert_allclose(out[0, 3] - out[0, 1], 10 * 16 / 1000, rtol=1e-5)
  clipped = np.asarray(coder.decode(p, np.array([[5.0, 5.0, 1.0, 1.0]], np.float32), max_shape=(40, 30)))
  assert clipped.max() <= 40 and clipped[0, 2] == 30 and clipped[0, 0] >= 0


def test_delta_xywht_round_trip_and_edge_swap():
  coder = coders.ORIENTED_RCNN_CODER
  rng = np.random.default_rng(1)
  p, g = _random_rboxes(rng, 500), _random_rboxes(rng, 500)
  deltas = jax.jit(coder.encode)(p, g)
  # edge_swap picks the representation with |dtheta| <= pi/4 (0.1 is the angle std).
  assert np.abs(np.asarray(deltas)[:, 4] * 0.1).max() <= np.pi / 4 + 1e-6
  back = np.asarray(jax.jit(coder.decode)(p, deltas))
  assert (back[:, 2] >= back[:, 3]).all() and (back[:, 4] >= -np.pi / 2).all() and (back[:, 4] < np.pi / 2).all()
  _same_rectangles(back, g)
  np.testing.assert_allclose(back[:, :4], g[:, :4], rtol=1e-4, atol=1e-3)


def test_delta_xywht_hand_values_with_proj_xy():
  coder = coders.DeltaXYWHT(edge_swap=True, proj_xy=True)
  proposal = np.array([100, 100, 40, 20, np.pi / 2 - 0.1], np.float32)
  # Target: centre moved 10 px along the proposal's w-axis, same size, turned by +0.2 (wraps).
  t = np.pi / 2 - 0.1
  target = np.array([100 + 10 * np.cos(t), 100 + 10 * np.sin(t), 40, 20, t + 0.2], np.float32)
  got = np.asarray(coder.encode(proposal, target))
  np.testing.assert_allclose(got, [10 / 40, 0, 0, 0, 0.2], atol=1e-5)


@pytest.mark.parametrize("case", ["minus_half_pi", "square", "w_less_than_h", "zero_angle"])
def test_le90_edge_cases_round_trip(case):
  gt = {"minus_half_pi": [50, 60, 30, 10, -np.pi / 2],
        "square": [50, 60, 20, 20, 0.3],
        "w_less_than_h": [50, 60, 10, 30, 0.4],     # regularised to (30, 10, 0.4 - pi/2)
        "zero_angle": [50, 60, 30, 10, 0.0]}[case]
  gt = np.array([gt], np.float32)
  proposal_r = np.array([[48, 58, 28, 12, 0.2]], np.float32)
  proposal_h = np.array([[30, 40, 70, 80]], np.float32)
  for coder, proposal in ((coders.ORIENTED_RCNN_CODER, proposal_r), (coders.ORIENTED_RPN_CODER, proposal_h),
                          (coders.DeltaXYWHT(), proposal_r)):
    back = np.asarray(coder.decode(proposal, coder.encode(proposal, gt)))
    _same_rectangles(back, gt)
    assert back[0, 2] >= back[0, 3] - 1e-4 and -np.pi / 2 <= back[0, 4] < np.pi / 2
    if case == "w_less_than_h":
      np.testing.assert_allclose(back[0, 2:4], [30, 10], atol=1e-3)
      np.testing.assert_allclose(back[0, 4], 0.4 - np.pi / 2, atol=1e-5)


def test_midpoint_offset_hand_values_and_round_trip():
  coder = coders.MidpointOffset()
  # An axis-aligned target: both midpoints are corners, da = db = 0.5.
  gt = np.array([[50, 60, 40, 20, 0.0]], np.float32)
  proposal = np.array([[30, 50, 70, 70]], np.float32)
  np.testing.assert_allclose(coder.encode(proposal, gt), [[0, 0, 0, 0, 0.5, 0.5]], atol=1e-6)
  # Turned by 30 degrees: top corner is the end of the w-axis' upper end.
  t = np.pi / 6
  gt = np.array([[0, 0, 4, 2, -t]], np.float32)
  poly = boxes.rbox_to_poly(gt.astype(np.float64))[0]
  hb = boxes.poly_to_hbox(poly)
  gw, gh = hb[2] - hb[0], hb[3] - hb[1]
  top = poly[np.argmin(poly[:, 1])]
  right = poly[np.argmax(poly[:, 0])]
  got = np.asarray(coder.encode(np.array([hb], np.float32), gt))[0]
  np.testing.assert_allclose(got[4:], [top[0] / gw, right[1] / gh], atol=1e-6)
  rng = np.random.default_rng(2)
  g = _random_rboxes(rng, 500)
  p = np.asarray(boxes.rbox_to_hbox(g)) + rng.uniform(-5, 5, (500, 4)).astype(np.float32)
  back = np.asarray(jax.jit(lambda p, g: coders.ORIENTED_RPN_CODER.decode(p, coders.ORIENTED_RPN_CODER.encode(p, g)))(p, g))
  _same_rectangles(back, g)


def test_midpoint_offset_decode_clamps_offsets_to_a_rectangle():
  coder = coders.MidpointOffset()
  proposal = np.array([[0, 0, 40, 20]], np.float32)
  out = np.asarray(coder.decode(proposal, np.array([[0, 0, 0, 0, 3.0, 3.0]], np.float32)))
  # da, db clamp to 0.5: the midpoints are the corners of the horizontal box itself.
  _same_rectangles(out, np.array([[20, 10, 40, 20, 0]], np.float32))
  # da = 0.5, db = -0.5: top and right corners coincide; the box collapses onto the diagonal.
  flat = np.asarray(coder.decode(proposal, np.array([[0, 0, 0, 0, 3.0, -3.0]], np.float32)))[0]
  np.testing.assert_allclose(flat, [20, 10, np.hypot(40, 20), 0, -np.arctan2(20, 40)], atol=1e-5)


def test_centre_clamp_option_limits_the_shift_and_only_caps_growth():
  coder = coders.DeltaXYWH(add_ctr_clamp=True, ctr_clamp=32)
  p = np.array([[0, 0, 100, 100]], np.float32)
  out = np.asarray(coder.decode(p, np.array([[5.0, -5.0, -7.0, 0.0]], np.float32)))[0]
  np.testing.assert_allclose((out[0] + out[2]) / 2, 50 + 32, rtol=1e-6)    # shift 500 px -> 32
  np.testing.assert_allclose((out[1] + out[3]) / 2, 50 - 32, rtol=1e-6)
  np.testing.assert_allclose(out[2] - out[0], 100 * np.exp(-7.0), rtol=1e-4)  # no lower clamp
  rotated = coders.DeltaXYWHT(add_ctr_clamp=True, ctr_clamp=10)
  r = np.asarray(rotated.decode(np.array([[50, 50, 20, 10, 0]], np.float32),
                                np.array([[3.0, 0, 9.0, 0, 0]], np.float32)))[0]
  np.testing.assert_allclose(r[0], 60, rtol=1e-6)
  np.testing.assert_allclose(r[2], 20 * 1000 / 16, rtol=1e-4)               # growth capped
