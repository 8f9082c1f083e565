"""Horizontal RoIAlign on the CPU: whole-map matmuls (dense) against separable gathers, forward +
backward (figures printed and written to JSON; never a test).

    python benchmarks/roi_align_cpu.py [--image-sizes 128,256,448] [--channels 64] [--repeats 5] \
        [--out benchmarks/results/roi_align_cpu.json]

For one image's FPN maps (strides 4-32, float32) and Mask R-CNN's two RoIAlign calls per image
(box branch: `--box-rois` RoIs, 7 x 7; mask branch: `--mask-rois` RoIs, 14 x 14; adaptive
sampling, at most 4 samples per bin and axis), boxes log-uniform in side from 8 px to half the
image: the median time of the jitted gradient with respect to the maps for each form, and the
cost ratio that `mtp_jax.ops.rois.dense_pays` weighs (dense multiply-adds per gathered pixel).
The form whose time is lower should be the one `dense_pays` picks: this is the measurement
behind `DENSE_MACS_PER_GATHERED_PIXEL["cpu"]`.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.ops import rois
from _report import write_result

STRIDES = (4, 8, 16, 32)
MAX_SAMPLES = 4


def random_boxes(rng, num, image_size):
  side = np.exp(rng.uniform(np.log(8), np.log(image_size / 2), size=(num, 2)))
  centre = rng.uniform(0, image_size, size=(num, 2))
  lo = np.clip(centre - side / 2, 0, image_size - 4)
  hi = np.clip(centre + side / 2, lo + 4, image_size)
  return jnp.asarray(np.concatenate([lo, hi], 1), jnp.float32)


def time_grad(fn, args, repeats):
  jax.block_until_ready(fn(*args))   # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--image-sizes", default="128,256,448")
  p.add_argument("--channels", type=int, default=64)
  p.add_argument("--box-rois", type=int, default=64)
  p.add_argument("--mask-rois", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="benchmarks/results/roi_align_cpu.json")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  rows = []
  for image_size in [int(v) for v in args.image_sizes.split(",")]:
    maps = [jnp.asarray(rng.normal(size=(1, image_size // s, image_size // s, args.channels)), jnp.float32)
            for s in STRIDES]
    shapes = [m.shape[:3] for m in maps]
    for case, num, size in (("box_branch", args.box_rois, 7), ("mask_branch", args.mask_rois, 14)):
      boxes = random_boxes(rng, num, image_size)
      cotangent = jnp.asarray(rng.normal(size=(num, size, size, args.channels)), jnp.float32)
      row = {"image_size": image_size, "case": case, "rois": num, "output": size,
             "channels": args.channels}
      outputs = {}
      for dense in (False, True):
        def loss(maps, dense=dense, boxes=boxes, size=size, num=num):
          out = rois.multilevel_roi_align(maps, boxes, jnp.zeros(num, jnp.int32), size, STRIDES,
                                          sampling_ratio=0, max_samples=MAX_SAMPLES, dense=dense)
          return jnp.sum(out * cotangent), out
        fn = jax.jit(jax.grad(loss, has_aux=True))
        row[f"{'dense' if dense else 'gather'}_ms"] = round(1e3 * time_grad(fn, (maps,), args.repeats), 2)
        outputs[dense] = fn(maps)[1]
      row["max_abs_difference"] = float(jnp.max(jnp.abs(outputs[True] - outputs[False])))
      k, k_short, _ = rois._separable_widths(size, size, MAX_SAMPLES, 0)
      row["dense_macs_per_gathered_pixel"] = round(
          sum(size * b * h * w + size * w * size for b, h, w in shapes) / (k * k_short), 2)
      row["dense_pays"] = bool(rois.dense_pays(shapes, (size, size), MAX_SAMPLES, 0))
      rows.append(row)
      print(row, flush=True)
  write_result({"backend": jax.default_backend(), "devices": jax.device_count(),
                "jax": jax.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
  main()
