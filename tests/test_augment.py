"""Augmentations keep image, semantic map, masks, horizontal and rotated boxes consistent.

Property tests on the synthetic sample, whose masks are the rasterised rotated boxes and whose
semantic map paints the instances in order: after any transform, (1) every usable horizontal box
is the tight box of its mask within a pixel, (2) every usable rotated box rasterises to its mask
except within a pixel of the box outline, (3) every mask pixel not covered by a later instance
carries that instance's class in the semantic map, and no other pixel carries a class.
"""

import os

import numpy as np
import pytest

from data_pipelines import augment
from data_pipelines.instances import MASK_CROP_SIZE
from data_pipelines.records import shards
from data_pipelines.samrs import classes, raw
from data_pipelines.samrs import examples as samrs_examples
from mtp_jax.ops import box_iou_rotated

CANVAS = -1   # label of the extra all-ones mask that marks the image content through transforms


def _samples(sample_dir, name, count=4):
  layout = classes.SUBSETS[name]
  stems = raw.read_split_list(os.path.join(sample_dir, layout.base, "train.txt"))[:count]
  out = []
  for stem in stems:
    s = samrs_examples.record_to_sample(raw.read_sample(sample_dir, layout, stem), with_masks=True)
    s["hboxes"] = augment.mask_boxes(s["masks"])   # exact tight boxes to start from
    h, w = s["semantic"].shape
    # The canvas: an instance covering the whole image, first (so every real one paints over it).
    s["masks"] = np.concatenate([np.ones((1, h, w), bool), s["masks"]])
    s["hboxes"] = np.concatenate([[[0, 0, w, h]], s["hboxes"]]).astype(np.float32)
    s["rboxes"] = np.concatenate([[[w / 2, h / 2, w, h, 0]], s["rboxes"]]).astype(np.float32)
    s["labels"] = np.concatenate([[CANVAS], s["labels"]]).astype(np.int32)
    s["box_valid"] = np.ones(len(s["labels"]), bool)
    s["rbox_valid"] = np.ones(len(s["labels"]), bool)
    out.append(s)
  return out


def _rasterise(rbox, shape):
  ys, xs = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
  cx, cy, w, h, t = (float(v) for v in rbox)
  u = (xs - cx) * np.cos(t) + (ys - cy) * np.sin(t)
  v = -(xs - cx) * np.sin(t) + (ys - cy) * np.cos(t)
  return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2), u, v


def check_consistent(s, tolerance=1.0, box_tolerance=None):
  h, w = s["semantic"].shape
  assert s["image"].shape == (h, w, 3) and s["masks"].shape[1:] == (h, w)
  content = s["masks"][0]
  assert s["labels"][0] == CANVAS and content.any()
  masks, labels = s["masks"][1:], s["labels"][1:]
  box_valid, rbox_valid = s["box_valid"][1:], s["rbox_valid"][1:]
  # (1) horizontal boxes against their masks.
  tight = augment.mask_boxes(masks)
  for k in np.flatnonzero(box_valid):
    assert masks[k].any()
    err = np.abs(s["hboxes"][1 + k] - tight[k]).max()
    assert err <= (box_tolerance or tolerance), (k, s["hboxes"][1 + k], tight[k])
  # (2) rotated boxes against their masks, inside the image content.
  for k in np.flatnonzero(rbox_valid):
    drawn, u, v = _rasterise(s["rboxes"][1 + k], (h, w))
    differ = (drawn != masks[k]) & content
    bw, bh = s["rboxes"][1 + k][2:4]
    to_outline = np.minimum(np.abs(np.abs(u) - bw / 2), np.abs(np.abs(v) - bh / 2))
    assert (to_outline[differ] <= tolerance + 1e-3).all(), (k, to_outline[differ].max())
  # (3) the semantic map against the masks, painted in order.
  painted = np.zeros((h, w), np.int32)   # 0 = background
  for k in range(len(labels)):
    painted[masks[k]] = labels[k] + 1
  np.testing.assert_array_equal(s["semantic"][content], painted[content].astype(np.uint8))
  assert (s["semantic"][~content] == 255).all()


@pytest.fixture(scope="module")
def samples(sample_dir):
  return _samples(sample_dir, "sota") + _samples(sample_dir, "fast", 2)


def test_untouched_samples_are_consistent(samples):
  for s in samples:
    check_consistent(s)


@pytest.mark.parametrize("direction", augment.FLIPS)
def test_flips(samples, direction):
  for s in samples:
    out = augment.flip(s, direction)
    check_consistent(out, tolerance=1e-4)
    back = augment.flip(out, direction)                      # a flip is its own inverse
    np.testing.assert_array_equal(back["image"], s["image"])
    np.testing.assert_allclose(back["hboxes"], s["hboxes"], atol=1e-4)
    assert float(box_iou_rotated(back["rboxes"], s["rboxes"], aligned=True).min()) > 1 - 1e-5


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_quarter_turns(samples, turns):
  for s in samples:
    out = augment.rot90(s, turns)
    check_consistent(out, tolerance=1e-4)
  four = augment.rot90(augment.rot90(samples[0], turns), 4 - turns)
  np.testing.assert_array_equal(four["semantic"], samples[0]["semantic"])


@pytest.mark.parametrize("scale", [0.5, 0.77, 1.6, 2.0])
def test_resize(samples, scale):
  # Nearest-neighbour mask resizing (as mmdet's) keeps one source row and column in 1/scale when
  # shrinking, so a thin corner tip can vanish: the mask's tight box may then sit up to one
  # output pixel (a sampling step) further inside the scaled box, on top of the pixel grid's own
  # rounding. train_augment recomputes boxes from masks when it crops (mmdet's recompute_bbox),
  # so its boxes match their masks within a pixel, as checked below.
  for s in samples:
    check_consistent(augment.resize(s, scale), box_tolerance=2.0 if scale < 1 else 1.0)


def test_crops_including_borders_and_empty_windows(samples):
  rng = np.random.default_rng(0)
  for s in samples:
    h, w = s["semantic"].shape
    for _ in range(6):
      ch, cw = rng.integers(8, h + 1), rng.integers(8, w + 1)
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      out = augment.crop(s, int(top), int(left), int(ch), int(cw))
      check_consistent(out)
      # Cut objects lose their box only when nothing of them is left in the window.
      visible = out["masks"].reshape(len(out["masks"]), -1).any(1)
      np.testing.assert_array_equal(out["box_valid"], visible)


def test_train_augment_sequences_with_quarter_turns_and_padding(samples):
  config = augment.AugmentConfig(rot90=True)
  rng = np.random.default_rng(1)
  for s in samples:
    for _ in range(5):
      out = augment.train_augment(s, rng, 48, config)
      assert out["image"].shape == (48, 48, 3)
      check_consistent(out)
      assert (out["box_valid"][1:] | out["rbox_valid"][1:]).any()   # empty crops are redrawn


def test_photometric_changes_colours_only_within_mmcv_ranges():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
  outs = [augment.photometric(image, np.random.default_rng(i)) for i in range(40)]
  assert any(not np.array_equal(o, image) for o in outs)
  assert sum(np.array_equal(o, image) for o in outs) >= 1          # all four skipped: p = 1/16
  assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)
  # Hue and saturation change colour, not brightness order: a grey image stays grey.
  grey = np.full((4, 4, 3), 100, np.uint8)
  for i in range(20):
    out = augment.photometric(grey, np.random.default_rng(i)).astype(int)
    assert (out.max(-1) - out.min(-1)).max() <= 1


def test_static_examples_pack_usable_instances_first_and_count_the_cap(tfrecord_dir):
  import grain
  from data_pipelines.samrs import schema
  path = shards.shard_files(tfrecord_dir, "fast", "train")[0]
  raw_record = next(iter(grain.experimental.TFRecordIterDataset(path)))
  n = schema.decode(raw_record).num_instances
  example = samrs_examples.to_static_example(raw_record, 64, 2, rng=np.random.default_rng(0), with_masks=True)
  assert example["mask_crops"].shape == (2, MASK_CROP_SIZE, MASK_CROP_SIZE)
  assert example["num_instances"] <= n
  usable = int(example["num_instances"])
  assert example["valid"].sum() + (example["rbox_valid"] & ~example["valid"]).sum() == min(usable, 2)


def test_train_augment_without_masks_clips_boxes_to_the_window(samples):
  rng = np.random.default_rng(3)
  for s in samples:
    plain = {k: v for k, v in s.items() if k != "masks"}
    for _ in range(5):
      out = augment.train_augment(plain, rng, 40)
      content_h = int((out["semantic"] != 255).any(1).sum())
      content_w = int((out["semantic"] != 255).any(0).sum())
      hb = out["hboxes"][out["box_valid"]]
      assert (hb[:, 0] >= 0).all() and (hb[:, 2] <= content_w).all() and (hb[:, 3] <= content_h).all()
      assert ((hb[:, 2] > hb[:, 0]) & (hb[:, 3] > hb[:, 1])).all()
      rb = out["rboxes"][out["rbox_valid"]]
      assert ((rb[:, 0] > 0) & (rb[:, 0] < content_w) & (rb[:, 1] > 0) & (rb[:, 1] < content_h)).all()
