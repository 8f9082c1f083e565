"""Change-detection examples for finetuning (MTP_SPEC §5.2, open-cd's pipeline).

Static example, S = data.image_size, C = bands (after data.bands): image (2, S, S, C) of the
release's pixel type (uint8 RGB; uint16 for OSCD's Sentinel-2 bands), the two dates; semantic
(S, S) uint8 (0 unchanged, 1 changed, 255 ignored and padding); is_real () bool; image_id () str.
First, with data.resize R > 0, the pair is resized to R x R (bilinear images, nearest labels:
OSCD's 96-px patches to 224, as MTP does), in training and evaluation.
Training (open-cd, in order): MultiImgRandomRotFlip (with p 0.5 a rotation by U(-20, 20)
degrees about the centre, bilinear images, nearest labels, outside filled 0 / 255; then with p
0.5 a horizontal or vertical flip), RandomCrop S x S (cat_max_ratio 0.75), ExchangeTime (dates
swapped with p 0.5), PhotoMetricDistortion per date (brightness 10, contrast and saturation
0.8-1.2, hue 10), padding to S. Evaluation: the pair as converted (resized), padded to S; with eval.label_size the
label stays as converted (MTP's OSCD: its val pipeline loads labels after the resize, so F1 is
scored at the native 96 px, the logits resized back to them).
Ours: the photometric distortion is mmcv's for 8-bit RGB and is applied to uint8 RGB pairs only;
16-bit or N-band pairs (OSCD's digital numbers) skip it (MTP's OSCD patches are 8-bit RGB).
"""

import cv2
import numpy as np

from data_pipelines import augment
from data_pipelines.downstream import schema
from data_pipelines.downstream.segmentation import random_crop
from data_pipelines.records.images import image_stem


def per_channel(fn, image):
  """fn over an (H, W, C) image: whole for C <= 4 (cv2's limit), else channel by channel."""
  if image.shape[-1] <= 4:
    out = fn(image)
    return out.reshape(*out.shape[:2], image.shape[-1])
  return np.stack([fn(np.ascontiguousarray(image[..., c])) for c in range(image.shape[-1])], axis=-1)


def rotate(image, label, angle: float):
  h, w = label.shape
  m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
  warp = lambda i: cv2.warpAffine(i, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
  label = cv2.warpAffine(label, m, (w, h), flags=cv2.INTER_NEAREST, borderValue=255)
  return np.stack([per_channel(warp, i) for i in image]), label


def resize(dates, label, size: int):
  """Both dates bilinearly, the label by nearest neighbour, to size x size."""
  scale = lambda i: cv2.resize(i, (size, size), interpolation=cv2.INTER_LINEAR)
  return (np.stack([per_channel(scale, d) for d in dates]),
          cv2.resize(label, (size, size), interpolation=cv2.INTER_NEAREST))


def train_example(dates, label, rng, size: int):
  if rng.uniform() < 0.5:
    dates, label = rotate(dates, label, rng.uniform(-20, 20))
  if rng.uniform() < 0.5:   # horizontal or vertical alike
    vertical = bool(rng.integers(2))
    dates, label = np.flip(dates, 1 if vertical else 2), np.flip(label, 0 if vertical else 1)
  # Crop both dates together: the second date rides along as extra channels.
  c = dates.shape[-1]
  stacked = np.concatenate(list(dates), axis=-1)
  sample = random_crop({"image": stacked, "semantic": np.ascontiguousarray(label),
                        "hboxes": np.zeros((0, 4), np.float32), "rboxes": np.zeros((0, 5), np.float32),
                        "box_valid": np.zeros(0, bool), "rbox_valid": np.zeros(0, bool)}, rng, size)
  dates = np.stack([sample["image"][..., :c], sample["image"][..., c:]])
  label = sample["semantic"]
  if rng.uniform() < 0.5:
    dates = dates[::-1]
  if dates.dtype == np.uint8 and c == 3:
    dates = np.stack([augment.photometric(d, rng, brightness=10, contrast=(0.8, 1.2),
                                          saturation=(0.8, 1.2), hue_delta=10) for d in dates])
  return pad(dates, label, size)


def pad(dates, label, size: int):
  h, w = label.shape
  if h > size or w > size:
    raise ValueError(f"a {w}x{h} pair does not fit {size} x {size} (data.image_size)")
  out_d = np.zeros((2, size, size, dates.shape[-1]), dates.dtype)
  out_d[:, :h, :w] = dates
  out_l = np.full((size, size), 255, np.uint8)
  out_l[:h, :w] = label
  return out_d, out_l


def to_example(raw: bytes, *, image_size: int, rng=None, bands=None, dtype="uint8", resize_to: int = 0,
               label_size: int = 0) -> dict:
  """One record -> the static example of the module docstring (augmented when rng is given).
  bands: channel indices to keep (None: all); dtype: the release's pixel type (a record of
  another is an error); resize_to: data.resize (0: as converted); label_size: eval.label_size,
  in evaluation the label kept as converted, which must be label_size x label_size."""
  record = schema.decode(raw)
  if record.dtype != dtype:
    raise ValueError(f"{record.filename}: {record.dtype} pixels, the dataset's are {dtype}")
  dates = np.stack([schema.decode_image(record, 1), schema.decode_image(record, 2)])
  if bands is not None:
    if max(bands) >= dates.shape[-1]:
      raise ValueError(f"{record.filename}: data.bands {tuple(bands)} asks for band {max(bands)} "
                       f"of a {dates.shape[-1]}-band pair")
    dates = dates[..., list(bands)]
  label = schema.decode_semantic(record)
  native = label
  if resize_to:
    dates, label = resize(dates, label, resize_to)
  if rng is not None:
    dates, label = train_example(dates, label, rng, image_size)
  elif label_size:
    if native.shape != (label_size, label_size):
      raise ValueError(f"{record.filename}: a {native.shape[1]}x{native.shape[0]} label, eval.label_size "
                       f"is {label_size}")
    dates, label = pad(dates, label, image_size)[0], native
  else:
    dates, label = pad(dates, label, image_size)
  return {"image": np.ascontiguousarray(dates), "semantic": np.ascontiguousarray(label),
          "is_real": np.bool_(True), "image_id": np.str_(image_stem(record.filename))}


def example_shapes(size: int, channels: int = 3, dtype="uint8", label_size: int = 0) -> dict:
  labels = label_size or size
  return {"image": ((2, size, size, channels), np.dtype(dtype)), "semantic": ((labels, labels), np.uint8),
          "is_real": ((), bool)}
