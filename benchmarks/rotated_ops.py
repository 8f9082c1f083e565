"""Rotated-box ops: IoU vs shapely, rotated NMS, rotated RoIAlign (figures, not a test).

    python benchmarks/rotated_ops.py [--out benchmarks/results/rotated_ops.json] [--quick]

1. Pairwise IoU of 1,000 x 1,000 random rotated boxes (DOTA-like: 1024 px image, sides 8-256 px,
   any angle): `box_iou_rotated` jitted on the default backend vs shapely 2's vectorised
   polygon intersection on this machine's CPU, same boxes, same run; the ratio, and the largest
   |IoU difference| over the million pairs (shapely works in float64 on the float32 boxes).
2. `nms_rotated` on 2,000 clustered boxes at IoU 0.1 (Oriented R-CNN's test setting) and 0.8
   (its proposal setting), for a few tile sizes; beside it, shapely's IoU matrix + a numpy greedy
   loop as a reference time.
3. `multilevel_roi_align_rotated`: 512 boxes, 7x7 output, 256 channels, FPN strides 4-32 of a
   1024 px image (Oriented R-CNN's RoI head shapes), forward and forward+backward.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import shapely

from _report import write_result  # noqa: E402
from mtp_jax.ops import box_iou_rotated, multilevel_roi_align_rotated, nms_rotated, rbox_to_poly


def timeit(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def random_rboxes(rng, n, clustered=False):
  if clustered:
    centres = rng.uniform(0, 1024, (n // 10, 2))
    xy = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 8, (n, 2))
  else:
    xy = rng.uniform(0, 1024, (n, 2))
  wh = np.exp(rng.uniform(np.log(8), np.log(256), (n, 2)))
  return np.c_[xy, wh.max(1), wh.min(1), rng.uniform(-np.pi / 2, np.pi / 2, n)].astype(np.float32)


def shapely_iou_matrix(boxes1, boxes2):
  p1 = shapely.polygons(rbox_to_poly(boxes1.astype(np.float64)))[:, None]
  p2 = shapely.polygons(rbox_to_poly(boxes2.astype(np.float64)))[None, :]
  inter = shapely.area(shapely.intersection(p1, p2))
  union = shapely.area(p1) + shapely.area(p2) - inter
  return inter / union


def greedy_nms_shapely(boxes, scores, threshold):
  iou = shapely_iou_matrix(boxes, boxes)
  order = np.argsort(-scores, kind="stable")
  suppressed = np.zeros(len(boxes), bool)
  kept = []
  for i in order:
    if suppressed[i]:
      continue
    kept.append(i)
    suppressed |= iou[i] > threshold
  return kept


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="benchmarks/results/rotated_ops.json")
  p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
  args = p.parse_args()
  repeats = 2 if args.quick else 5
  rng = np.random.default_rng(0)
  result = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "cpu_count_for_shapely": __import__("os").cpu_count()}

  boxes1, boxes2 = random_rboxes(rng, 1000), random_rboxes(rng, 1000)
  t = time.perf_counter()
  want = shapely_iou_matrix(boxes1, boxes2)
  shapely_s = time.perf_counter() - t
  iou_rows = []
  for tile in (64, 256, 1000):
    fn = jax.jit(lambda a, b, tile=tile: box_iou_rotated(a, b, row_tile=tile))
    seconds = timeit(fn, jnp.asarray(boxes1), jnp.asarray(boxes2), repeats=repeats)
    got = np.asarray(fn(boxes1, boxes2))
    iou_rows.append({"row_tile": tile, "seconds": seconds, "speedup_vs_shapely": shapely_s / seconds,
                     "max_abs_error_vs_shapely": float(np.abs(got - want).max())})
  best = min(iou_rows, key=lambda r: r["seconds"])
  result["pairwise_iou_1000x1000"] = {"shapely_seconds": shapely_s, "jax": iou_rows,
                                      "best_speedup_vs_shapely": best["speedup_vs_shapely"],
                                      "overlapping_pairs": int((want > 0).sum())}

  boxes = random_rboxes(rng, 2000, clustered=True)
  scores = rng.uniform(size=2000).astype(np.float32)
  nms_rows = []
  for threshold in (0.1, 0.8):
    t = time.perf_counter()
    want_kept = greedy_nms_shapely(boxes, scores, threshold)
    ref_s = time.perf_counter() - t
    for tile in (128, 256, 512):
      fn = jax.jit(lambda b, s, th=threshold, tile=tile: nms_rotated(b, s, th, 2000, tile_size=tile))
      seconds = timeit(fn, jnp.asarray(boxes), jnp.asarray(scores), repeats=repeats)
      idx, count = fn(boxes, scores)
      got = np.asarray(idx)[:int(count)].tolist()
      nms_rows.append({"iou_threshold": threshold, "tile_size": tile, "seconds": seconds,
                       "kept": int(count), "equals_shapely_greedy": got == [int(i) for i in want_kept],
                       "shapely_greedy_seconds": ref_s})
  result["nms_rotated_2000"] = nms_rows

  strides = (4, 8, 16, 32)
  feats = [jnp.asarray(rng.normal(size=(2, 1024 // s, 1024 // s, 256)), jnp.float32) for s in strides]
  rois = jnp.asarray(random_rboxes(rng, 512))
  batch = jnp.asarray(rng.integers(0, 2, 512), jnp.int32)
  fwd = jax.jit(lambda f, r: multilevel_roi_align_rotated(f, r, batch, 7, strides))
  grad = jax.jit(jax.grad(lambda f, r: multilevel_roi_align_rotated(f, r, batch, 7, strides).sum()))
  result["roi_align_rotated_512x7x7x256"] = {
      "forward_seconds": timeit(fwd, feats, rois, repeats=repeats),
      "forward_backward_seconds": timeit(grad, feats, rois, repeats=repeats)}
  write_result(result, args.out)


if __name__ == "__main__":
  main()
