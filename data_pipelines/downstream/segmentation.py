"""Semantic-segmentation examples for finetuning (MTP_SPEC §5.2, mmseg's pipeline).

Static example: image (S, S, 3) uint8; semantic (S, S) uint8 (0 background, k + 1 class k, 255
ignored, also the padding); image_hw (2,) int32, the unpadded height and width; is_real () bool;
image_id () str. S = data.image_size (the crop) for training, eval.image_size (a canvas that
holds the split's largest image) for evaluation.
Training (mmseg, in order): RandomResize(scale=(S, S), ratio_range=(0.5, 2.0), keep_ratio=True)
as the original's configs set it, which scales the image to fit inside S r x S r, r ~ U(0.5, 2.0)
(`rescale_factor`; LoveDA's 1024-px tiles with S = 512 train at 0.25-1x their native resolution;
aspect kept, bilinear image, nearest labels), RandomCrop S x S with cat_max_ratio 0.75 (up to 10 draws until
no class covers 75 % of the crop's labelled pixels), horizontal flip 0.5, PhotoMetricDistortion,
padding to S x S. Evaluation: the whole image, unresized, padded to the canvas; slide inference
(mtp_jax/models/slide.py) reads image_hw.
"""

import numpy as np

from data_pipelines import augment
from data_pipelines.downstream import schema
from data_pipelines.records.images import image_stem

CAT_MAX_RATIO = 0.75


def _sample(image, label):
  empty = np.zeros((0,), bool)
  return {"image": image, "semantic": label, "hboxes": np.zeros((0, 4), np.float32),
          "rboxes": np.zeros((0, 5), np.float32), "labels": np.zeros((0,), np.int32),
          "box_valid": empty, "rbox_valid": empty}


def random_crop(sample: dict, rng, size: int, cat_max_ratio: float = CAT_MAX_RATIO, tries: int = 10):
  """mmseg RandomCrop: up to `tries` draws until the largest class has < cat_max_ratio of the
  crop's labelled pixels (and more than one class is present); else the last draw."""
  h, w = sample["image"].shape[:2]
  ch, cw = min(size, h), min(size, w)
  for _ in range(tries):
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    label = sample["semantic"][top:top + ch, left:left + cw]
    _, counts = np.unique(label[label != 255], return_counts=True)
    if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
      break
  return augment.crop(sample, top, left, ch, cw)


def rescale_factor(height: int, width: int, crop: int, ratio: float) -> float:
  """The image's scale factor under mmseg's RandomResize(scale=(crop, crop), ratio_range,
  keep_ratio=True) once it has drawn `ratio`: the target scale is (int(crop r), int(crop r))
  (`_random_sample_ratio`) and mmcv's imrescale fits the image inside it, long side to the long
  edge and short side to the short edge, whichever is tighter. New sizes are then rounded
  (`augment.resize`; mmcv's int(x + 0.5) differs only at an exact half pixel)."""
  long_edge = short_edge = int(crop * ratio)
  return min(long_edge / max(height, width), short_edge / min(height, width))


def train_example(image, label, rng, size: int) -> dict:
  factor = rescale_factor(*image.shape[:2], size, rng.uniform(0.5, 2.0))
  sample = augment.resize(_sample(image, label), factor)
  sample = random_crop(sample, rng, size)
  if rng.uniform() < 0.5:
    sample = augment.flip(sample, "horizontal")
  sample = dict(sample, image=augment.photometric(sample["image"], rng))
  hw = sample["image"].shape[:2]
  return augment.pad_to(sample, size), hw


def to_example(raw: bytes, *, image_size: int, eval_size: int, rng=None) -> dict:
  """One record -> the static example of the module docstring (augmented when rng is given)."""
  record = schema.decode(raw)
  image, label = schema.decode_image(record), schema.decode_semantic(record)
  if rng is not None:
    sample, hw = train_example(image, label, rng, image_size)
  else:
    h, w = label.shape
    if h > eval_size or w > eval_size:
      raise ValueError(f"{record.filename}: a {w}x{h} image does not fit the {eval_size} px "
                       "evaluation canvas (raise eval.image_size)")
    sample, hw = augment.pad_to(_sample(image, label), eval_size), (h, w)
  return {"image": sample["image"], "semantic": sample["semantic"],
          "image_hw": np.asarray(hw, np.int32), "is_real": np.bool_(True),
          "image_id": np.str_(image_stem(record.filename))}


def example_shapes(size: int) -> dict:
  return {"image": ((size, size, 3), np.uint8), "semantic": ((size, size), np.uint8),
          "image_hw": ((2,), np.int32), "is_real": ((), bool)}
