"""Change-detection examples for finetuning (MTP_SPEC §5.2, open-cd's pipeline).

Static example, S = data.image_size: image (2, S, S, 3) uint8, the two dates; semantic (S, S)
uint8 (0 unchanged, 1 changed, 255 ignored and padding); is_real () bool; image_id () str.
Training (open-cd, in order): MultiImgRandomRotFlip (with p 0.5 a rotation by U(-20, 20)
degrees about the centre, bilinear images, nearest labels, outside filled 0 / 255; then with p
0.5 a horizontal or vertical flip), RandomCrop S x S (cat_max_ratio 0.75), ExchangeTime (dates
swapped with p 0.5), PhotoMetricDistortion per date (brightness 10, contrast and saturation
0.8-1.2, hue 10), padding to S. Evaluation: the pair as converted, padded to S.
"""

import cv2
import numpy as np

from data_pipelines.downstream import schema
from data_pipelines.downstream.segmentation import random_crop
from data_pipelines.samrs import augment
from data_pipelines.samrs.reader import image_stem


def rotate(image, label, angle: float):
  h, w = label.shape
  m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
  images = [cv2.warpAffine(i, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0) for i in image]
  label = cv2.warpAffine(label, m, (w, h), flags=cv2.INTER_NEAREST, borderValue=255)
  return np.stack(images), label


def train_example(dates, label, rng, size: int):
  if rng.uniform() < 0.5:
    dates, label = rotate(dates, label, rng.uniform(-20, 20))
  if rng.uniform() < 0.5:   # horizontal or vertical alike
    vertical = bool(rng.integers(2))
    dates, label = np.flip(dates, 1 if vertical else 2), np.flip(label, 0 if vertical else 1)
  # Crop both dates together: the second date rides along as extra channels.
  stacked = np.concatenate(list(dates), axis=-1)
  sample = random_crop({"image": stacked, "semantic": np.ascontiguousarray(label),
                        "hboxes": np.zeros((0, 4), np.float32), "rboxes": np.zeros((0, 5), np.float32),
                        "box_valid": np.zeros(0, bool), "rbox_valid": np.zeros(0, bool)}, rng, size)
  dates = np.stack([sample["image"][..., :3], sample["image"][..., 3:]])
  label = sample["semantic"]
  if rng.uniform() < 0.5:
    dates = dates[::-1]
  dates = np.stack([augment.photometric(d, rng, brightness=10, contrast=(0.8, 1.2),
                                        saturation=(0.8, 1.2), hue_delta=10) for d in dates])
  return pad(dates, label, size)


def pad(dates, label, size: int):
  h, w = label.shape
  if h > size or w > size:
    raise ValueError(f"a {w}x{h} pair does not fit {size} x {size} (data.image_size)")
  out_d = np.zeros((2, size, size, 3), np.uint8)
  out_d[:, :h, :w] = dates
  out_l = np.full((size, size), 255, np.uint8)
  out_l[:h, :w] = label
  return out_d, out_l


def to_example(raw: bytes, *, image_size: int, rng=None) -> dict:
  record = schema.decode(raw)
  dates = np.stack([schema.decode_image(record, 1), schema.decode_image(record, 2)])
  label = schema.decode_semantic(record)
  if rng is not None:
    dates, label = train_example(dates, label, rng, image_size)
  else:
    dates, label = pad(dates, label, image_size)
  return {"image": np.ascontiguousarray(dates), "semantic": np.ascontiguousarray(label),
          "is_real": np.bool_(True), "image_id": np.str_(image_stem(record.filename))}


def example_shapes(size: int) -> dict:
  return {"image": ((2, size, size, 3), np.uint8), "semantic": ((size, size), np.uint8),
          "is_real": ((), bool)}
