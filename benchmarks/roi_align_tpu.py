"""RoIAlign's bytes and roofline on a TPU chip, from the TPU compiler (no TPU needed; figures,
not a test).

    python benchmarks/roi_align_tpu.py [--topology v5p-8] [--image-size 448] \
        [--out benchmarks/results/roi_align_tpu.json]

Compiles forward + backward (gradient to the FPN maps) of one image's RoIAlign as the pretraining
heads call it, bfloat16 maps of 256 channels at strides 4-32, for one chip of the slice:
Mask R-CNN's box branch (512 sampled RoIs, 7 x 7, adaptive sampling) and mask branch (128
positive RoIs, 14 x 14), Oriented R-CNN's rotated box branch (512 RoIs, 7 x 7, sampling ratio 2).
Reports the bytes and flops per image (XLA's cost analysis, with the repeats of fixed-length
loops) and the roofline time on that chip.
Needs libtpu: pip install -e '.[tpu]'.
"""

import argparse

from mtp_jax.plan import chips

chips.tpu_environment()   # before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mtp_jax.ops import rois  # noqa: E402
from _tpu_chip import compile_and_measure, one_chip  # noqa: E402
from _report import write_result  # noqa: E402

STRIDES = (4, 8, 16, 32)
CASES = (  # name, function, RoIs, output size, box width, sampling ratio
    ("mask_rcnn_box_branch", rois.multilevel_roi_align, 512, 7, 4, 0),
    ("mask_rcnn_mask_branch", rois.multilevel_roi_align, 128, 14, 4, 0),
    ("oriented_rcnn_box_branch", rois.multilevel_roi_align_rotated, 512, 7, 5, 2),
)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--topology", default="v5p-8")
  p.add_argument("--image-size", type=int, default=448)
  p.add_argument("--out", default="benchmarks/results/roi_align_tpu.json")
  args = p.parse_args()
  tpu_slice, spec = one_chip(args.topology)
  maps = [spec((1, args.image_size // s, args.image_size // s, 256), jnp.bfloat16) for s in STRIDES]
  rows = []
  for name, align, num, size, width, ratio in CASES:
    def loss(maps, boxes, cotangent, align=align, num=num, size=size, ratio=ratio):
      out = align(maps, boxes, jnp.zeros(num, jnp.int32), size, STRIDES, sampling_ratio=ratio)
      return jnp.sum(out * cotangent.astype(jnp.float32))
    figures = compile_and_measure(jax.grad(loss), (maps, spec((num, width), jnp.float32),
                                                   spec((num, size, size, 256), jnp.bfloat16)), tpu_slice)
    rows.append({"case": name, "rois": num, "output": size, "sampling_ratio": ratio,
                 "gb_per_image": figures["gb"], "gflop_per_image": figures["gflop"],
                 "roofline_ms": figures["roofline_ms"], "hbm_mib": figures["hbm_mib"]})
    print(rows[-1], flush=True)
  write_result({"topology": tpu_slice.name, "chip": tpu_slice.chip.name, "image_size": args.image_size,
                "jax": jax.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
  main()
