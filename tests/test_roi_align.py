"""RoIAlign against loop-by-loop numpy transcriptions of the mmcv kernels."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.ops import rois as ra

from mmcv_reference import bilinear_interpolate


def _bins(roi_w, roi_h, out, sampling_ratio, aligned):
  """mmcv's per-box grid: bin sizes, samples per bin side, sample count (same in both kernels)."""
  if not aligned:
    roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
  bin_h, bin_w = roi_h / out, roi_w / out
  grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out)
  grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out)
  return roi_w, roi_h, bin_h, bin_w, grid_h, grid_w, max(grid_h * grid_w, 1)


def roi_align_ref(fmap, box, out, scale, sampling_ratio, aligned, grid=None):
  """mmcv roi_align_forward (avg) for one box (x1, y1, x2, y2); `grid` (h, w) forces the samples
  per bin of each axis."""
  offset = 0.5 if aligned else 0.0
  start_w, start_h = box[0] * scale - offset, box[1] * scale - offset
  roi_w, roi_h = box[2] * scale - offset - start_w, box[3] * scale - offset - start_h
  _, _, bin_h, bin_w, grid_h, grid_w, count = _bins(roi_w, roi_h, out, sampling_ratio, aligned)
  if grid is not None:
    (grid_h, grid_w), count = grid, grid[0] * grid[1]
  result = np.zeros((out, out, fmap.shape[-1]))
  for ph in range(out):
    for pw in range(out):
      for iy in range(grid_h):
        yy = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        for ix in range(grid_w):
          xx = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
          result[ph, pw] += bilinear_interpolate(fmap, yy, xx)
      result[ph, pw] /= count
  return result


def roi_align_rotated_ref(fmap, rbox, out, scale, sampling_ratio, aligned, clockwise):
  """mmcv roi_align_rotated_forward for one box (cx, cy, w, h, theta)."""
  offset = 0.5 if aligned else 0.0
  cx, cy = rbox[0] * scale - offset, rbox[1] * scale - offset
  roi_w, roi_h = rbox[2] * scale, rbox[3] * scale
  theta = -rbox[4] if clockwise else rbox[4]
  roi_w, roi_h, bin_h, bin_w, grid_h, grid_w, count = _bins(roi_w, roi_h, out, sampling_ratio,
                                                            aligned)
  cos, sin = math.cos(theta), math.sin(theta)
  result = np.zeros((out, out, fmap.shape[-1]))
  for ph in range(out):
    for pw in range(out):
      for iy in range(grid_h):
        yy = -roi_h / 2 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        for ix in range(grid_w):
          xx = -roi_w / 2 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
          y = yy * cos - xx * sin + cy
          x = yy * sin + xx * cos + cx
          result[ph, pw] += bilinear_interpolate(fmap, y, x)
      result[ph, pw] /= count
  return result


def _features(rng, batch=2, height=13, width=17, channels=3):
  return rng.normal(size=(batch, height, width, channels)).astype(np.float32)


def _boxes(rng, n, stride, height, width):
  """Boxes in image pixels, some reaching past every border of the map."""
  centre = rng.uniform(-0.2, 1.2, (n, 2)) * [width * stride, height * stride]
  size = rng.uniform(2, 12, (n, 2)) * stride
  return np.c_[centre - size / 2, centre + size / 2].astype(np.float32)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("sampling_ratio,aligned", [(0, True), (2, True), (0, False), (1, False)])
def test_roi_align_matches_mmcv_reference(sampling_ratio, aligned, dense):
  rng = np.random.default_rng(sampling_ratio + 10 * aligned)
  feats = _features(rng)
  stride = 4
  boxes = _boxes(rng, 24, stride, 13, 17)
  batch = rng.integers(0, 2, 24)
  got = jax.jit(lambda f, b, i: ra.roi_align(f, b, i, 5, 1 / stride, sampling_ratio, aligned,
                                             max_samples=8, roi_chunk=16, dense=dense))(feats, boxes, batch)
  want = np.stack([roi_align_ref(feats[i], b, 5, 1 / stride, sampling_ratio, aligned)
                   for b, i in zip(boxes, batch)])
  assert math.ceil((boxes[:, 2:] - boxes[:, :2]).max() / stride / 5) <= 8   # within max_samples
  assert (boxes[:, :2] < 0).any() and (boxes[:, 2] > 17 * stride).any()     # partly outside
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clockwise,sampling_ratio,aligned", [(True, 2, True), (False, 2, True),
                                                               (True, 0, True), (True, 2, False)])
def test_roi_align_rotated_matches_mmcv_reference(clockwise, sampling_ratio, aligned):
  rng = np.random.default_rng(int(clockwise) + 3 * sampling_ratio + 7 * aligned)
  feats = _features(rng)
  stride = 8
  hb = _boxes(rng, 24, stride, 13, 17)
  rboxes = np.c_[(hb[:, :2] + hb[:, 2:]) / 2, hb[:, 2:] - hb[:, :2],
                 rng.uniform(-np.pi / 2, np.pi / 2, 24)].astype(np.float32)
  batch = rng.integers(0, 2, 24)
  got = jax.jit(lambda f, b, i: ra.roi_align_rotated(f, b, i, 7, 1 / stride, sampling_ratio, aligned,
                                                     clockwise, max_samples=4))(feats, rboxes, batch)
  want = np.stack([roi_align_rotated_ref(feats[i], b, 7, 1 / stride, sampling_ratio, aligned, clockwise)
                   for b, i in zip(rboxes, batch)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_clockwise_follows_le90_w_axis():
  # A map that grows along +x: a box turned by +pi/2 (w-axis pointing down, y grows) sees a
  # column that is constant along its w-axis, so its output varies only along out_h.
  fmap = np.tile(np.arange(32, dtype=np.float32)[None, :, None], (32, 1, 1))[None]
  box = np.array([[16, 16, 12, 4, np.pi / 2]], np.float32)
  out = np.asarray(ra.roi_align_rotated(fmap, box, np.zeros(1, int), 4, 1.0))[0, :, :, 0]
  np.testing.assert_allclose(out, out[:, :1] * np.ones((1, 4)), atol=1e-5)  # constant along w
  assert out[0, 0] > out[-1, 0]   # h-axis (cos, sin) turned: (-1, 0) at +pi/2, x decreases


@pytest.mark.parametrize("dense", [False, True])
def test_multilevel_assigns_levels_like_mmdet_and_samples_that_level(dense):
  rng = np.random.default_rng(5)
  strides = (4, 8, 16, 32)
  feats = [rng.normal(size=(2, 64 // s, 96 // s, 3)).astype(np.float32) for s in strides]
  sizes = np.array([20.0, 60.0, 111.0, 112.5, 230.0, 500.0])
  boxes = np.c_[np.full((6, 2), 10.0), 10.0 + np.c_[sizes, sizes]].astype(np.float32)
  levels = np.asarray(ra.map_roi_levels(np.asarray(sizes), 4))
  np.testing.assert_array_equal(levels, [0, 0, 0, 1, 2, 3])
  batch = np.array([0, 1, 0, 1, 0, 1])
  got = np.asarray(ra.multilevel_roi_align(feats, boxes, batch, 7, strides, sampling_ratio=2, dense=dense))
  for k in range(6):
    want = roi_align_ref(feats[levels[k]][batch[k]], boxes[k], 7, 1 / strides[levels[k]], 2, True)
    np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-5)
  rboxes = np.c_[(boxes[:, :2] + boxes[:, 2:]) / 2, sizes, sizes / 2, np.full(6, 0.4)].astype(np.float32)
  rot_levels = np.asarray(ra.map_roi_levels(np.sqrt(sizes * sizes / 2), 4))
  got = np.asarray(ra.multilevel_roi_align_rotated(feats, rboxes, batch, 7, strides))
  for k in range(6):
    want = roi_align_rotated_ref(feats[rot_levels[k]][batch[k]], rboxes[k], 7, 1 / strides[rot_levels[k]],
                                 2, True, True)
    np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dense", [False, True])
def test_adaptive_grid_is_capped_at_max_samples(dense):
  rng = np.random.default_rng(9)
  feats = _features(rng, height=40, width=40)
  box = np.array([[8, 4, 150, 140]], np.float32)       # needs ceil(35.5 / 5) = 8 samples per bin
  full = np.asarray(ra.roi_align(feats, box, np.zeros(1, int), 5, 0.25, 0, max_samples=8, dense=dense))
  np.testing.assert_allclose(full[0], roi_align_ref(feats[0], box[0], 5, 0.25, 0, True), rtol=1e-5, atol=1e-5)
  # Beyond max_samples: the longer side (x, 35.5 px) takes max_samples per bin; the gathers' shorter
  # side (y, 34 px) max_samples / 2 (it spans more than its window), the dense form's max_samples.
  capped = np.asarray(ra.roi_align(feats, box, np.zeros(1, int), 5, 0.25, 0, max_samples=4, dense=dense))
  want = roi_align_ref(feats[0], box[0], 5, 0.25, 0, True, grid=(4, 4) if dense else (2, 4))
  np.testing.assert_allclose(capped[0], want, rtol=1e-5, atol=1e-5)
  rotated = np.asarray(ra.roi_align_rotated(feats, np.array([[79, 72, 142, 136, 0]], np.float32),
                                            np.zeros(1, int), 5, 0.25, 0, max_samples=4))
  np.testing.assert_allclose(rotated[0], roi_align_ref(feats[0], box[0], 5, 0.25, 4, True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_elongated_box_keeps_max_samples_along_its_length(transpose, dense):
  # 1 feature px per bin across the box (a window: mmcv's ceil(bin) = 1 sample), 8.8 along it
  # (beyond max_samples = 4: 4 samples, as the gather path takes); the average is their product.
  rng = np.random.default_rng(11)
  feats = _features(rng, height=60, width=60)
  box = np.array([[6.0, 10.0, 182.0, 30.0]], np.float32)
  grid = (1, 4)
  if transpose:
    feats, box, grid = feats.transpose(0, 2, 1, 3).copy(), box[:, [1, 0, 3, 2]], (4, 1)
  got = np.asarray(ra.roi_align(feats, box, np.zeros(1, int), 5, 0.25, 0, max_samples=4, dense=dense))[0]
  want = roi_align_ref(feats[0], box[0], 5, 0.25, 0, True, grid=grid)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dense", [False, True])
def test_fixed_sampling_ratio_stays_exact_for_any_box_size(dense):
  rng = np.random.default_rng(12)
  feats = _features(rng, height=40, width=40)
  box = np.array([[2, 3, 157, 150]], np.float32)       # 7.8 feature px per bin, 2 samples each
  got = np.asarray(ra.roi_align(feats, box, np.zeros(1, int), 5, 0.25, 2, max_samples=4, dense=dense))
  np.testing.assert_allclose(got[0], roi_align_ref(feats[0], box[0], 5, 0.25, 2, True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotated,dense", [(False, False), (False, True), (True, False)])
def test_bfloat16_features_match_float32_within_their_rounding(rotated, dense):
  rng = np.random.default_rng(13)
  feats = _features(rng, height=30, width=30, channels=8)
  boxes = _boxes(rng, 16, 4, 30, 30)
  batch = rng.integers(0, 2, 16)
  if rotated:
    boxes = np.c_[(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2], rng.uniform(-1.5, 1.5, 16)]
    run = jax.jit(lambda f: ra.roi_align_rotated(f, boxes.astype(np.float32), batch, 7, 0.25))
  else:
    run = jax.jit(lambda f: ra.roi_align(f, boxes, batch, 7, 0.25, 0, dense=dense))
  want = np.asarray(run(feats))
  got = run(feats.astype(jnp.bfloat16))
  assert got.dtype == np.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=0.03)   # bfloat16: 8 bits of mantissa


def test_dense_and_gather_forms_have_the_same_gradients():
  """The dense form differentiates through matmuls, the gathers through scatter-adds: the same
  function, so the same gradients with respect to the maps (several images, every level)."""
  rng = np.random.default_rng(14)
  strides = (4, 8, 16, 32)
  feats = [rng.normal(size=(2, 64 // s, 64 // s, 5)).astype(np.float32) for s in strides]
  boxes = _boxes(rng, 20, 16, 4, 4)   # 32-192 px: levels 0-2
  batch = rng.integers(0, 2, 20)
  cotangent = rng.normal(size=(20, 7, 7, 5)).astype(np.float32)
  grads = [jax.grad(lambda f, d=dense: jnp.sum(cotangent * ra.multilevel_roi_align(
               f, boxes, batch, 7, strides, sampling_ratio=0, dense=d)))(feats) for dense in (False, True)]
  assert len(set(np.asarray(ra.map_roi_levels(np.sqrt(np.prod(boxes[:, 2:] - boxes[:, :2], 1)), 4)))) > 1
  for gather_grad, dense_grad in zip(*grads):
    np.testing.assert_allclose(dense_grad, gather_grad, rtol=1e-5, atol=1e-5)


def test_dense_form_is_chosen_by_cost_on_the_cpu_only():
  """`dense_pays` weighs the whole-map multiply-adds against the gathered pixels
  (benchmarks/roi_align_cpu.py): the quickstart's 128 px maps take the dense form on the CPU,
  a 1024 px image's maps the gathers; on accelerators the gathers always."""
  def shapes(size):
    return [(1, size // s, size // s) for s in (4, 8, 16, 32)]
  assert ra.dense_pays(shapes(128), (7, 7), 4, 0) and ra.dense_pays(shapes(128), (14, 14), 4, 0)
  assert not ra.dense_pays(shapes(1024), (7, 7), 4, 0)
  assert not ra.dense_pays(shapes(1024), (14, 14), 4, 0)
  from mtp_jax.ops import target
  with target.compiling_for("tpu"):
    assert not ra.dense_pays(shapes(128), (7, 7), 4, 0)
  with pytest.raises(ValueError, match="horizontal boxes only"):
    ra._roi_align_levels([np.zeros((1, 8, 8, 1), np.float32)], np.zeros((1, 5), np.float32),
                         np.zeros(1, np.int32), 7, [0.25], np.zeros(1, np.int32), 2, True, True,
                         4, None, True)
