"""Box conversions: le90 rules, round trips, numpy and jax alike."""

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.ops import boxes


def test_round_trip_random_boxes_le90():
  rng = np.random.default_rng(0)
  n = 500
  w, h = rng.uniform(1, 300, n), rng.uniform(1, 300, n)
  rb = np.stack([rng.uniform(0, 1000, n), rng.uniform(0, 1000, n), np.maximum(w, h) + 0.5,
                 np.minimum(w, h), rng.uniform(-np.pi / 2, np.pi / 2, n)], -1)
  back = boxes.poly_to_rbox(boxes.rbox_to_poly(rb))
  assert (back[:, 2] > back[:, 3]).all()
  assert ((back[:, 4] >= -np.pi / 2) & (back[:, 4] < np.pi / 2)).all()
  np.testing.assert_allclose(back[:, :4], rb[:, :4], rtol=1e-9, atol=1e-7)
  # Angles agree modulo pi (a box at -pi/2 + eps and pi/2 - eps are nearly the same box).
  np.testing.assert_allclose(np.cos(2 * back[:, 4]), np.cos(2 * rb[:, 4]), atol=1e-9)


def test_le90_edge_cases():
  # w < h: swap and turn by +pi/2, wrapped into [-pi/2, pi/2).
  np.testing.assert_allclose(boxes.regularize_le90(np.array([5., 5., 2., 8., 0.3])),
                             [5, 5, 8, 2, 0.3 + np.pi / 2 - np.pi])
  # Exactly pi/2 wraps to -pi/2; a square is turned by pi/2.
  np.testing.assert_allclose(boxes.norm_angle_le90(np.array([np.pi / 2, -np.pi / 2])), [-np.pi / 2, -np.pi / 2])
  np.testing.assert_allclose(boxes.regularize_le90(np.array([0., 0., 4., 4., 0.])), [0, 0, 4, 4, -np.pi / 2])


def test_polygon_corners_and_hbox():
  poly = boxes.rbox_to_poly(np.array([10.0, 20.0, 8.0, 4.0, np.pi / 2]))
  # Turned by +90 degrees in y-down coordinates: the w-axis points down.
  np.testing.assert_allclose(poly, [[12, 16], [12, 24], [8, 24], [8, 16]], atol=1e-12)
  np.testing.assert_allclose(boxes.rbox_to_hbox(np.array([10.0, 20.0, 8.0, 4.0, np.pi / 2])), [8, 16, 12, 24])


def test_jax_and_numpy_agree_under_jit_and_vmap():
  rb = np.array([[3.0, 4.0, 5.0, 2.0, 0.7], [1.0, 1.0, 2.0, 6.0, -1.2]])
  want = boxes.poly_to_rbox(boxes.rbox_to_poly(rb))
  got = jax.jit(jax.vmap(lambda r: boxes.poly_to_rbox(boxes.rbox_to_poly(r))))(jnp.asarray(rb))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_poly_to_rbox_follows_mmrotate_edge_rules_for_general_quadrilaterals():
  # Not a rectangle: edge 0->1 has length 5 (the longer), edge 1->2 has length sqrt(8).
  quad = np.array([[0.0, 0.0], [3.0, 4.0], [5.0, 2.0], [1.0, -1.0]])
  got = boxes.poly_to_rbox(quad)
  np.testing.assert_allclose(got, [2.5, 1.0, 5.0, np.sqrt(8), np.arctan2(4, 3)], atol=1e-12)
  # Edge 1->2 longer: the angle is that of edge 0->3, not 1->2.
  quad2 = np.array([[0.0, 0.0], [1.0, 0.0], [1.5, 4.0], [0.0, 3.0]])
  got2 = boxes.poly_to_rbox(quad2)
  np.testing.assert_allclose(got2[2:], [np.hypot(0.5, 4.0), 1.0, boxes.norm_angle_le90(np.pi / 2)], atol=1e-12)


def test_hbox_rbox_conversions():
  hb = np.array([[10.0, 20.0, 50.0, 30.0], [0.0, 0.0, 4.0, 8.0]])
  rb = boxes.hbox_to_rbox(hb)
  np.testing.assert_allclose(rb, [[30, 25, 40, 10, 0], [2, 4, 4, 8, 0]])
  np.testing.assert_allclose(boxes.rbox_to_hbox(rb), hb, atol=1e-12)
  turned = np.array([3.0, 4.0, 10.0, 2.0, 0.7])
  np.testing.assert_allclose(boxes.rbox_to_hbox(turned), boxes.poly_to_hbox(boxes.rbox_to_poly(turned)),
                             atol=1e-12)
