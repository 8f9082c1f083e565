"""The instance fields of a static example: a padded sample's objects packed to a fixed count.

Shared by the SAMRS example (samrs/examples.py) and the finetuning detection example
(downstream/detection.py), which the `is`, `rd` and `hd` tasks read. M = max_instances,
R = MASK_CROP_SIZE:
  labels (M,) int32, rboxes (M, 5) float32 le90, hboxes (M, 4) float32, valid (M,) bool;
  rbox_valid (M,) bool: the rotated box is usable (its centre survived the crop);
  from a sample with masks: mask_crops (M, R, R) uint8: each packed instance's mask as mmcv's
    aligned RoIAlign over its packed hbox at R x R, soft coverage 0..255
    (`mtp_jax.ops.mask_targets.crop_masks`; the device resizes them to the sampled RoIs with
    `mask_targets`; dense (M, S, S) masks would cost 51 MB per image at S = 448), zeros for
    padding slots; with `mask_rles` also mask_rles (M,) object array of the instances' COCO RLE
    `counts` (ascii str), '' for padding slots (host only, for the COCO ground truth);
  num_instances () int32: usable instances before the cap (the excess is truncated);
  is_real () bool: True (False only in the padding examples of a final evaluation batch).
"""

import numpy as np

from mtp_jax.ops import mask_targets

# Side of the per-instance mask crops (module docstring), chosen by
# benchmarks/mask_target_fidelity.py: targets within 0.1% of mmdet's full-mask ones at 1/64 of
# the dense masks' bytes (docs/benchmarks.md). The device reads it from the crops' shape.
MASK_CROP_SIZE = 56


def pack(sample: dict, image_size: int, max_instances: int, mask_rles: bool = False) -> dict:
  """A padded sample (data_pipelines/augment.py) -> its image, semantic map and the instance
  fields of the module docstring.

  Usable instances (a usable box or rotated box) are packed first, in order, then capped at
  `max_instances`; `num_instances` counts them before the cap, so the dropped fraction is
  (num_instances - kept) / num_instances. A sample with masks gives `mask_crops`, and with
  `mask_rles` also the kept masks' RLEs.
  """
  usable = np.flatnonzero(sample["box_valid"] | sample["rbox_valid"])
  kept = usable[:max_instances]
  n = len(kept)
  out = {"image": sample["image"], "semantic": sample["semantic"],
         "labels": np.zeros((max_instances,), np.int32),
         "rboxes": np.zeros((max_instances, 5), np.float32),
         "hboxes": np.zeros((max_instances, 4), np.float32),
         "valid": np.zeros((max_instances,), bool), "rbox_valid": np.zeros((max_instances,), bool),
         "num_instances": np.int32(len(usable)), "is_real": np.bool_(True)}
  out["labels"][:n] = sample["labels"][kept]
  out["rboxes"][:n] = sample["rboxes"][kept]
  out["hboxes"][:n] = sample["hboxes"][kept]
  out["valid"][:n] = sample["box_valid"][kept]
  out["rbox_valid"][:n] = sample["rbox_valid"][kept]
  if "masks" in sample:
    r = MASK_CROP_SIZE
    out["mask_crops"] = np.zeros((max_instances, r, r), np.uint8)
    out["mask_crops"][:n] = mask_targets.crop_masks(sample["masks"][kept], out["hboxes"][:n], r)
    if mask_rles:
      out["mask_rles"] = encode_rles(sample["masks"][kept], max_instances)
  return out


def encode_rles(masks: np.ndarray, length: int) -> np.ndarray:
  """(N, H, W) bool -> (length,) object array of COCO RLE `counts` (ascii str), '' past N."""
  from pycocotools import mask as mask_utils  # lazy: only mask-using pipelines need it
  out = np.full((length,), "", object)
  if len(masks):
    rles = mask_utils.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
    out[:len(masks)] = [r["counts"].decode("ascii") for r in rles]
  return out
