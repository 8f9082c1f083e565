"""RandAugment ('timm_increasing', mmpretrain 1.x + mmcv 2.x semantics) against independent oracles.

Oracles: PIL.ImageOps where mmcv's formula is PIL's (invert, solarize, posterize, autocontrast,
equalize); elsewhere the mmcv formula written out here in float64 numpy (grey = 0.299 R +
0.587 G + 0.114 B, explicit 3x3 smoothing, a bicubic A = -0.75 inverse-mapped warp), allowed
1 grey level on a few pixels where mmcv truncates a float32 cv2 result (its last bit is the cv2
build's). The policy table and the sampling are checked against mmpretrain's
auto_augment.py written out literally.
"""

import math

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from data_pipelines.downstream import rand_augment as ra

H, W = 48, 52


def _noise(seed=0, shape=(H, W, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _smooth(shape=(H, W)):
  yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
  return np.stack([127 + 100 * np.sin(xx / 1.3 + c) * np.cos(yy / 1.7 - c) for c in range(3)],
                  -1).astype(np.uint8)


def _pil(op, image, *args):
  return np.asarray(op(Image.fromarray(image), *args))


def _close(got, want, max_fraction=0.03):
  """Equal but for 1 grey level on at most max_fraction of the values."""
  diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
  assert got.dtype == np.uint8 and got.shape == want.shape
  assert diff.max() <= 1, diff.max()
  assert (diff > 0).mean() <= max_fraction, (diff > 0).mean()


def _grey(x):
  x = x.astype(np.float64)
  return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


# --- the policy table and the sampling ----------------------------------------------------------

# RANDAUG_POLICIES['timm_increasing'] and each class's prob / random_negative_prob, as in
# mmpretrain/datasets/transforms/auto_augment.py (0 = no sign draw).
MMPRETRAIN_TABLE = [
    ("AutoContrast", None, 0.5, 0.0, {}),
    ("Equalize", None, 0.5, 0.0, {}),
    ("Invert", None, 0.5, 0.0, {}),
    ("Rotate", (0, 30), 0.5, 0.5, {}),
    ("Posterize", (4, 0), 0.5, 0.0, {}),
    ("Solarize", (256, 0), 0.5, 0.0, {}),
    ("SolarizeAdd", (0, 110), 0.5, 0.0, {}),
    ("ColorTransform", (0, 0.9), 0.5, 0.5, {}),
    ("Contrast", (0, 0.9), 0.5, 0.5, {}),
    ("Brightness", (0, 0.9), 0.5, 0.5, {}),
    ("Sharpness", (0, 0.9), 0.5, 0.5, {}),
    ("Shear", (0, 0.3), 0.5, 0.5, {"direction": "horizontal"}),
    ("Shear", (0, 0.3), 0.5, 0.5, {"direction": "vertical"}),
    ("Translate", (0, 0.45), 0.5, 0.5, {"direction": "horizontal"}),
    ("Translate", (0, 0.45), 0.5, 0.5, {"direction": "vertical"}),
]


def test_policy_table_is_timm_increasing():
  got = [(p.name, p.magnitude_range, p.prob, p.random_negative_prob, dict(p.kwargs)) for p in ra.TIMM_INCREASING]
  assert got == MMPRETRAIN_TABLE
  # hparams (pad_val, interpolation) reach exactly the ops whose constructor takes them.
  assert [p.name for p in ra.TIMM_INCREASING if p.geometric] == ["Rotate", "Shear", "Shear", "Translate", "Translate"]
  # The config's pad_val: round(BGR mean) = [104, 116, 124], reversed to RGB.
  assert ra.PAD_VAL_RGB == tuple(round(x) for x in [103.53, 116.28, 123.675][::-1]) == (124, 116, 104)


@pytest.mark.parametrize("level", [0, 3, 9, 10, 12.5])
def test_magnitude_without_std_is_the_linear_map_and_draws_nothing(level):
  for lo, hi in [(0, 30), (4, 0), (256, 0), (0, 110), (0, 0.9), (0, 0.45)]:
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    got = ra.sample_magnitude(rng, (lo, hi), magnitude_level=level, magnitude_std=0, total_level=10)
    assert got == pytest.approx(lo + level / 10 * (hi - lo), abs=1e-12)
    assert rng.bit_generator.state == state
  # The config's values at level 9.
  assert ra.sample_magnitude(np.random.default_rng(0), (0, 30), magnitude_level=9, magnitude_std=0) == pytest.approx(27)
  assert ra.sample_magnitude(np.random.default_rng(0), (256, 0), magnitude_level=9, magnitude_std=0) == pytest.approx(25.6)


def test_magnitude_with_std_is_gaussian_and_clipped():
  rng = np.random.default_rng(1)
  draws = np.array([ra.sample_magnitude(rng, (0, 30), magnitude_level=9, magnitude_std=0.5) for _ in range(4000)])
  levels = draws / 3
  assert levels.min() >= 0 and levels.max() <= 10
  # N(9, 0.5) clipped at 10: P(clip) = P(z > 2) = 2.3 %; mean and spread of the unclipped part.
  assert 0.012 < (levels == 10).mean() < 0.035
  inner = levels[levels < 10]
  assert abs(inner.mean() - 9) < 0.05 and 0.44 < inner.std() < 0.52
  # A reversed range maps the clipped level onto its low end, never beyond it.
  rev = np.array([ra.sample_magnitude(rng, (4, 0), magnitude_level=9.8, magnitude_std=1) for _ in range(2000)])
  assert rev.min() == pytest.approx(0) and rev.max() <= 4 and (rev == 0).mean() > 0.3
  # Near 0 the level is clipped at 0.
  low = np.array([ra.sample_magnitude(rng, (0, 110), magnitude_level=0.2, magnitude_std=0.5) for _ in range(2000)])
  assert low.min() == 0 and (low == 0).mean() > 0.3
  # 'inf': Uniform(0, level).
  uni = np.array([ra.sample_magnitude(rng, (0, 10), magnitude_level=8, magnitude_std="inf") for _ in range(4000)])
  assert uni.min() >= 0 and uni.max() <= 8 and abs(uni.mean() - 4) < 0.15


def test_plan_statistics():
  rng = np.random.default_rng(2)
  counts, enabled, duplicates, signs = np.zeros(15), [], 0, {True: [], False: []}
  n = 6000
  for _ in range(n):
    plan = ra.sample_plan(rng)
    assert len(plan) == 2
    idx = [ra.TIMM_INCREASING.index(s.policy) for s in plan]
    duplicates += idx[0] == idx[1]
    for i, step in zip(idx, plan):
      counts[i] += 1
      enabled.append(step.enabled)
      if step.enabled and step.magnitude is not None:
        signs[step.policy.random_negative_prob > 0].append(step.magnitude < 0)
      if not step.enabled or step.policy.magnitude_range is None:
        assert step.magnitude is None
  assert np.all(np.abs(counts / (2 * n) - 1 / 15) < 0.012)   # uniform over the 15 entries
  assert abs(duplicates / n - 1 / 15) < 0.015                # with replacement
  assert abs(np.mean(enabled) - 0.5) < 0.02                  # prob 0.5
  assert abs(np.mean(signs[True]) - 0.5) < 0.03 and not any(signs[False])


class _Recorder:
  """Wraps a Generator and logs which draws are made, in order."""

  def __init__(self, seed, script=None):
    self.rng, self.log, self.script = np.random.default_rng(seed), [], list(script or [])

  def choice(self, n, size):
    self.log.append("choice")
    return np.array(self.script.pop(0)) if self.script else self.rng.choice(n, size=size)

  def random(self):
    self.log.append("random")
    return self.script.pop(0) if self.script else self.rng.random()

  def normal(self, loc, scale):
    self.log.append("normal")
    return self.script.pop(0) if self.script else self.rng.normal(loc, scale)

  def uniform(self, lo, hi):
    self.log.append("uniform")
    return self.rng.uniform(lo, hi)


def test_draw_order_is_mmpretrains():
  names = [p.name for p in ra.TIMM_INCREASING]
  rot, post, inv = names.index("Rotate"), names.index("Posterize"), names.index("Invert")
  # indices; Rotate: enable (0.3 <= 0.5), level 9.4, sign (0.2 < 0.5: negative); Posterize:
  # enable, level 2, no sign draw; Invert: disabled (0.7 > 0.5), nothing more.
  rec = _Recorder(0, [[rot, post, inv], 0.3, 9.4, 0.2, 0.5, 2.0, 0.7])
  plan = ra.sample_plan(rec, num_policies=3)
  assert rec.log == ["choice", "random", "normal", "random", "random", "normal", "random"]
  assert [s.enabled for s in plan] == [True, True, False]
  assert plan[0].magnitude == pytest.approx(-9.4 / 10 * 30)
  assert plan[1].magnitude == pytest.approx(4 - 2.0 / 10 * 4)
  # std 0: no normal draw.
  rec = _Recorder(0, [[rot], 0.1, 0.9])
  assert ra.sample_plan(rec, num_policies=1, magnitude_std=0)[0].magnitude == pytest.approx(27)
  assert rec.log == ["choice", "random", "random"]


# --- the ops against oracles ---------------------------------------------------------------------


def test_invert_solarize_posterize_match_pil():
  img = _noise(1)
  assert np.array_equal(ra.invert(img), _pil(ImageOps.invert, img))
  for thr in [0, 25.6, 128, 200.5, 256]:
    assert np.array_equal(ra.solarize(img, thr), _pil(ImageOps.solarize, img, thr)), thr
  for bits, keep in [(0.4, 1), (1.0, 1), (1.6, 2), (3.2, 4), (4.0, 4)]:   # ceil, as mmpretrain
    assert np.array_equal(ra.posterize(img, bits), _pil(ImageOps.posterize, img, keep)), bits
  assert not ra.posterize(img, 0).any()        # level 10: 0 bits, black (mmcv's shift by 8)


def _test_images():
  rng = np.random.default_rng(5)
  yield _noise(2)
  yield np.clip(rng.normal(100, 12, (H, W, 3)), 0, 255).astype(np.uint8)   # narrow range
  yield (_noise(3) // 51 * 51).astype(np.uint8)                            # few levels
  img = _noise(4)
  img[..., 1] = 77                                                         # a constant channel
  yield img
  yield _smooth()


def test_auto_contrast_and_equalize_match_pil():
  for img in _test_images():
    assert np.array_equal(ra.auto_contrast(img), _pil(ImageOps.autocontrast, img))
    assert np.array_equal(ra.equalize(img), _pil(ImageOps.equalize, img))
  narrow = np.clip(np.random.default_rng(6).normal(100, 12, (H, W, 3)), 0, 255).astype(np.uint8)
  assert ra.auto_contrast(narrow).min() == 0 and ra.auto_contrast(narrow).max() == 255


def test_solarize_add_matches_lut_oracle():
  img = _noise(7)
  for magnitude in [0, 27.5, 99.0, 98.7, 110]:
    lut = np.array([min(math.floor(v + magnitude), 255) if v < 128 else v for v in range(256)], np.uint8)
    assert np.array_equal(ra.solarize_add(img, magnitude), lut[img]), magnitude


def test_grey_is_mmcvs_bgr2gray_on_rgb():
  img = _noise(8)
  bgr = np.ascontiguousarray(img[..., ::-1])
  assert np.array_equal(ra._gray(img), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
  assert np.abs(ra._gray(img) - _grey(img)).max() <= 1
  red = np.zeros((4, 4, 3), np.uint8)
  red[..., 0] = 255
  assert np.all(ra._gray(red) == 76)   # 0.299 * 255: R has the red weight


MAGNITUDES = [-0.81, -0.4, 0.27, 0.81, 0.9]


def _colourful():
  """Noise plus saturated red / green / blue patches (catches a swapped grey weighting)."""
  img = _noise(9)
  for c in range(3):
    img[:12, 16 * c:16 * c + 16] = 0
    img[:12, 16 * c:16 * c + 16, c] = 255
  return img


@pytest.mark.parametrize("m", MAGNITUDES)
def test_color_matches_formula(m):
  img = _colourful()
  a = 1 + m
  want = np.clip(np.rint(img * a + np.rint(_grey(img))[..., None] * (1 - a)), 0, 255).astype(np.uint8)
  _close(ra.color(img, m), want)


@pytest.mark.parametrize("m", MAGNITUDES)
def test_contrast_matches_formula(m):
  img = _colourful()
  mean = _grey(img).mean()
  assert abs(mean % 1 - 0.5) > 0.05          # the oracle's rounding is not on a tie
  f = 1 + m
  want = np.clip(img * f + round(mean) * (1 - f), 0, 255).astype(np.uint8)
  _close(ra.contrast(img, m), want)
  dark = (img // 3).astype(np.uint8)         # a grey mean whose fraction is above one half
  mean = _grey(dark).mean()
  assert 0.55 < mean % 1 < 0.95
  want = np.clip(dark * f + math.ceil(mean) * (1 - f), 0, 255).astype(np.uint8)
  _close(ra.contrast(dark, m), want)


@pytest.mark.parametrize("low,mean", [(100, 100), (101, 102)])
def test_contrast_mean_rounds_half_to_even(low, mean):
  """mmcv: round(sum / n), Python's half-to-even. Grey rows alternating low + 3 and low - 2: the
  grey mean is exactly low + 0.5 (a half-up rounding, PIL's, would give low + 1 for both); no
  pixel sits on a candidate mean, so no blend lands on an integer."""
  img = np.full((H, W, 3), low - 2, np.uint8)
  img[::2] = low + 3
  assert ra._gray(img).mean() == low + 0.5
  for m in (0.81, -0.81):
    want = np.clip(img * (1 + m) - mean * m, 0, 255).astype(np.uint8)
    _close(ra.contrast(img, m), want)


@pytest.mark.parametrize("m", MAGNITUDES)
def test_brightness_matches_formula(m):
  img = _noise(10)
  _close(ra.brightness(img, m), np.clip(img * (1 + m), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("m", MAGNITUDES)
def test_sharpness_matches_formula(m):
  img = _noise(11)
  x = img.astype(np.float64)
  p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="reflect")   # cv2's default border (reflect-101)
  smoothed = np.rint((sum(p[i:i + H, j:j + W] for i in range(3) for j in range(3)) + 4 * x) / 13)
  f = 1 + m
  _close(ra.sharpness(img, m), np.clip(x * f + smoothed * (1 - f), 0, 255).astype(np.uint8))


def _cubic(t):
  a = -0.75
  d = np.stack([1 + t, t, 1 - t, 2 - t])
  return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)


def _bicubic_warp(img, forward, pad):
  """Output pixel (x, y) samples the source at forward^-1 (x, y) with a 4x4 cubic (A = -0.75),
  taps outside the image reading `pad`."""
  h, w = img.shape[:2]
  inv = np.linalg.inv(np.vstack([np.asarray(forward, np.float64), [0, 0, 1]]))
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
  sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
  x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
  wx, wy = _cubic(sx - x0), _cubic(sy - y0)
  out = np.zeros((h, w, 3))
  for i in range(4):
    for j in range(4):
      yy, xx = y0 - 1 + i, x0 - 1 + j
      inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
      taps = np.where(inside[..., None], img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], np.asarray(pad, float))
      out += (wy[i] * wx[j])[..., None] * taps
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _rotation(angle_cw, h, w):
  t = math.radians(angle_cw)
  cx, cy = (w - 1) / 2, (h - 1) / 2   # clockwise on screen (y down): x' = c x - s y, y' = s x + c y
  return [[math.cos(t), -math.sin(t), cx - math.cos(t) * cx + math.sin(t) * cy],
          [math.sin(t), math.cos(t), cy - math.sin(t) * cx - math.cos(t) * cy]]


GEOMETRIC = [
    ("rotate", lambda img, p: ra.rotate(img, 27, p), _rotation(27, H, W)),
    ("rotate-", lambda img, p: ra.rotate(img, -13.5, p), _rotation(-13.5, H, W)),
    ("shear-h", lambda img, p: ra.shear(img, 0.27, "horizontal", p), [[1, 0.27, 0], [0, 1, 0]]),
    ("shear-v", lambda img, p: ra.shear(img, -0.27, "vertical", p), [[1, 0, 0], [-0.27, 1, 0]]),
    ("translate-h", lambda img, p: ra.translate(img, 0.405, "horizontal", p), [[1, 0, 0.405 * W], [0, 1, 0]]),
    ("translate-v", lambda img, p: ra.translate(img, -0.3, "vertical", p), [[1, 0, 0], [0, 1, -0.3 * H]]),
]


@pytest.mark.parametrize("name,op,forward", GEOMETRIC, ids=[g[0] for g in GEOMETRIC])
def test_geometric_ops_are_bicubic_warps_with_pad_fill(name, op, forward):
  img, pad = _smooth(), (10, 200, 60)
  want = _bicubic_warp(img, forward, pad)
  got = op(img, pad)
  _close(got, want, max_fraction=0.01)
  # The tolerance rejects bilinear interpolation (the oracle can tell the two apart).
  linear = cv2.warpAffine(img, np.float64(forward), (W, H), flags=cv2.INTER_LINEAR, borderValue=pad)
  assert np.abs(linear.astype(int) - want).max() > 3


def test_geometric_directions_and_fill_exact():
  img, pad = _noise(12), (124, 116, 104)
  sq = _noise(13, (33, 33, 3))
  assert np.array_equal(ra.rotate(sq, 90, pad), np.rot90(sq, k=-1))    # positive = clockwise
  assert np.array_equal(ra.rotate(sq, -90, pad), np.rot90(sq, k=1))
  # Integer shifts are exact under bicubic interpolation.
  want = np.empty_like(img)
  want[:] = pad
  want[:, 13:] = img[:, :-13]
  assert np.array_equal(ra.translate(img, 13 / W, "horizontal", pad), want)      # right
  want[:] = pad
  want[:-12] = img[12:]
  assert np.array_equal(ra.translate(img, -12 / H, "vertical", pad), want)       # up
  assert np.all(ra.translate(img, 1.0, "horizontal", pad) == np.array(pad, np.uint8))  # RGB order
  # Shear by 1: row y moves right by y (horizontal); column x moves down by x (vertical).
  ys, xs = np.mgrid[0:H, 0:W]
  src_x = xs - ys
  want = np.where((src_x >= 0)[..., None], img[ys, np.clip(src_x, 0, W - 1)], np.array(pad, np.uint8))
  assert np.array_equal(ra.shear(img, 1.0, "horizontal", pad), want)
  src_y = ys - xs
  want = np.where((src_y >= 0)[..., None], img[np.clip(src_y, 0, H - 1), xs], np.array(pad, np.uint8))
  assert np.array_equal(ra.shear(img, 1.0, "vertical", pad), want)


def test_magnitude_level_zero_is_identity_where_it_should_be():
  img = _noise(14)
  identity = {"Rotate", "Solarize", "SolarizeAdd", "ColorTransform", "Contrast", "Brightness", "Sharpness",
              "Shear", "Translate"}
  for policy in ra.TIMM_INCREASING:
    if policy.magnitude_range is None:
      continue
    m = ra.sample_magnitude(None, policy.magnitude_range, magnitude_level=0, magnitude_std=0)
    out = policy.apply(img, m)
    assert np.array_equal(out, img) == (policy.name in identity), policy.name
  assert np.array_equal(ra.posterize(img, 4), img & 0xF0)   # level 0 Posterize keeps 4 bits


# --- the whole transform -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 52, 3), (31, 47, 3), (64, 64, 3)])
def test_rand_augment_shape_dtype_determinism(shape):
  img = _noise(15, shape)
  outs = [ra.rand_augment(img, np.random.default_rng(seed)) for seed in range(12)]
  for out in outs:
    assert out.shape == shape and out.dtype == np.uint8
  again = [ra.rand_augment(img, np.random.default_rng(seed)) for seed in range(12)]
  assert all(np.array_equal(a, b) for a, b in zip(outs, again))
  assert len({o.tobytes() for o in outs}) > 6
  assert np.array_equal(img, _noise(15, shape))   # the input is not modified


def test_rand_augment_is_plan_then_apply():
  img = _smooth()
  flipped = img[:, ::-1]                          # a non-contiguous view, as after RandomFlip
  for seed in range(30):
    plan = ra.sample_plan(np.random.default_rng(seed))
    want = ra.apply_plan(np.ascontiguousarray(flipped), plan, (1, 2, 3))
    got = ra.rand_augment(flipped, np.random.default_rng(seed), pad_val=(1, 2, 3))
    assert np.array_equal(got, want)
    manual = np.ascontiguousarray(flipped)
    for step in plan:
      if step.enabled:
        manual = step.policy.apply(manual, step.magnitude, (1, 2, 3))
    assert np.array_equal(got, manual)


def test_rand_augment_rejects_other_images_and_settings():
  with pytest.raises(ValueError):
    ra.rand_augment(np.zeros((8, 8, 3), np.uint16), np.random.default_rng(0))
  with pytest.raises(ValueError):
    ra.rand_augment(np.zeros((8, 8, 4), np.uint8), np.random.default_rng(0))
  with pytest.raises(ValueError):
    ra.rand_augment(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0), num_policies=0)
  with pytest.raises(ValueError):
    ra.rand_augment(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0), magnitude_std="wide")
