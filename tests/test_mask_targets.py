"""Mask R-CNN mask targets from box crops (mtp_jax/ops/mask_targets.py) and the reader's crops/RLEs."""

import math

import grain
import jax
import numpy as np
from pycocotools import mask as mask_utils

from data_pipelines import augment
from data_pipelines.instances import MASK_CROP_SIZE
from data_pipelines.records import reader as records_reader
from data_pipelines.records import shards
from data_pipelines.samrs import examples as samrs_examples
from data_pipelines.samrs import schema
from mtp_jax.ops import mask_targets as mt

from mmcv_reference import bilinear_interpolate

targets_fn = jax.jit(mt.mask_targets, static_argnames=("out_size", "max_samples"))


# --- plain references, written per bin and per sample ------------------------------------------

def mmcv_roi_align(image, roi, size):
  """mmcv RoIAlign forward, aligned=True, sampling_ratio 0, spatial_scale 1, one map and box."""
  image = image.astype(np.float64)
  x1, y1, x2, y2 = (float(v) - 0.5 for v in roi)   # aligned
  roi_w, roi_h = x2 - x1, y2 - y1
  bin_w, bin_h = roi_w / size, roi_h / size
  gw, gh = math.ceil(roi_w / size), math.ceil(roi_h / size)
  out = np.zeros((size, size))
  for ph in range(size):
    for pw in range(size):
      acc = 0.0
      for iy in range(gh):
        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gh
        for ix in range(gw):
          x = x1 + pw * bin_w + (ix + 0.5) * bin_w / gw
          acc += bilinear_interpolate(image, y, x)
      out[ph, pw] = acc / max(gh * gw, 1)
  return out


def crop_resize_reference(crop, box, roi, out_size, max_samples):
  """Our device semantics in loops: mmcv's sample points of `roi` (adaptive, capped), each read
  bilinearly from `crop` (pixel k centred at box edge + (k + 0.5) * box side / R, the border
  value beyond the outer centres), tapered linearly to 0 at half a pixel outside the box; the
  bin's mean. Returns the soft (out_size, out_size) values."""
  r = crop.shape[0]
  crop = crop.astype(np.float64) / 255.0
  bx1, by1, bx2, by2 = (float(v) for v in box)
  x1, y1, x2, y2 = (float(v) for v in roi)
  kx = min(max(math.ceil((x2 - x1) / out_size), 1), max_samples)
  ky = min(max(math.ceil((y2 - y1) / out_size), 1), max_samples)

  def axis(t, b1, b2):   # -> (crop coordinate clamped to the centres, taper factor)
    cell = (b2 - b1) / r
    ramp = min(cell / 2, 0.5) + 0.5
    if t <= b1 - 0.5 or t >= b2 + 0.5:
      taper = 0.0
    else:
      taper = min(1.0, (t - (b1 - 0.5)) / ramp, ((b2 + 0.5) - t) / ramp)
    return min(max((t - b1) / cell - 0.5, 0.0), r - 1.0), taper

  def read(y, x):   # image coordinates
    if bx2 <= bx1 or by2 <= by1:
      return 0.0
    (v, ty), (u, tx) = axis(y, by1, by2), axis(x, bx1, bx2)
    v0, u0 = int(math.floor(v)), int(math.floor(u))
    v1, u1 = min(v0 + 1, r - 1), min(u0 + 1, r - 1)
    fv, fu = v - v0, u - u0
    return ty * tx * ((1 - fv) * ((1 - fu) * crop[v0, u0] + fu * crop[v0, u1])
                      + fv * ((1 - fu) * crop[v1, u0] + fu * crop[v1, u1]))

  out = np.zeros((out_size, out_size))
  if x2 <= x1 or y2 <= y1:
    return out
  for ph in range(out_size):
    for pw in range(out_size):
      acc = 0.0
      for iy in range(ky):
        y = y1 + (ph + (iy + 0.5) / ky) * (y2 - y1) / out_size
        for ix in range(kx):
          x = x1 + (pw + (ix + 0.5) / kx) * (x2 - x1) / out_size
          acc += read(y, x)
      out[ph, pw] = acc / (ky * kx)
  return out


def shapes(h=96, w=112):
  """Hand-made masks: a rectangle, a disc, an L shape, and their tight boxes."""
  yy, xx = np.mgrid[:h, :w] + 0.5
  rect = (xx > 10) & (xx < 47) & (yy > 7) & (yy < 30)
  disc = (xx - 70.3) ** 2 + (yy - 55.6) ** 2 <= 21.5 ** 2
  ell = ((xx > 20) & (xx < 30) & (yy > 40) & (yy < 90)) | ((xx > 20) & (xx < 60) & (yy > 80) & (yy < 90))
  masks = np.stack([rect, disc, ell])
  return masks, augment.mask_boxes(masks)


# --- (a) device targets equal the plain reference -----------------------------------------------

def test_mask_targets_equal_a_plain_reference_on_hand_made_crops():
  rng = np.random.default_rng(0)
  crops = rng.integers(0, 256, size=(3, 12, 12)).astype(np.uint8)
  crops[2] = (np.add.outer(np.arange(12), np.arange(12)) * 11).clip(0, 255)   # smooth ramp
  boxes = np.array([[4.0, 6.0, 20.0, 18.0], [10.5, 3.25, 40.0, 60.0], [0.0, 0.0, 9.0, 30.0]], np.float32)
  rois = np.array([
      [4.0, 6.0, 20.0, 18.0],        # the crop's own box
      [2.0, 1.0, 25.0, 21.0],        # larger: reads 0 outside the box
      [12.3, 9.7, 35.1, 50.2],       # inside, fractional
      [0.0, 0.0, 90.0, 130.0],       # 4 and 5 samples per bin: capped at 4
      [-3.0, -2.0, 7.0, 33.0],       # over the image edge
      [5.0, 5.0, 9.0, 9.0],          # unmatched (-1): zeros
      [1.0, 2.0, 1.0, 8.0],          # zero width: zeros
  ], np.float32)
  gt = np.array([0, 0, 1, 1, 2, -1, 2], np.int32)
  out = np.asarray(targets_fn(crops, boxes, rois, gt, out_size=7, max_samples=4))
  assert out.shape == (7, 7, 7) and out.dtype == np.float32
  checked = 0
  for s in range(len(rois)):
    soft = (crop_resize_reference(crops[gt[s]], boxes[gt[s]], rois[s], 7, 4) if gt[s] >= 0
            else np.zeros((7, 7)))
    clear = np.abs(soft - 0.5) > 1e-5   # float32 vs float64 may split exact ties
    np.testing.assert_array_equal(out[s][clear], (soft >= 0.5)[clear], err_msg=f"roi {s}")
    checked += clear.sum()
  assert checked > 0.95 * out.size
  assert out[1].sum() < out[0].sum() and out[3].any() and not out[5].any() and not out[6].any()
  # Float crops in [0, 1] give the same targets as uint8 ones.
  same = np.asarray(targets_fn(crops.astype(np.float32) / 255, boxes, rois, gt, out_size=7, max_samples=4))
  np.testing.assert_array_equal(same, out)


def test_crop_masks_is_mmcv_roi_align_of_the_mask_over_its_box():
  masks = np.zeros((3, 40, 48), bool)
  masks[0, 3:17, 5:30] = True
  yy, xx = np.mgrid[:40, :48] + 0.5
  masks[1] = (xx - 30) ** 2 + (yy - 22) ** 2 <= 9.3 ** 2
  masks[2, 30:40, 40:48] = True                     # touches the image border
  boxes = np.array([[5, 3, 30, 17], [19.6, 11.2, 40.1, 33.0], [39.2, 28.7, 48, 40]], np.float32)
  for size in (8, 5):   # upsampling (1 sample per bin) and adaptive 3-5 samples per bin
    soft = mt.roi_align_masks(masks, boxes, size)
    ref = np.stack([mmcv_roi_align(m, b, size) for m, b in zip(masks, boxes)])
    np.testing.assert_allclose(soft, ref, atol=1e-5)
    np.testing.assert_array_equal(mt.crop_masks(masks, boxes, size), np.rint(ref * 255).astype(np.uint8))
  assert not mt.crop_masks(masks[:1], np.array([[4, 4, 4, 9]]), 8).any()   # empty box: zeros


# --- (b) agreement with mmdet's full-mask targets ------------------------------------------------

def test_targets_from_crops_agree_with_full_mask_targets():
  masks, boxes = shapes()
  rng = np.random.default_rng(1)
  rois, gt = [], []
  for j, b in enumerate(boxes):
    w, h = b[2] - b[0], b[3] - b[1]
    rois.append(b)
    for _ in range(5):   # jittered, IoU >= 0.5 for these shifts and scales
      c = (b[:2] + b[2:]) / 2 + rng.uniform(-0.1, 0.1, 2) * [w, h]
      half = np.array([w, h]) / 2 * np.exp(rng.uniform(-0.2, 0.2, 2))
      rois.append(np.concatenate([c - half, c + half]))
    gt += [j] * 6
  rois, gt = np.asarray(rois, np.float32), np.asarray(gt, np.int32)
  reference = mt.roi_align_masks(masks[gt], rois, 28) >= 0.5
  ours = np.asarray(targets_fn(mt.crop_masks(masks, boxes, 56), boxes, rois, gt, out_size=28,
                               max_samples=4)) > 0.5
  differ = np.mean(ours != reference, axis=(1, 2))
  iou = (ours & reference).sum((1, 2)) / (ours | reference).sum((1, 2))
  # Measured: at most 0.26% of a RoI's pixels differ (mean 0.07%), IoU >= 0.996; crops taken
  # half a pixel off give 1.9% on average.
  assert differ.max() < 0.005 and iou.min() > 0.99, (differ, iou)
  assert np.mean(differ) < 0.002
  shifted = np.asarray(targets_fn(mt.crop_masks(masks, boxes + 0.5, 56), boxes, rois, gt,
                                  out_size=28, max_samples=4)) > 0.5
  assert np.mean(shifted != reference) > 5 * np.mean(ours != reference)


# --- (c) the reader ships crops (and RLEs for evaluation) ---------------------------------------

def _first_record(tfrecord_dir, subset="sota", split="valid"):
  path = shards.shard_files(tfrecord_dir, subset, split)[0]
  return next(iter(grain.experimental.TFRecordIterDataset(path)))


def test_eval_examples_carry_crops_and_rles_of_the_resized_masks(tfrecord_dir):
  raw = _first_record(tfrecord_dir)
  n = schema.decode(raw).num_instances
  m = n + 2
  example = samrs_examples.to_static_example(raw, 48, m, with_masks=True)   # 64 px source, resized
  dense = samrs_examples.resize_and_pad(samrs_examples.record_to_sample(schema.decode(raw), with_masks=True), 48)
  r = MASK_CROP_SIZE
  assert "masks" not in example and example["mask_crops"].shape == (m, r, r)
  assert example["mask_crops"].dtype == np.uint8
  np.testing.assert_array_equal(example["mask_crops"][:n],
                                mt.crop_masks(dense["masks"], example["hboxes"][:n], r))
  assert not example["mask_crops"][n:].any() and example["mask_crops"][:n].any()
  rles = example["mask_rles"]
  assert rles.shape == (m,) and rles.dtype == object and list(rles[n:]) == ["", ""]
  decoded = mask_utils.decode([{"size": [48, 48], "counts": c.encode()} for c in rles[:n]])
  np.testing.assert_array_equal(np.moveaxis(decoded, -1, 0), dense["masks"])
  # Decoded back through the device op, the crops give the dense masks' targets at their boxes.
  targets = np.asarray(targets_fn(example["mask_crops"], example["hboxes"], example["hboxes"],
                                  np.where(np.arange(m) < n, np.arange(m), -1).astype(np.int32),
                                  out_size=28, max_samples=4))
  reference = mt.roi_align_masks(dense["masks"], example["hboxes"][:n], 28) >= 0.5
  assert np.mean(targets[:n] != reference) < 0.01 and not targets[n:].any()
  # A padded final batch: RLEs '' and crops 0 in the filler; shapes as example_shapes says.
  batch = records_reader._pad_batch([example], 3)
  assert batch["mask_rles"].shape == (3, m) and set(batch["mask_rles"][1:].ravel()) == {""}
  assert not batch["mask_crops"][1:].any()
  shape, dtype = samrs_examples.example_shapes(48, m)["mask_crops"]
  assert batch["mask_crops"].shape[1:] == shape and batch["mask_crops"].dtype == dtype
  assert "mask_rles" not in samrs_examples.example_shapes(48, m)


def test_train_examples_carry_crops_of_the_augmented_masks(tfrecord_dir):
  raw = _first_record(tfrecord_dir, "fast", "train")
  example = samrs_examples.to_static_example(raw, 64, 3, rng=np.random.default_rng(5), with_masks=True)
  sample = augment.train_augment(samrs_examples.record_to_sample(schema.decode(raw), with_masks=True),
                                 np.random.default_rng(5), 64, augment.AugmentConfig())
  kept = np.flatnonzero(sample["box_valid"] | sample["rbox_valid"])[:3]
  k = len(kept)
  assert "mask_rles" not in example and "masks" not in example and k > 0
  np.testing.assert_array_equal(example["hboxes"][:k], sample["hboxes"][kept])
  np.testing.assert_array_equal(example["mask_crops"][:k],
                                mt.crop_masks(sample["masks"][kept], sample["hboxes"][kept],
                                              MASK_CROP_SIZE))
  assert not example["mask_crops"][k:].any()
  # The crop's mass sits where the mask is: a rotated rectangle fills >= 40% of its tight box.
  visible = sample["masks"][kept].reshape(k, -1).any(1)
  assert (example["mask_crops"][:k][visible].reshape(visible.sum(), -1).mean(1) > 50).all()
