"""mmpretrain's RandAugment with the 'timm_increasing' policies, as MTP's scene-classification
finetuning configures it, in numpy / cv2 (no torch, no mmcv).

Reproduces (mmpretrain 1.x, the transform applied to uint8 images after RandomResizedCrop and
RandomFlip, before RandomErasing):

    dict(type='RandAugment', policies='timm_increasing', num_policies=2, total_level=10,
         magnitude_level=9, magnitude_std=0.5,
         hparams=dict(pad_val=[104, 116, 124], interpolation='bicubic'))

with pad_val = [round(x) for x in bgr_mean], bgr_mean = [103.53, 116.28, 123.675] (BGR).

Sources read: mmpretrain/datasets/transforms/auto_augment.py (RandAugment, BaseAugTransform,
merge_hparams, the op classes AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize,
SolarizeAdd, ColorTransform, Contrast, Brightness, Sharpness, Shear, Translate, and
RANDAUG_POLICIES['timm_increasing']); mmcv 2.x mmcv/image/photometric.py (auto_contrast,
imequalize, iminvert, posterize, solarize, adjust_color, adjust_contrast, adjust_brightness,
adjust_sharpness), mmcv/image/geometric.py (imrotate, imshear, imtranslate and their matrices),
mmcv/image/colorspace.py (bgr2gray = cv2 BGR2GRAY).

Semantics (mmpretrain's, in the order it draws its randomness):
  1. `num_policies` indices into the 15-entry policy table, uniformly WITH replacement
     (np.random.choice(15, size=num_policies)); the chosen ops run in the drawn order.
  2. Per chosen op: one uniform u; the op is skipped when u > prob (prob = 0.5 for every op).
  3. Ops with a magnitude_range, when not skipped: level = magnitude_level, perturbed when
     magnitude_std > 0 to N(magnitude_level, magnitude_std) clipped to [0, total_level]
     (magnitude_std 'inf': Uniform(0, magnitude_level); <= 0: unchanged, not clipped); mapped
     linearly, magnitude = level / total_level * (hi - lo) + lo for magnitude_range (lo, hi)
     (reversed ranges (4, 0), (256, 0) make a higher level a stronger op).
  4. Symmetric ops (Rotate, ColorTransform, Contrast, Brightness, Sharpness, Shear, Translate)
     then draw one more uniform and negate the magnitude when it is < 0.5; Posterize, Solarize
     and SolarizeAdd never negate (random_negative_prob = 0, no draw); AutoContrast, Equalize
     and Invert have no magnitude (only the skip draw).
  hparams reach only the ops whose constructor takes them: pad_val and interpolation='bicubic'
  go to Rotate, Shear and Translate (overriding Rotate's and Translate's 'nearest' default).
  At the config's level 9: Rotate +-27 deg, Posterize ceil(0.4) = 1 bit, Solarize thr 25.6,
  SolarizeAdd +99, colour / contrast / brightness / sharpness factor 1 +- 0.81, Shear +-0.27,
  Translate +-0.405 of the side.

Differences:
  - Deliberate: randomness comes from the `rng` argument (np.random.Generator) instead of
    numpy's global legacy RandomState; the distributions and the order of the draws are
    mmpretrain's (above), the streams are not the same numbers.
  - Deliberate: images are RGB, mmpretrain's are BGR. Every op but the grey conversion and the
    fill value is per channel; the grey image uses cv2's RGB2GRAY on RGB (bit-identical to
    mmcv's BGR2GRAY on the same pixels in BGR order) and pad_val is taken in RGB order
    (default (124, 116, 104) = mmpretrain's BGR [104, 116, 124]), so outputs equal mmpretrain's
    with the channels reversed; no numeric difference.
  - Deliberate: only (H, W, 3) uint8 input (mmcv's equalize / auto_contrast / adjust_color are
    three-channel only too; the config runs on uint8 RGB).
  - The blends (cv2.addWeighted in float32, then truncation) are the same cv2 calls as mmcv's;
    their last bit depends on the cv2 build (this one fuses multiply-adds), so two builds can
    differ by 1 grey level on a few pixels, as two mmcv installs can.
"""

import dataclasses
import math
from typing import Callable, Optional, Sequence, Union

import cv2
import numpy as np

MEAN_RGB = (123.675, 116.28, 103.53)
PAD_VAL_RGB = tuple(int(round(v)) for v in MEAN_RGB)   # (124, 116, 104): mmpretrain's BGR pad_val reversed

# mmcv.adjust_sharpness's default kernel (PIL.ImageFilter.SMOOTH).
_SMOOTH = np.array([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"RandAugment takes (H, W, 3) uint8 RGB images, got {image.shape} {image.dtype}")
  return np.ascontiguousarray(image)


def _blend(image: np.ndarray, degenerate: np.ndarray, factor: float) -> np.ndarray:
  """mmcv's float blend: image * factor + degenerate * (1 - factor) in float32 (cv2.addWeighted),
  clipped to [0, 255] and truncated to uint8."""
  out = cv2.addWeighted(image.astype(np.float32), factor, degenerate.astype(np.float32), 1 - factor, 0)
  return np.clip(out, 0, 255).astype(np.uint8)


def _gray(image: np.ndarray) -> np.ndarray:
  """The (H, W) uint8 grey image of mmcv's bgr2gray, from RGB (0.299 R + 0.587 G + 0.114 B)."""
  return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _warp(image: np.ndarray, matrix: np.ndarray, pad_val) -> np.ndarray:
  """cv2.warpAffine with `matrix` as the forward (source -> output) map, bicubic, constant fill."""
  h, w = image.shape[:2]
  return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT,
                        borderValue=tuple(int(v) for v in pad_val)[:3])


# ---------------------------------------------------------------------------------------------
# The ops (mmpretrain transform + the mmcv function it calls). Each takes and returns (H, W, 3)
# uint8 RGB; `magnitude`-taking ops take the value after the range mapping and the random sign.


def auto_contrast(image: np.ndarray) -> np.ndarray:
  """AutoContrast (mmcv.auto_contrast, cutoff 0); no magnitude. Per channel, the value range
  [lo, hi] is stretched to [0, 255] (v -> (v - lo) * 255 / (hi - lo), truncated); a constant
  channel is kept."""
  out = image.copy()
  for c in range(3):
    lo, hi = int(image[..., c].min()), int(image[..., c].max())
    if lo >= hi:
      continue
    scale = 255.0 / (hi - lo)
    lut = np.clip(np.arange(256) * scale - lo * scale, 0, 255).astype(np.uint8)
    out[..., c] = lut[image[..., c]]
  return out


def equalize(image: np.ndarray) -> np.ndarray:
  """Equalize (mmcv.imequalize, PIL's algorithm); no magnitude. Per channel, with hist the
  256-bin histogram and step = (pixels - count of the highest occupied value) // 255, value v
  maps to min(255, (step // 2 + #pixels below v) // step); step 0 keeps the channel."""
  out = image.copy()
  for c in range(3):
    hist = np.bincount(image[..., c].ravel(), minlength=256)
    occupied = np.flatnonzero(hist)
    step = (int(hist.sum()) - int(hist[occupied[-1]])) // 255
    if step == 0:
      continue
    below = np.concatenate([[0], np.cumsum(hist)[:-1]])
    lut = np.minimum((below + step // 2) // step, 255).astype(np.uint8)
    out[..., c] = lut[image[..., c]]
  return out


def invert(image: np.ndarray) -> np.ndarray:
  """Invert (mmcv.iminvert); no magnitude: v -> 255 - v."""
  return 255 - image


def rotate(image: np.ndarray, angle: float, pad_val=PAD_VAL_RGB) -> np.ndarray:
  """Rotate (mmcv.imrotate): `angle` in degrees, positive = clockwise, about the centre
  ((W - 1) / 2, (H - 1) / 2), scale 1, same size, bicubic, outside filled with pad_val (RGB).
  Range (0, 30), signed: level 9 -> +-27."""
  h, w = image.shape[:2]
  matrix = cv2.getRotationMatrix2D(((w - 1) * 0.5, (h - 1) * 0.5), -float(angle), 1.0)
  return _warp(image, matrix, pad_val)


def posterize(image: np.ndarray, bits: float) -> np.ndarray:
  """Posterize (mmcv.posterize after mmpretrain's ceil): keeps the ceil(bits) high bits of each
  value (0 bits: black). Range (4, 0), unsigned: level 9 -> ceil(0.4) = 1 bit."""
  keep = math.ceil(bits)
  if keep <= 0:
    return np.zeros_like(image)
  mask = (0xFF << (8 - min(keep, 8))) & 0xFF
  return image & np.uint8(mask)


def solarize(image: np.ndarray, thr: float) -> np.ndarray:
  """Solarize (mmcv.solarize): values >= thr become 255 - v. Range (256, 0), unsigned: level 9 ->
  thr 25.6; level 0 -> 256 (identity)."""
  return np.where(image < thr, image, 255 - image).astype(np.uint8)


def solarize_add(image: np.ndarray, magnitude: float, thr: float = 128) -> np.ndarray:
  """SolarizeAdd (mmpretrain's own): values < thr (128) get + magnitude, capped at 255, the sum
  truncated to an integer. Range (0, 110), unsigned: level 9 -> +99."""
  added = np.minimum(image.astype(np.float64) + magnitude, 255.0)
  return np.where(image < thr, added, image).astype(np.uint8)


def color(image: np.ndarray, magnitude: float) -> np.ndarray:
  """ColorTransform (mmcv.adjust_color with alpha = 1 + magnitude): image * alpha + grey *
  (1 - alpha) by cv2.addWeighted on uint8 (rounded, saturated); 0 = identity, -1 = grey.
  Range (0, 0.9), signed: level 9 -> factor 1 +- 0.81."""
  alpha = 1 + magnitude
  grey = np.repeat(_gray(image)[..., None], 3, axis=2)
  return cv2.addWeighted(image, alpha, grey, 1 - alpha, 0)


def contrast(image: np.ndarray, magnitude: float) -> np.ndarray:
  """Contrast (mmcv.adjust_contrast with factor = 1 + magnitude): blend with the flat image of
  the grey mean (rounded half to even), float32, clipped, truncated; 0 = identity.
  Range (0, 0.9), signed: level 9 -> factor 1 +- 0.81."""
  grey = _gray(image)
  mean = round(float(grey.sum(dtype=np.int64)) / grey.size)
  return _blend(image, np.full(image.shape, mean, np.uint8), 1 + magnitude)


def brightness(image: np.ndarray, magnitude: float) -> np.ndarray:
  """Brightness (mmcv.adjust_brightness with factor = 1 + magnitude): image * factor, float32,
  clipped, truncated; 0 = identity. Range (0, 0.9), signed: level 9 -> factor 1 +- 0.81."""
  return _blend(image, np.zeros_like(image), 1 + magnitude)


def sharpness(image: np.ndarray, magnitude: float) -> np.ndarray:
  """Sharpness (mmcv.adjust_sharpness with factor = 1 + magnitude): blend with the image smoothed
  by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (cv2.filter2D, uint8, reflect-101 border: unlike
  PIL, the border pixels are filtered too), float32, clipped, truncated; 0 = identity.
  Range (0, 0.9), signed: level 9 -> factor 1 +- 0.81."""
  return _blend(image, cv2.filter2D(image, -1, _SMOOTH), 1 + magnitude)


def shear(image: np.ndarray, magnitude: float, direction: str = "horizontal", pad_val=PAD_VAL_RGB) -> np.ndarray:
  """Shear (mmcv.imshear): forward map x' = x + magnitude * y ('horizontal') or
  y' = y + magnitude * x ('vertical') about the top-left corner (float32 matrix), bicubic,
  pad_val fill. Range (0, 0.3), signed: level 9 -> +-0.27."""
  if direction == "horizontal":
    matrix = np.float32([[1, magnitude, 0], [0, 1, 0]])
  elif direction == "vertical":
    matrix = np.float32([[1, 0, 0], [magnitude, 1, 0]])
  else:
    raise ValueError(f"direction must be 'horizontal' or 'vertical', got {direction!r}")
  return _warp(image, matrix, pad_val)


def translate(image: np.ndarray, magnitude: float, direction: str = "horizontal", pad_val=PAD_VAL_RGB) -> np.ndarray:
  """Translate (mmpretrain Translate + mmcv.imtranslate): shifts by magnitude * W to the right
  ('horizontal') or magnitude * H down ('vertical'), negative the other way (float32 matrix),
  bicubic, pad_val fill. Range (0, 0.45), signed: level 9 -> +-0.405 of the side."""
  h, w = image.shape[:2]
  if direction == "horizontal":
    matrix = np.float32([[1, 0, magnitude * w], [0, 1, 0]])
  elif direction == "vertical":
    matrix = np.float32([[1, 0, 0], [0, 1, magnitude * h]])
  else:
    raise ValueError(f"direction must be 'horizontal' or 'vertical', got {direction!r}")
  return _warp(image, matrix, pad_val)


# ---------------------------------------------------------------------------------------------
# The policy table and the sampling.


@dataclasses.dataclass(frozen=True)
class Policy:
  """One RANDAUG_POLICIES entry. random_negative_prob 0 means no sign draw at all; geometric ops
  take pad_val; kwargs are the entry's fixed arguments (direction)."""
  name: str
  op: Callable
  magnitude_range: Optional[tuple] = None
  prob: float = 0.5
  random_negative_prob: float = 0.0
  geometric: bool = False
  kwargs: tuple = ()

  def apply(self, image: np.ndarray, magnitude: Optional[float], pad_val=PAD_VAL_RGB) -> np.ndarray:
    kwargs = dict(self.kwargs)
    if self.geometric:
      kwargs["pad_val"] = pad_val
    if self.magnitude_range is None:
      return self.op(image, **kwargs)
    return self.op(image, magnitude, **kwargs)


_SIGNED = 0.5
TIMM_INCREASING = (
    Policy("AutoContrast", auto_contrast),
    Policy("Equalize", equalize),
    Policy("Invert", invert),
    Policy("Rotate", rotate, (0, 30), random_negative_prob=_SIGNED, geometric=True),
    Policy("Posterize", posterize, (4, 0)),
    Policy("Solarize", solarize, (256, 0)),
    Policy("SolarizeAdd", solarize_add, (0, 110)),
    Policy("ColorTransform", color, (0, 0.9), random_negative_prob=_SIGNED),
    Policy("Contrast", contrast, (0, 0.9), random_negative_prob=_SIGNED),
    Policy("Brightness", brightness, (0, 0.9), random_negative_prob=_SIGNED),
    Policy("Sharpness", sharpness, (0, 0.9), random_negative_prob=_SIGNED),
    Policy("Shear", shear, (0, 0.3), random_negative_prob=_SIGNED, geometric=True,
           kwargs=(("direction", "horizontal"),)),
    Policy("Shear", shear, (0, 0.3), random_negative_prob=_SIGNED, geometric=True,
           kwargs=(("direction", "vertical"),)),
    Policy("Translate", translate, (0, 0.45), random_negative_prob=_SIGNED, geometric=True,
           kwargs=(("direction", "horizontal"),)),
    Policy("Translate", translate, (0, 0.45), random_negative_prob=_SIGNED, geometric=True,
           kwargs=(("direction", "vertical"),)),
)


def sample_magnitude(rng: np.random.Generator, magnitude_range: Sequence[float], *, magnitude_level: float = 9,
                     magnitude_std: Union[float, str] = 0.5, total_level: float = 10) -> float:
  """mmpretrain's BaseAugTransform.random_magnitude: the level (N(level, std) clipped to
  [0, total_level] when std > 0; Uniform(0, level) when std is 'inf'; else the level, no draw)
  mapped to level / total_level * (hi - lo) + lo."""
  level = magnitude_level
  if magnitude_std == "inf":
    level = rng.uniform(0, level)
  elif magnitude_std > 0:
    level = float(np.clip(rng.normal(level, magnitude_std), 0, total_level))
  lo, hi = magnitude_range
  return (level / total_level) * (hi - lo) + lo


@dataclasses.dataclass(frozen=True)
class Step:
  """One drawn op: whether it runs and with which (signed) magnitude (None: magnitude-free)."""
  policy: Policy
  enabled: bool
  magnitude: Optional[float] = None


def sample_plan(rng: np.random.Generator, *, num_policies: int = 2, magnitude_level: float = 9,
                magnitude_std: Union[float, str] = 0.5, total_level: float = 10,
                policies: Sequence[Policy] = TIMM_INCREASING) -> list:
  """The random part of RandAugment, drawn in mmpretrain's order (module docstring, 1-4)."""
  if num_policies <= 0 or magnitude_level < 0 or total_level <= 0:
    raise ValueError("need num_policies > 0, magnitude_level >= 0 and total_level > 0")
  if isinstance(magnitude_std, str) and magnitude_std != "inf":
    raise ValueError(f"magnitude_std must be a number or 'inf', got {magnitude_std!r}")
  steps = []
  for index in rng.choice(len(policies), size=num_policies):
    policy = policies[int(index)]
    if rng.random() > policy.prob:
      steps.append(Step(policy, False))
      continue
    magnitude = None
    if policy.magnitude_range is not None:
      magnitude = sample_magnitude(rng, policy.magnitude_range, magnitude_level=magnitude_level,
                                   magnitude_std=magnitude_std, total_level=total_level)
      if policy.random_negative_prob > 0 and rng.random() < policy.random_negative_prob:
        magnitude = -magnitude
    steps.append(Step(policy, True, magnitude))
  return steps


def apply_plan(image: np.ndarray, plan: Sequence[Step], pad_val=PAD_VAL_RGB) -> np.ndarray:
  """Runs the enabled steps of a plan in order on an (H, W, 3) uint8 RGB image."""
  image = _as_rgb_uint8(image)
  for step in plan:
    if step.enabled:
      image = step.policy.apply(image, step.magnitude, pad_val)
  return image


def rand_augment(image: np.ndarray, rng: np.random.Generator, *, num_policies: int = 2, magnitude_level: float = 9,
                 magnitude_std: Union[float, str] = 0.5, total_level: float = 10,
                 pad_val=PAD_VAL_RGB) -> np.ndarray:
  """mmpretrain's RandAugment('timm_increasing', ..., interpolation='bicubic') on an (H, W, 3)
  uint8 RGB image; pad_val (the geometric ops' fill) in RGB order. Returns (H, W, 3) uint8."""
  image = _as_rgb_uint8(image)
  if len(pad_val) != 3:
    raise ValueError(f"pad_val must have 3 values (RGB), got {pad_val!r}")
  plan = sample_plan(rng, num_policies=num_policies, magnitude_level=magnitude_level,
                     magnitude_std=magnitude_std, total_level=total_level)
  return apply_plan(image, plan, pad_val)
