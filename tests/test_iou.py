"""Rotated and horizontal IoU against shapely's exact polygon intersection (float64 reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shapely

from mtp_jax.ops import box_iou, box_iou_rotated, rbox_to_poly

TOLERANCE = 1e-5   # absolute, on IoU in [0, 1], float32 inputs and arithmetic


def shapely_iou(boxes1, boxes2):
  """Aligned IoU of float32 rotated boxes, computed exactly in float64 by shapely."""
  p1 = shapely.polygons(rbox_to_poly(np.asarray(boxes1, np.float64)))
  p2 = shapely.polygons(rbox_to_poly(np.asarray(boxes2, np.float64)))
  inter = shapely.area(shapely.intersection(p1, p2))
  union = shapely.area(p1) + shapely.area(p2) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _random_boxes(rng, n):
  scale = 10.0 ** rng.uniform(-1, 4, n)                      # 0.1 px to 10,000 px
  wh = scale[:, None] * rng.uniform(0.05, 1.0, (n, 2))
  centre = rng.uniform(-2e4, 2e4, (n, 2))
  angle = rng.uniform(-np.pi / 2, np.pi / 2, n)
  return np.concatenate([centre, wh, angle[:, None]], -1)


def _partner(rng, boxes):
  """Boxes near `boxes`: shifted by up to their size, rescaled, turned by any angle."""
  n = len(boxes)
  out = boxes.copy()
  out[:, :2] += rng.uniform(-1, 1, (n, 2)) * boxes[:, 2:4].max(1, keepdims=True)
  out[:, 2:4] *= rng.uniform(0.3, 2.0, (n, 2))
  out[:, 4] = rng.uniform(-np.pi / 2, np.pi / 2, n)
  return out


def _shift_along(boxes, along_w, along_h):
  """Moves boxes by multiples of their own w- and h-axes."""
  out = boxes.copy()
  c, s = np.cos(boxes[:, 4]), np.sin(boxes[:, 4])
  out[:, 0] += c * along_w * boxes[:, 2] - s * along_h * boxes[:, 3]
  out[:, 1] += s * along_w * boxes[:, 2] + c * along_h * boxes[:, 3]
  return out


def hard_cases(seed=0, n_random=10_000):
  """Named (boxes1, boxes2) float32 sets: random pairs and every degenerate configuration."""
  rng = np.random.default_rng(seed)
  base = _random_boxes(rng, 1000)
  quarter = base[:, [0, 1, 3, 2, 4]].copy()
  quarter[:, 4] += np.pi / 2                                    # same rectangle, w/h swapped
  small = base.copy()
  small[:, 2:4] *= rng.uniform(0.01, 0.5, (1000, 1))
  small[:, 4] = rng.uniform(-np.pi / 2, np.pi / 2, 1000)
  shrink = np.sqrt(2) * np.maximum(small[:, 2], small[:, 3]) / np.minimum(base[:, 2], base[:, 3])
  small[:, 2:4] /= np.maximum(shrink, 1)[:, None] * 1.01      # fits inside in any direction
  thin = base.copy()
  thin[:, 3] = thin[:, 2] * 10.0 ** rng.uniform(-7, -3, 1000)   # near-zero height
  cases = {
      "random": (_random_boxes(rng, n_random), None),
      "identical": (base, base),
      "quarter_turn_same_rectangle": (base, quarter),
      "angle_minus_half_pi_vs_plus": (np.c_[base[:, :4], np.full(1000, -np.pi / 2)],
                                      np.c_[base[:, :4], np.full(1000, np.pi / 2)]),
      "contained": (base, small),
      "touching_edges": (base, _shift_along(base, 1.0, rng.uniform(-0.9, 0.9, 1000))),
      "shared_corners": (base, _shift_along(base, 1.0, 1.0)),
      "parallel_overlapping_edges": (base, _shift_along(base, rng.uniform(-0.9, 0.9, 1000), 0.0)),
      "collinear_half_overlap": (base, _shift_along(base, 0.5, 0.0) * [1, 1, 1, 0.5, 1]),
      "near_zero_height_vs_random": (thin, _partner(rng, thin)),
      "near_zero_height_identical": (thin, thin),
      "zero_area": (np.c_[base[:, :3], np.zeros(1000), base[:, 4]], base),
  }
  out = {}
  for name, (b1, b2) in cases.items():
    if b2 is None:
      b2 = _partner(rng, b1)
    out[name] = (b1.astype(np.float32), b2.astype(np.float32))
  return out


CASES = hard_cases()
aligned_iou = jax.jit(lambda a, b: box_iou_rotated(a, b, aligned=True))
pairwise_iou = jax.jit(box_iou_rotated, static_argnames="row_tile")


@pytest.mark.parametrize("name", sorted(CASES))
def test_rotated_iou_matches_shapely(name):
  boxes1, boxes2 = CASES[name]
  got = np.asarray(aligned_iou(boxes1, boxes2))
  want = shapely_iou(boxes1, boxes2)
  assert np.isfinite(got).all()
  err = np.abs(got - want)
  print(f"{name}: max |IoU - shapely| = {err.max():.2e} over {len(err)} pairs")
  assert err.max() <= TOLERANCE, (name, err.max(), boxes1[err.argmax()], boxes2[err.argmax()])
  assert (got >= 0).all() and (got <= 1 + 1e-6).all()


def test_known_values():
  square = np.array([[0, 0, 2, 2, 0]], np.float32)
  half = np.array([[1, 0, 2, 2, 0]], np.float32)             # shifted by half a side
  turned = np.array([[0, 0, 2, 2, np.pi / 4]], np.float32)   # octagon overlap
  np.testing.assert_allclose(pairwise_iou(square, half), [[1 / 3]], atol=1e-6)
  octagon = 8 * (np.sqrt(2) - 1)   # area of the regular octagon of inradius 1
  np.testing.assert_allclose(pairwise_iou(square, turned), [[octagon / (8 - octagon)]], atol=1e-6)
  assert float(pairwise_iou(square, square)[0, 0]) == 1.0


def test_identity_symmetry_and_pairwise_layout():
  boxes1, boxes2 = CASES["random"]
  a, b = boxes1[:300], boxes2[:200]
  pairwise = pairwise_iou
  pair = np.asarray(pairwise(a, b))
  assert pair.shape == (300, 200)
  np.testing.assert_array_equal(pair, np.asarray(pairwise(b, a)).T)   # bit-exact symmetry
  np.testing.assert_allclose(np.diag(pair[:200, :200]), shapely_iou(a[:200], b), atol=TOLERANCE)
  tiled = np.asarray(pairwise(a, b, row_tile=64))
  np.testing.assert_array_equal(tiled, pair)
  self_iou = np.asarray(aligned_iou(a, a))
  np.testing.assert_allclose(self_iou, 1.0, atol=1e-6)


def test_vmap_over_a_batch_and_float64_inputs_keep_dtype():
  boxes1, boxes2 = CASES["random"]
  batch1, batch2 = boxes1[:60].reshape(3, 20, 5), boxes2[:60].reshape(3, 20, 5)
  got = jax.jit(jax.vmap(box_iou_rotated))(batch1, batch2)
  assert got.shape == (3, 20, 20)
  np.testing.assert_allclose(got[1], pairwise_iou(batch1[1], batch2[1]), atol=1e-7)
  with pytest.raises(ValueError, match=r"\(N, 5\)"):
    box_iou_rotated(batch1, batch2)
  with jax.enable_x64(True):
    wide = pairwise_iou(batch1[0].astype(np.float64), batch2[0].astype(np.float64))
    assert wide.dtype == jnp.float64
    np.testing.assert_allclose(wide, got[0], atol=1e-6)


def test_gradients_are_finite_everywhere_and_match_finite_differences():
  boxes = np.concatenate([b[:200] for b in CASES.values() for b in b], 0)
  half = len(boxes) // 2
  a, b = jnp.asarray(boxes[:half]), jnp.asarray(boxes[half:2 * half])
  grad = jax.jit(jax.grad(lambda x, y: box_iou_rotated(x, y, aligned=True).sum(),
                          argnums=(0, 1)))(a, b)
  assert all(np.isfinite(np.asarray(g)).all() for g in grad)
  # A generic overlapping pair: the gradient is the derivative of the exact IoU.
  with jax.enable_x64(True):
    x = jnp.array([10.0, 12.0, 8.0, 5.0, 0.3])
    y = jnp.array([12.0, 11.0, 6.0, 6.0, -0.4])
    f = jax.jit(lambda x: box_iou_rotated(x, y, aligned=True))
    analytic = np.asarray(jax.jit(jax.grad(f))(x))
    step = 1e-6
    shifts = step * np.eye(5)
    numeric = (jax.vmap(f)(x + shifts) - jax.vmap(f)(x - shifts)) / (2 * step)
    direction = jnp.array([0.3, -1.0, 0.5, 2.0, 0.1])
    _, forward = jax.jvp(f, (x,), (direction,))                  # forward mode agrees too
    np.testing.assert_allclose(float(forward), analytic @ np.asarray(direction), rtol=1e-9)
    np.testing.assert_allclose(analytic, np.asarray(numeric), rtol=1e-5, atol=1e-8)


def test_horizontal_iou_matches_shapely_and_torchvision_convention():
  rng = np.random.default_rng(1)
  xy = rng.uniform(0, 100, (300, 2))
  wh = rng.uniform(0, 40, (300, 2))
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  hbox_iou = jax.jit(box_iou, static_argnames="aligned")
  got = np.asarray(hbox_iou(boxes[:150], boxes[150:]))
  polys1 = shapely.box(*boxes[:150].T)[:, None]
  polys2 = shapely.box(*boxes[150:].T)[None, :]
  inter = shapely.area(shapely.intersection(polys1, polys2))
  want = inter / (shapely.area(polys1) + shapely.area(polys2) - inter)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(hbox_iou(boxes[:150], boxes[150:300], aligned=True), np.diag(want),
                             atol=1e-6)
  assert float(hbox_iou(np.zeros((1, 4)), np.zeros((1, 4)))[0, 0]) == 0.0   # empty union -> 0
