"""paste_masks equals mmdet 3.x's CPU mask pasting (FCNMaskHead._predict_by_feat_single with one
detection per chunk and _do_paste_mask(skip_empty=True)), written here in PyTorch as mmdet writes
it; masks_to_rles round-trips through pycocotools."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mtp_jax.metrics.mask_paste import masks_to_rles, paste_mask_values, paste_masks

torch = pytest.importorskip("torch")
F = torch.nn.functional


def mmdet_paste(probs, boxes, height, width, threshold=0.5):
  """The reference: mmdet's CPU path, one detection at a time. Returns (bool masks, float values)."""
  probs = torch.from_numpy(np.asarray(probs, np.float32))
  boxes = torch.from_numpy(np.asarray(boxes, np.float32))
  masks = torch.zeros(len(probs), height, width, dtype=torch.bool)
  values = torch.zeros(len(probs), height, width)
  for i in range(len(probs)):
    box, m = boxes[i:i + 1], probs[i:i + 1, None]
    x0_int, y0_int = torch.clamp(box.min(dim=0).values.floor()[:2] - 1, min=0).to(dtype=torch.int32)
    x1_int = torch.clamp(box[:, 2].max().ceil() + 1, max=width).to(dtype=torch.int32)
    y1_int = torch.clamp(box[:, 3].max().ceil() + 1, max=height).to(dtype=torch.int32)
    if x0_int > x1_int or y0_int > y1_int:
      continue   # a box wholly outside the image: torch.arange raises in mmdet; we paste nothing
    x0, y0, x1, y1 = torch.split(box, 1, dim=1)
    img_y = torch.arange(y0_int, y1_int).to(torch.float32) + 0.5
    img_x = torch.arange(x0_int, x1_int).to(torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    img_x[torch.isinf(img_x)] = 0
    img_y[torch.isinf(img_y)] = 0
    gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
    sampled = F.grid_sample(m, torch.stack([gx, gy], dim=3), align_corners=False)[:, 0]
    masks[i, y0_int:y1_int, x0_int:x1_int] = sampled[0] >= threshold
    values[i, y0_int:y1_int, x0_int:x1_int] = sampled[0]
  return masks.numpy(), values.numpy()


def random_case(rng, k, height, width, size=28):
  xy = rng.uniform(-8, [width + 4, height + 4], (k, 2))
  wh = rng.exponential(15, (k, 2)) + rng.choice([0.0, 0.01, 1.0], (k, 2))
  boxes = np.c_[xy, xy + wh]
  boxes[: k // 4] = np.round(boxes[: k // 4])            # integer boxes: pixel centres on cell edges
  boxes[k // 4, 2] = boxes[k // 4, 0]                    # zero width (inf -> 0, mmdet)
  boxes[k // 4 + 1, 3] = boxes[k // 4 + 1, 1] = 10.5    # zero height through a pixel centre (0/0)
  boxes[k // 4 + 2] = [-3.2, -2.7, width + 5.1, height + 3.3]   # larger than the image
  probs = rng.random((k, size, size)).astype(np.float32)
  probs[: k // 5] = probs[: k // 5] > 0.5               # exact 0 / 1 maps: values on the threshold
  probs[k // 5] = 0.5
  return probs, boxes.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paste_equals_mmdet_cpu_bit_for_bit(seed):
  rng = np.random.default_rng(seed)
  height, width = (72, 96) if seed < 2 else (50, 41)
  probs, boxes = random_case(rng, 60, height, width)
  ref_masks, ref_values = mmdet_paste(probs, boxes, height, width)
  masks = paste_masks(probs, boxes, height, width)
  assert masks.shape == (60, height, width) and masks.dtype == bool
  np.testing.assert_array_equal(masks, ref_masks)
  assert 2000 < masks.sum() < masks.size // 4             # something pasted, not everything
  values = paste_mask_values(probs, boxes, height, width)
  if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
    # torch's vectorised kernel with fused multiply-adds, reproduced exactly
    np.testing.assert_array_equal(values, ref_values)
  else:   # a build without FMA rounds each product: at most a few ulp apart
    np.testing.assert_allclose(values, ref_values, rtol=0, atol=1e-6)


def test_threshold_zero_and_class_selection_as_mmdet():
  rng = np.random.default_rng(3)
  probs, boxes = random_case(rng, 20, 40, 40)
  ref, _ = mmdet_paste(probs, boxes, 40, 40, threshold=0.0)
  np.testing.assert_array_equal(paste_masks(probs, boxes, 40, 40, threshold=0.0), ref)   # whole window
  assert not ref[:, 0, :].all()
  per_class = rng.random((20, 3, 28, 28)).astype(np.float32)
  labels = rng.integers(0, 3, 20)
  per_class[np.arange(20), labels] = probs                 # mask_preds[range(N), labels]
  np.testing.assert_array_equal(paste_masks(per_class, boxes, 40, 40, labels=labels),
                                paste_masks(probs, boxes, 40, 40))


def test_box_outside_image_and_empty_input():
  probs = np.ones((2, 28, 28), np.float32)
  boxes = np.array([[50, 5, 60, 9], [-20, -20, -10, -10]], np.float32)   # right of / above the image
  assert not paste_masks(probs, boxes, 30, 40).any()
  assert paste_masks(np.zeros((0, 28, 28)), np.zeros((0, 4)), 30, 40).shape == (0, 30, 40)
  whole = paste_masks(probs[:1], np.array([[0, 0, 40, 30]]), 30, 40)
  assert whole.all()


def test_masks_to_rles_round_trip():
  rng = np.random.default_rng(4)
  masks = rng.random((5, 33, 47)) < 0.3
  rles = masks_to_rles(masks)
  assert [r["size"] for r in rles] == [[33, 47]] * 5 and all(isinstance(r["counts"], str) for r in rles)
  decoded = np.moveaxis(mask_utils.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles]), -1, 0)
  np.testing.assert_array_equal(decoded, masks)
  np.testing.assert_array_equal(mask_utils.area(rles), masks.sum((1, 2)))
  assert masks_to_rles(np.zeros((0, 4, 4), bool)) == []
