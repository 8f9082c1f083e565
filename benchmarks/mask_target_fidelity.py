"""Mask targets from R x R box crops vs mmdet's full-mask targets, per crop size R (figures, not a test).

    python benchmarks/mask_target_fidelity.py [--sizes 448 128] [--images 8] [--crop-sizes 28 56 112] \
        [--out benchmarks/results/mask_target_fidelity.json]

For each image size it writes the synthetic SAMRS sample (`--images` per subset, seed 0), converts
the train split, and draws one training example per record (`augment.train_augment` at the same
size: flips, resize x U(0.5, 2), crop, so boxes are the masks' tight boxes, as in training). The
RoIs of an instance are its gt box (mmdet adds gt boxes as proposals) and 4 jittered boxes with
IoU >= 0.5 (clipped to the image), as positive proposals are. Reference: mmdet's
`crop_and_resize` (mmcv aligned RoIAlign of the full mask, adaptive sampling, 28 x 28, >= 0.5),
`mask_targets.roi_align_masks`. Ours: `crop_masks` at the tight box at R x R (uint8), then
`mask_targets` (jitted). Figures: the fraction of target pixels that differ and the mean IoU of
target masks (both empty counts as 1), over all RoIs, for each R and `max_samples`, and with
float (unquantised) crops at one R; the host cost of `crop_masks`.
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from _report import write_result  # noqa: E402
from data_pipelines import augment  # noqa: E402
from data_pipelines.records import shards  # noqa: E402
from data_pipelines.samrs import convert, schema, synthetic  # noqa: E402
from data_pipelines.samrs import examples as samrs_examples  # noqa: E402
from mtp_jax.ops import mask_targets as mt  # noqa: E402

OUT_SIZE = 28


def _iou(a, b):
  lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
  inter = np.prod(np.clip(rb - lt, 0, None))
  area = lambda x: (x[2] - x[0]) * (x[3] - x[1])
  return inter / (area(a) + area(b) - inter)


def jittered_rois(box, rng, image_size, count=4):
  """`count` boxes around `box` with IoU >= 0.5, clipped to the image; the box itself first."""
  out = [box]
  w, h = box[2] - box[0], box[3] - box[1]
  while len(out) < count + 1:
    cx = (box[0] + box[2]) / 2 + rng.uniform(-0.25, 0.25) * w
    cy = (box[1] + box[3]) / 2 + rng.uniform(-0.25, 0.25) * h
    nw, nh = w * np.exp(rng.uniform(-0.35, 0.35)), h * np.exp(rng.uniform(-0.35, 0.35))
    cand = np.clip([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], 0, image_size)
    if _iou(cand, box) >= 0.5:
      out.append(cand)
  return np.asarray(out, np.float32)


def training_instances(root, size, images, seed=0):
  """[(masks (N, S, S) bool, tight boxes (N, 4))] of one augmented example per training record."""
  synthetic.generate(root, images=images, size=size, seed=seed)
  out_dir = os.path.join(root, "tfrecords")
  rng = np.random.default_rng(seed)
  out = []
  for subset in ("sota", "sior", "fast"):
    convert.convert_split(root, subset, "train", out_dir, num_shards=1, log=lambda *_: None)
    for path in shards.shard_files(out_dir, subset, "train"):
      for raw in grain.experimental.TFRecordIterDataset(path):
        sample = samrs_examples.record_to_sample(schema.decode(raw), with_masks=True)
        sample = augment.train_augment(sample, rng, size)
        keep = sample["box_valid"]
        out.append((sample["masks"][keep], sample["hboxes"][keep]))
  return out


def collect(instances, size, seed=0):
  """All RoIs with their gt's full mask, gt box and reference targets."""
  rng = np.random.default_rng(seed + 1)
  masks, boxes, rois, gt = [], [], [], []
  for m, b in instances:
    for i in range(len(b)):
      r = jittered_rois(b[i], rng, size)
      rois.append(r)
      gt.append(np.full(len(r), len(boxes) + i))
    masks.extend(m)
    boxes.extend(b)
  masks, boxes = np.asarray(masks), np.asarray(boxes, np.float32)
  rois, gt = np.concatenate(rois), np.concatenate(gt).astype(np.int32)
  reference = np.zeros((len(rois), OUT_SIZE, OUT_SIZE), bool)
  for s in range(0, len(rois), 512):   # full-mask RoIAlign, chunked (masks are S x S each)
    reference[s:s + 512] = mt.roi_align_masks(masks[gt[s:s + 512]], rois[s:s + 512], OUT_SIZE) >= 0.5
  return masks, boxes, rois, gt, reference


def compare(ours, reference):
  differ = float(np.mean(ours != reference))
  inter = np.logical_and(ours, reference).sum((1, 2))
  union = np.logical_or(ours, reference).sum((1, 2))
  iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
  return {"pixels_differ_pct": round(100 * differ, 3), "mean_iou": round(float(iou.mean()), 4),
          "p01_iou": round(float(np.quantile(iou, 0.01)), 4)}


def our_targets(crops, boxes, rois, gt, max_samples, chunk=1024):
  fn = jax.jit(mt.mask_targets, static_argnames=("out_size", "max_samples"))
  n = len(rois)
  pad = -n % chunk
  rois_p = np.concatenate([rois, np.zeros((pad, 4), np.float32)])
  gt_p = np.concatenate([gt, np.full(pad, -1, np.int32)])
  parts = [np.asarray(fn(crops, boxes, rois_p[s:s + chunk], gt_p[s:s + chunk], out_size=OUT_SIZE,
                         max_samples=max_samples)) for s in range(0, n + pad, chunk)]
  return np.concatenate(parts)[:n] > 0.5


def time_crops(image_px, max_side, repeats=3):
  """crop_masks of 256 masks (boxes of 8 to `max_side` px) of an `image_px` image at R = 56, ms."""
  rng = np.random.default_rng(0)
  side = rng.uniform(8, max_side, size=(256, 2))
  x1 = rng.uniform(0, image_px - side[:, 0])
  y1 = rng.uniform(0, image_px - side[:, 1])
  boxes = np.stack([x1, y1, x1 + side[:, 0], y1 + side[:, 1]], 1).astype(np.float32)
  masks = np.zeros((256, image_px, image_px), bool)
  for i, (a, b, c, d) in enumerate(boxes.astype(int)):
    masks[i, b:d, a:c] = rng.uniform(size=(d - b, c - a)) < 0.7
  mt.crop_masks(masks, boxes, 56)
  start = time.perf_counter()
  for _ in range(repeats):
    mt.crop_masks(masks, boxes, 56)
  return round((time.perf_counter() - start) / repeats * 1e3, 1)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", type=int, nargs="+", default=[448, 128])
  p.add_argument("--images", type=int, default=8)
  p.add_argument("--crop-sizes", type=int, nargs="+", default=[28, 56, 112])
  p.add_argument("--max-samples", type=int, nargs="+", default=[1, 2, 4, 8])
  p.add_argument("--out", default="benchmarks/results/mask_target_fidelity.json")
  args = p.parse_args()
  rows, data = [], {}
  for size in args.sizes:
    with tempfile.TemporaryDirectory() as root:
      instances = training_instances(root, size, args.images)
    masks, boxes, rois, gt, reference = collect(instances, size)
    side = np.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
    data[size] = {"images": len(instances), "instances": len(boxes), "rois": len(rois),
                  "roi_side_px_median": round(float(np.median(side)), 1),
                  "roi_side_px_p05_p95": [round(float(v), 1) for v in np.quantile(side, [0.05, 0.95])]}
    print(size, data[size], flush=True)
    for r in args.crop_sizes:
      start = time.perf_counter()
      crops = mt.crop_masks(masks, boxes, r)
      per_image_ms = (time.perf_counter() - start) / len(instances) * 1e3
      variants = [("uint8", crops, k) for k in args.max_samples]
      if r == 56:
        variants.append(("float", mt.roi_align_masks(masks, boxes, r), 4))
      for kind, c, k in variants:
        row = {"image_px": size, "R": r, "crops": kind, "max_samples": k,
               "bytes_per_image_m256": 256 * r * r,
               **compare(our_targets(c, boxes, rois, gt, k), reference),
               "crop_masks_ms_per_image": round(per_image_ms, 2)}
        rows.append(row)
        print(row, flush=True)
  result = {"backend": jax.default_backend(), "data": data, "rows": rows,
            "dense_masks_bytes_per_image_m256_s448": 256 * 448 * 448,
            "crop_masks_ms_m256_r56": {"1024px_boxes_8_256": time_crops(1024, 256),
                                       "448px_boxes_8_112": time_crops(448, 112)}}
  write_result(result, args.out)


if __name__ == "__main__":
  main()
