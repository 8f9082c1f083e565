"""Scene-classification examples (MTP_SPEC §5.2, mmpretrain's pipeline) from finetuning records.

Static example, S = data.image_size, C = bands (after data.bands):
  image (S, S, C) of the release's pixel type (uint8 RGB; uint16 for EuroSAT's 13 bands);
  label () int32 (class index); is_real () bool; image_id () str (stem).
Training: RandomResizedCrop to S (area 0.08-1, aspect 3/4-4/3, bicubic), horizontal flip 0.5,
with data.rand_augment = n > 0 mmpretrain's RandAugment (timm "increasing", n ops, magnitude
9 +- 0.5, fill = the rounded data.mean; downstream/rand_augment.py; uint8 RGB only), then
RandomErasing 0.25 (area 0.02-1/3, aspect 0.3-3.3, per-pixel fill drawn from the dataset's
mean/std). Evaluation: shorter side resized to S * 256 / 224 (bicubic), centre crop S.
Ours: the bicubic resizes are OpenCV's (INTER_CUBIC, a = -0.75, no antialiasing); the original's
configs ask for Pillow's (backend='pillow': a = -0.5, antialiased when shrinking), so pixels
differ by a few grey levels, most where a crop is shrunk (RandomResizedCrop of a large area).
"""

import math

import cv2
import numpy as np

from data_pipelines.downstream import rand_augment as rand_augment_lib
from data_pipelines.downstream import schema
from data_pipelines.records.images import image_stem


def random_resized_crop(image, rng, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries: int = 10):
  """mmpretrain's RandomResizedCrop: a random area/aspect box (10 tries, else the centre crop
  of the clamped aspect), resized to size x size with bicubic interpolation."""
  h, w = image.shape[:2]
  area = h * w
  for _ in range(tries):
    target = rng.uniform(*scale) * area
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      break
  else:
    aspect = w / h
    cw, ch = (w, int(round(w / ratio[0]))) if aspect < ratio[0] else (
        (int(round(h * ratio[1])), h) if aspect > ratio[1] else (w, h))
    cw, ch = min(cw, w), min(ch, h)
    y, x = (h - ch) // 2, (w - cw) // 2
  return resize(image[y:y + ch, x:x + cw], (size, size))


def resize(image, size_hw):
  """Bicubic resize of (H, W, C) uint8 to size_hw (channels kept, also C > 4)."""
  h, w = size_hw
  if image.shape[2] <= 4:
    out = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)
    return out.reshape(h, w, image.shape[2])
  return np.stack([cv2.resize(image[..., c], (w, h), interpolation=cv2.INTER_CUBIC)
                   for c in range(image.shape[2])], axis=-1)


def random_erasing(image, rng, mean, std, prob: float = 0.25, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3)):
  """mmpretrain's RandomErasing (mode 'rand'): with `prob`, one box of random area and aspect is
  filled with per-pixel values drawn from N(mean, std) per channel, clipped to the pixel range."""
  if rng.uniform() >= prob:
    return image
  h, w, c = image.shape
  for _ in range(10):
    target = rng.uniform(*area) * h * w
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    eh, ew = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
    if 0 < eh < h and 0 < ew < w:
      y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
      fill = rng.normal(np.asarray(mean), np.asarray(std), size=(eh, ew, c))
      limit = np.iinfo(image.dtype).max
      image = image.copy()
      image[y:y + eh, x:x + ew] = np.clip(np.round(fill), 0, limit).astype(image.dtype)
      return image
  return image


def eval_geometry(image, size: int):
  """Shorter side to size * 256 / 224 (bicubic), then the centre size x size crop."""
  h, w = image.shape[:2]
  short = int(size * 256 / 224)
  nh, nw = (short, max(short, int(round(w * short / h)))) if h <= w else (max(short, int(round(h * short / w))), short)
  image = resize(image, (nh, nw))
  y, x = (nh - size) // 2, (nw - size) // 2
  return image[y:y + size, x:x + size]


def to_example(raw: bytes, *, image_size: int, mean, std, rng=None, bands=None, dtype="uint8",
               rand_augment: int = 0) -> dict:
  """One record -> the static example of the module docstring (augmented when rng is given).
  bands: channel indices to keep (None: all); mean / std: one per kept band; dtype: the pixel
  type the examples carry (a record of another type, or of other bands, is an error);
  rand_augment: RandAugment ops per training image (0: none)."""
  record = schema.decode(raw)
  if record.label < 0:
    raise ValueError(f"{record.filename}: the record has no class label")
  if record.dtype != dtype:
    raise ValueError(f"{record.filename}: {record.dtype} pixels, the dataset's are {dtype}")
  image = schema.decode_image(record)
  if bands is not None:
    if max(bands) >= image.shape[-1]:
      raise ValueError(f"{record.filename}: data.bands {tuple(bands)} asks for band {max(bands)} "
                       f"of a {image.shape[-1]}-band image")
    image = image[..., list(bands)]
  if image.shape[-1] != len(mean):
    raise ValueError(f"{record.filename}: {image.shape[-1]} bands, but data.mean / data.std "
                     f"give {len(mean)} (set data.bands, or one mean and std per band)")
  if rng is None:
    image = eval_geometry(image, image_size)
  else:
    image = random_resized_crop(image, rng, image_size)
    if rng.uniform() < 0.5:
      image = image[:, ::-1]
    if rand_augment:
      image = rand_augment_lib.rand_augment(np.ascontiguousarray(image), rng, num_policies=rand_augment,
                                            pad_val=tuple(int(round(m)) for m in mean))
    image = random_erasing(image, rng, mean, std)
  return {"image": np.ascontiguousarray(image), "label": np.int32(record.label),
          "is_real": np.bool_(True), "image_id": np.str_(image_stem(record.filename))}


def example_shapes(image_size: int, channels: int, dtype="uint8") -> dict:
  """{field: (shape, dtype)} of a static example's device fields."""
  return {"image": ((image_size, image_size, channels), np.dtype(dtype)), "label": ((), np.int32),
          "is_real": ((), bool)}
