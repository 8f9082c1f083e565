"""Detection examples for finetuning (MTP_SPEC §5.2, mmrotate 1.x's and mmdet 3's pipelines).

Static example (the `rd` and `hd` tasks' fields, packed by data_pipelines/instances.py): image (S, S, 3)
uint8; rboxes (M, 5) le90 float32 (each object's quadrilateral converted as mmrotate 1.x does,
`ops.boxes.quad_to_rbox_min_area`) and hboxes (M, 4) (the quadrilateral's hull) of the usable
objects first, labels (M,) int32, rbox_valid / valid (M,) bool, num_instances () int32 (usable
objects before the cap M); difficult (M,) bool (the release's flag or a patch's cut object:
ignored by the DOTA metric, as the devkit ignores every non-zero flag); is_real () bool; host only: image_id () str (the
record's file stem: a patch id for split releases), source_id () str (the source image: the
image itself when unsplit), patch_origin (2,) float32 (the window's top-left in source pixels)
and patch_scale () float32 (pixels of this example per source pixel), which map detections
back onto the source image (mtp_jax/metrics/patch_merge.py).
M = data.max_instances[dataset] for training, the split's most objects per example
(dataset_info.json) for evaluation, so evaluation sees every object.
Training (mmrotate, in order): Resize to S with the aspect kept (longer side S; bilinear), RandomFlip
with p 0.75 (horizontal, vertical, diagonal alike; mmdet's horizontal detection: p 0.5, horizontal), optional RandomRotate (`rotate_prob`: an angle
U(-180, 180) degrees clockwise about the centre, canvas kept, border 0; a multiple of 90 degrees
when the image holds a `rect_classes` object; objects whose centre leaves the image dropped),
padding to S x S. Every object trains (mmrotate's diff_thr 100 ignores none). Evaluation: Resize
and padding only.
"""

import numpy as np

from data_pipelines import augment
from data_pipelines.downstream import schema
from data_pipelines.instances import pack
from data_pipelines.records.images import image_stem
from mtp_jax.ops import boxes as box_ops

HORIZONTAL_ANGLES = (90, 180, -90, -180)   # mmrotate RandomRotate.horizontal_angles


def record_sample(record: schema.DownstreamRecord) -> dict:
  """A decoded detection record as an `augment` sample (all objects usable) + difficult flags."""
  if record.polygons is None:
    raise ValueError(f"{record.filename}: the record has no objects field (not a detection record)")
  image = schema.decode_image(record)
  polys = np.asarray(record.polygons, np.float64).reshape(-1, 4, 2)
  n = len(polys)
  return {"image": image, "semantic": np.zeros(image.shape[:2], np.uint8),
          "hboxes": box_ops.poly_to_hbox(polys).astype(np.float32),
          "rboxes": box_ops.quad_to_rbox_min_area(polys).astype(np.float32),
          "labels": np.asarray(record.object_labels, np.int32), "box_valid": np.ones(n, bool),
          "rbox_valid": np.ones(n, bool), "difficult": np.asarray(record.difficult, np.int32) != 0}


def rotate(sample: dict, degrees: float) -> dict:
  """mmrotate `Rotate`: the image turned `degrees` clockwise on screen about its centre (canvas
  kept, bilinear, border 0), rotated boxes turned alike; an object whose centre leaves the image
  becomes unusable (mmdet's is_inside filter); horizontal boxes are the rotated boxes' hulls."""
  import cv2  # noqa: PLC0415
  h, w = sample["image"].shape[:2]
  # cv2 works in pixel indices, whose centre is ((w - 1) / 2, (h - 1) / 2), our (w / 2, h / 2);
  # its positive angle turns counter-clockwise on screen, hence the minus (as mmcv's imrotate).
  matrix = cv2.getRotationMatrix2D(((w - 1) * 0.5, (h - 1) * 0.5), -degrees, 1.0)
  out = dict(sample)
  out["image"] = cv2.warpAffine(sample["image"], matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
  theta = np.deg2rad(degrees)
  rb = sample["rboxes"].astype(np.float64).copy()
  dx, dy = rb[:, 0] - w / 2, rb[:, 1] - h / 2
  rb[:, 0] = w / 2 + dx * np.cos(theta) - dy * np.sin(theta)
  rb[:, 1] = h / 2 + dx * np.sin(theta) + dy * np.cos(theta)
  rb[:, 4] = box_ops.norm_angle_le90(rb[:, 4] + theta)
  out["rboxes"] = rb.astype(np.float32)
  out["hboxes"] = box_ops.rbox_to_hbox(rb).astype(np.float32)
  inside = (rb[:, 0] > 0) & (rb[:, 0] < w) & (rb[:, 1] > 0) & (rb[:, 1] < h)
  out["rbox_valid"] = sample["rbox_valid"] & inside
  out["box_valid"] = sample["box_valid"] & inside
  return out


def train_sample(sample: dict, rng, size: int, flip_prob: float = 0.75, rotate_prob: float = 0.0,
                 rect_classes=(), flips=augment.FLIPS) -> dict:
  """The training sequence of the module docstring, padded to size x size; `flips`: the flip
  directions drawn alike (mmdet's horizontal only for horizontal detection)."""
  h, w = sample["image"].shape[:2]
  if (h, w) != (size, size):
    sample = augment.resize(sample, size / max(h, w))
  if rng.uniform() < flip_prob:
    sample = augment.flip(sample, flips[rng.integers(len(flips))])
  if rotate_prob and rng.uniform() < rotate_prob:
    degrees = 180.0 * (2 * rng.uniform() - 1)
    if np.isin(sample["labels"], rect_classes).any():
      degrees = float(HORIZONTAL_ANGLES[rng.integers(4)])
    sample = rotate(sample, degrees)
  return augment.pad_to(sample, size)


def to_example(raw: bytes, *, image_size: int, max_instances: int, flip_prob: float = 0.75,
               rotate_prob: float = 0.0, rect_classes=(), flips=augment.FLIPS, rng=None) -> dict:
  """One record -> the static example of the module docstring (augmented when rng is given)."""
  record = schema.decode(raw)
  sample = record_sample(record)
  h, w = sample["image"].shape[:2]
  scale = image_size / max(h, w)
  if rng is not None:
    sample = train_sample(sample, rng, image_size, flip_prob, rotate_prob, tuple(rect_classes), tuple(flips))
  else:
    if (h, w) != (image_size, image_size):
      sample = augment.resize(sample, scale)
    sample = augment.pad_to(sample, image_size)
  example = pack(sample, image_size, max_instances)
  example.pop("semantic")
  usable = np.flatnonzero(sample["box_valid"] | sample["rbox_valid"])[:max_instances]
  example["difficult"] = np.zeros((max_instances,), bool)
  example["difficult"][:len(usable)] = sample["difficult"][usable]
  example["image_id"] = np.str_(image_stem(record.filename))
  example["source_id"] = np.str_(record.patch_source or image_stem(record.filename))
  example["patch_origin"] = np.asarray([record.patch_x, record.patch_y], np.float32)
  example["patch_scale"] = np.float32(scale)
  return example


def example_shapes(image_size: int, max_instances: int) -> dict:
  """{field: (shape, dtype)} of the example's array fields (the strings are left out)."""
  s, m = image_size, max_instances
  return {"image": ((s, s, 3), np.uint8), "labels": ((m,), np.int32), "rboxes": ((m, 5), np.float32),
          "hboxes": ((m, 4), np.float32), "valid": ((m,), bool), "rbox_valid": ((m,), bool),
          "difficult": ((m,), bool), "num_instances": ((), np.int32), "is_real": ((), bool),
          "patch_origin": ((2,), np.float32), "patch_scale": ((), np.float32)}
