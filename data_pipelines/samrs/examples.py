"""The SAMRS static example: a SAMRS record (schema.py) -> augmented, packed numpy example.

The records reader (data_pipelines/records/) reads SAMRS shards with `parser(...)`; `make_dataset`
and `train_batches` are that reader with this parser.

A static example (numpy), S = image_size, M = max_instances:
  image (S, S, 3) uint8 RGB, zero-padded;
  semantic (S, S) uint8, SAMRS gray + 1 with uint8 wrap (background 255 -> 0, class k -> k+1,
    MTP_SPEC §3.4) and 255 = padding (ignored by the loss);
  the instance fields of data_pipelines/instances.py: labels, rboxes (le90), hboxes, valid,
    rbox_valid, num_instances, is_real; with `with_masks` mask_crops, and for evaluation examples
    (rng None) also mask_rles in the evaluated S x S geometry;
  image_id () str: the image's file stem (unique within a subset; '' for padding examples).
Training examples go through `augment.train_augment`; evaluation images are resized (longer
side = S, aspect kept) and zero padded, boxes scaled with them.
"""

import functools

import numpy as np

from data_pipelines import augment
from data_pipelines.instances import MASK_CROP_SIZE, pack
from data_pipelines.records import reader
from data_pipelines.records.batches import TrainBatches
from data_pipelines.records.images import decode_png_or_jpeg, image_stem
from data_pipelines.samrs import schema


def record_to_sample(record: schema.SamrsRecord, with_masks: bool = False) -> dict:
  """A decoded record as an `augment` sample (full resolution, all instances usable).

  The semantic map becomes SAMRS gray + 1 with uint8 wrap (background 255 -> 0, class k -> k+1,
  MTP_SPEC §3.4). Masks are decoded from their COCO RLE only when asked (they cost H x W bytes
  per instance).
  """
  if record.image_format == "raw":
    image = np.frombuffer(record.image_bytes, np.uint8).reshape(record.height, record.width, 3)
  else:
    image = decode_png_or_jpeg(record.image_bytes, "RGB")
  gray = decode_png_or_jpeg(record.semantic_bytes, "L")
  if image.shape[:2] != gray.shape:
    raise ValueError(f"{record.filename}: semantic map {gray.shape} differs from image {image.shape[:2]}")
  n = record.num_instances
  sample = {"image": image, "semantic": gray.astype(np.uint8) + np.uint8(1),
            "hboxes": record.hboxes.astype(np.float32).reshape(n, 4),
            "rboxes": record.rboxes.astype(np.float32).reshape(n, 5),
            "labels": record.labels.astype(np.int32), "box_valid": np.ones(n, bool),
            "rbox_valid": np.ones(n, bool)}
  if with_masks:
    from pycocotools import mask as mask_utils  # lazy: only mask-using pipelines need it
    h, w = gray.shape
    rles = [{"size": [h, w], "counts": c} for c in record.mask_rles]
    sample["masks"] = (np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool) if n
                       else np.zeros((0, h, w), bool))
  for key in ("hboxes", "rboxes"):
    if not np.isfinite(sample[key]).all():
      raise ValueError(f"{record.filename}: non-finite {key}")
  return sample


def resize_and_pad(sample: dict, image_size: int) -> dict:
  """Evaluation geometry (§3.4 validation): longer side to image_size, aspect kept, padded."""
  h, w = sample["image"].shape[:2]
  if (h, w) != (image_size, image_size):
    sample = augment.resize(sample, image_size / max(h, w))
  return augment.pad_to(sample, image_size)


def example_shapes(image_size: int, max_instances: int) -> dict:
  """{field: (shape, numpy dtype)} of a static example's device fields (module docstring;
  `mask_crops` is present only in `with_masks` examples; the host-only `image_id` and
  `mask_rles` are left out)."""
  s, m, r = image_size, max_instances, MASK_CROP_SIZE
  return {"image": ((s, s, 3), np.uint8), "semantic": ((s, s), np.uint8), "labels": ((m,), np.int32),
          "rboxes": ((m, 5), np.float32), "hboxes": ((m, 4), np.float32), "valid": ((m,), bool),
          "rbox_valid": ((m,), bool), "num_instances": ((), np.int32), "is_real": ((), bool),
          "mask_crops": ((m, r, r), np.uint8)}


def to_static_example(raw: bytes, image_size: int, max_instances: int, rng=None,
                      augment_config=None, with_masks: bool = False) -> dict:
  """Parses one TFRecord into a static example; augments it when `rng` is given (training)."""
  record = schema.decode(raw)
  sample = record_to_sample(record, with_masks)
  if rng is None:
    sample = resize_and_pad(sample, image_size)
  else:
    sample = augment.train_augment(sample, rng, image_size, augment_config or augment.AugmentConfig())
  example = pack(sample, image_size, max_instances, mask_rles=rng is None)
  example["image_id"] = np.str_(image_stem(record.filename))
  return example


def parser(image_size: int, max_instances: int, augment_config=None, with_masks: bool = False):
  """parse(raw, rng) of the records reader for SAMRS records (`to_static_example`); the
  augmentation is `augment_config`, default MTP's."""
  return functools.partial(to_static_example, image_size=image_size, max_instances=max_instances,
                           with_masks=with_masks, augment_config=augment_config or augment.AugmentConfig())


def make_dataset(data_dir: str, subset: str, split: str, *, image_size: int, max_instances: int,
                 augment_config=None, with_masks: bool = False, **options):
  """`records.reader.make_dataset` (its `options`) over a SAMRS subset's split, with `parser`."""
  return reader.make_dataset(data_dir, subset, split,
                             parse=parser(image_size, max_instances, augment_config, with_masks), **options)


def train_batches(data_dir: str, subsets, *, image_size: int, max_instances: dict, augment_config=None,
                  with_masks: bool = False, **options) -> TrainBatches:
  """`TrainBatches` (its `options`) over SAMRS subsets, each with `parser` and its own
  max_instances[subset] (0 when absent)."""
  parse = {s: parser(image_size, max_instances.get(s, 0), augment_config, with_masks) for s in subsets}
  return TrainBatches(data_dir, subsets, parse=parse, **options)
