"""Bytes and roofline of the ViT-B+RVSA encoder's attention modules and of the detection heads' RPN
targets on a TPU chip, from the TPU compiler (no TPU needed; figures, not a test).

    python benchmarks/encoder_parts_tpu.py [--topology v5p-8] [--image-size 448] [--batch 4] \
        [--parts rvsa global global_rel_pos rpn_rotated rpn_horizontal] \
        [--out benchmarks/results/encoder_parts_tpu.json]

Compiles, for one chip of the slice, bfloat16:
- `rvsa`, `global`, `global_rel_pos`: one ViT-B attention module (768 wide, 12 heads) forward and
  backward (gradients to its parameters and input) on --batch images' tokens (patch 16): an RVSA
  block's, a plain ViT-B block's, and a ViT-B+RVSA global block's (decomposed relative positions);
- `rpn_rotated`, `rpn_horizontal`: Oriented R-CNN's and Mask R-CNN's RPN targets
  (`batch_rpn_targets`: max-IoU assignment, sampling, encoding) for the images one chip holds in
  the pretraining step (3, one per subset) with 256 padded objects each, in the form the
  platform's default takes (one block on accelerators).
Reports per part: bytes and flops (XLA's cost analysis, with the repeats of fixed-length loops),
the roofline time on that chip, its HBM and the compile time.
Needs libtpu: pip install -e '.[tpu]'.
"""

import argparse
import time

from mtp_jax.plan import chips

chips.tpu_environment()   # before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mtp_jax.models.detection import rpn as rpn_lib  # noqa: E402
from mtp_jax.models.rvsa import RotatedVariedSizeWindowAttention  # noqa: E402
from mtp_jax.models.vit import Attention  # noqa: E402
from _tpu_chip import compile_and_measure, one_chip  # noqa: E402
from _report import write_result  # noqa: E402

WIDTH, HEADS, PATCH = 768, 12, 16
RPN_IMAGES, RPN_OBJECTS = 3, 256
PARTS = ("rvsa", "global", "global_rel_pos", "rpn_rotated", "rpn_horizontal")


def attention_program(part, grid, batch, spec):
  """(function, argument specs) of one attention module's forward and backward."""
  with jax.default_device(jax.devices("cpu")[0]):
    rngs = nnx.Rngs(0)
    if part == "rvsa":
      module = RotatedVariedSizeWindowAttention(WIDTH, HEADS, window_size=7, dtype=jnp.bfloat16, rngs=rngs)
    else:
      module = Attention(WIDTH, HEADS, dtype=jnp.bfloat16, rel_pos_grid=grid if part == "global_rel_pos" else 0,
                         rngs=rngs)
    graphdef, state = nnx.split(module)

  def loss(state, tokens, cotangent):
    out = nnx.merge(graphdef, state)(tokens, grid)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))

  tokens = spec((batch, grid * grid, WIDTH), jnp.bfloat16)
  return jax.grad(loss, argnums=(0, 1)), (jax.tree.map(lambda a: spec(a.shape, a.dtype), state), tokens, tokens)


def rpn_program(part, image_size, spec):
  """(function, argument specs) of one chip's RPN targets."""
  cfg = rpn_lib.RPNConfig() if part == "rpn_rotated" else rpn_lib.RPNConfig.mask_rcnn()
  sizes = cfg.anchors.feature_sizes((image_size, image_size))
  with jax.default_device(jax.devices("cpu")[0]):
    anchors = jnp.concatenate(cfg.anchors.grid_anchors(sizes))

  def targets(gt, gt_valid, key):
    return rpn_lib.batch_rpn_targets(anchors, jnp.ones(anchors.shape[0], bool), gt, gt_valid, key, cfg,
                                     (image_size, image_size))

  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=spec((2,), jnp.uint32).sharding)
  return targets, (spec((RPN_IMAGES, RPN_OBJECTS, cfg.box_dim), jnp.float32),
                   spec((RPN_IMAGES, RPN_OBJECTS), jnp.bool_), key)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--topology", default="v5p-8")
  p.add_argument("--image-size", type=int, default=448)
  p.add_argument("--batch", type=int, default=4, help="images of the attention parts")
  p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
  p.add_argument("--out", default="benchmarks/results/encoder_parts_tpu.json")
  args = p.parse_args()
  tpu_slice, spec = one_chip(args.topology)
  rows = []
  for part in args.parts:
    if part.startswith("rpn"):
      fn, specs = rpn_program(part, args.image_size, spec)
    else:
      fn, specs = attention_program(part, args.image_size // PATCH, args.batch, spec)
    start = time.perf_counter()
    figures = compile_and_measure(fn, specs, tpu_slice)
    rows.append({"part": part, "images": RPN_IMAGES if part.startswith("rpn") else args.batch, **figures,
                 "compile_s": round(time.perf_counter() - start, 1)})
    print(rows[-1], flush=True)
  write_result({"topology": tpu_slice.name, "chip": tpu_slice.chip.name, "image_size": args.image_size,
                "jax": jax.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
  main()
