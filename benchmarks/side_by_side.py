"""Side by side on this machine's CPU, in one run (figures, not a test).

    python benchmarks/side_by_side.py [--size 224] [--batch 2] [--repeats 5] \
        [--encoder vit_b_rvsa] [--method gather] [--source-size 1024] [--images 16] \
        [--out benchmarks/results/side_by_side.json]

1. Forward + backward, JAX (jitted, float32) against the PyTorch twin (float32, eager, all
   cores), same weights' shapes, same images: the encoder alone (loss = sum of squares of its
   four maps) and the encoder + UperNet trunk (MTP's `semsegdecoder`, BatchNorm in training
   mode; loss = sum of squares of its map). Gradients of every parameter in both. Reports the
   mean step times and JAX / PyTorch (below 1: JAX is faster). Timed alternately, JAX then
   PyTorch, `--repeats` rounds, so a load change on a shared box hits both.
2. Rotated-box ops against shapely 2 (float64 polygons): pairwise IoU of 1,000 x 1,000 DOTA-like
   boxes and greedy NMS of 2,000 clustered boxes at IoU 0.1, with the speed-up and whether the
   results agree (largest |IoU difference|; the same kept list). JAX: the median of `--repeats`
   warm calls (`rotated_ops.timeit`); shapely: one call.
3. The training input pipeline (SOTA, PNG, full augmentation, 0 workers = one core) in images/s
   per core against the images/s the step of part 1 (encoder + UperNet) consumes, and so the
   cores it takes to keep that step fed (`data.num_workers`).
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from _report import write_result  # noqa: E402
from input_pipeline import time_pipeline  # noqa: E402
from rotated_ops import greedy_nms_shapely, random_rboxes, shapely_iou_matrix, timeit  # noqa: E402
from data_pipelines.samrs import convert, synthetic  # noqa: E402
from mtp_jax.models import ENCODER_PRESETS, build_encoder  # noqa: E402
from mtp_jax.models.heads.upernet import UperNetTrunk  # noqa: E402
from mtp_jax.ops import box_iou_rotated, nms_rotated  # noqa: E402
from mtp_jax.torch_twin.mtp_decoders import UPerHead  # noqa: E402
from mtp_jax.torch_twin.vit_rvsa import build_twin  # noqa: E402


def jax_step(encoder, decoder, images):
  """A compiled value-and-grad of the loss over every parameter, and its compile seconds."""
  model = nnx.List([encoder] + ([decoder] if decoder is not None else []))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest, x):  # rest (BatchNorm statistics) is an argument: the step mutates it
    parts = nnx.merge(graphdef, params, rest, copy=True)
    maps = parts[0](x)
    if decoder is None:
      return sum(jnp.sum(f ** 2) for f in maps)
    return jnp.sum(parts[1](maps, groups=1, train=True) ** 2)

  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, rest, images).compile()
  compile_s = time.perf_counter() - start
  return (lambda: jax.block_until_ready(compiled(params, rest, images))), compile_s


def torch_step(encoder, decoder, images):
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  modules = torch.nn.ModuleList([encoder] + ([decoder] if decoder is not None else [])).train()

  def step():
    modules.zero_grad(set_to_none=True)
    maps = encoder(x)
    loss = sum((f ** 2).sum() for f in maps) if decoder is None else (decoder._forward_feature(maps) ** 2).sum()
    loss.backward()
  return step


def alternate(jax_fn, torch_fn, repeats):
  """Mean seconds of each, timed in alternation after one warm-up call of each."""
  jax_fn(), torch_fn()
  jax_s, torch_s = [], []
  for _ in range(repeats):
    for fn, times in ((jax_fn, jax_s), (torch_fn, torch_s)):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
  return float(np.mean(jax_s)), float(np.mean(torch_s))


def models_side_by_side(args, images):
  rows = []
  width = ENCODER_PRESETS[args.encoder]["embed_dim"]
  for with_decoder in (False, True):
    encoder = build_encoder(args.encoder, args.size, rngs=nnx.Rngs(0), grid_sample_method=args.method)
    decoder = UperNetTrunk([width] * 4, 256, rngs=nnx.Rngs(1)) if with_decoder else None
    run_jax, compile_s = jax_step(encoder, decoder, images)
    run_torch = torch_step(build_twin(args.encoder, args.size),
                           UPerHead([width] * 4, 256) if with_decoder else None, images)
    jax_s, torch_s = alternate(run_jax, run_torch, args.repeats)
    rows.append({"model": args.encoder + (" + UperNet" if with_decoder else ""),
                 "jax_compile_s": round(compile_s, 1), "jax_step_s": round(jax_s, 3),
                 "torch_step_s": round(torch_s, 3), "jax_over_torch": round(jax_s / torch_s, 3),
                 "images_per_s_jax": round(args.batch / jax_s, 2)})
    print(rows[-1], flush=True)
  return rows


def rotated_ops_side_by_side(repeats):
  rng = np.random.default_rng(0)
  boxes1, boxes2 = random_rboxes(rng, 1000), random_rboxes(rng, 1000)
  start = time.perf_counter()
  want = shapely_iou_matrix(boxes1, boxes2)
  shapely_iou_s = time.perf_counter() - start
  iou = jax.jit(box_iou_rotated)
  jax_iou_s = timeit(iou, boxes1, boxes2, repeats=repeats)   # median of warm calls
  got = np.asarray(iou(boxes1, boxes2))

  boxes = random_rboxes(rng, 2000, clustered=True)
  scores = rng.uniform(size=2000).astype(np.float32)
  start = time.perf_counter()
  want_kept = greedy_nms_shapely(boxes, scores, 0.1)
  shapely_nms_s = time.perf_counter() - start
  nms = jax.jit(lambda b, s: nms_rotated(b, s, 0.1, 2000))
  jax_nms_s = timeit(nms, boxes, scores, repeats=repeats)
  idx, count = nms(boxes, scores)
  rows = [{"op": "pairwise IoU 1000 x 1000", "jax_s": round(jax_iou_s, 4),
           "shapely_s": round(shapely_iou_s, 4), "speedup": round(shapely_iou_s / jax_iou_s, 1),
           "max_abs_iou_difference": float(np.abs(got - want).max())},
          {"op": "NMS 2000 boxes, IoU 0.1", "jax_s": round(jax_nms_s, 4),
           "shapely_s": round(shapely_nms_s, 4), "speedup": round(shapely_nms_s / jax_nms_s, 1),
           "same_kept_list": np.asarray(idx)[:int(count)].tolist() == [int(i) for i in want_kept]}]
  for row in rows:
    print(row, flush=True)
  return rows


def pipeline_against_step(args, step_images_per_s):
  with tempfile.TemporaryDirectory() as tmp:
    synthetic.generate(os.path.join(tmp, "raw"), images=args.images, size=args.source_size, seed=0)
    out = os.path.join(tmp, "tfrecords")
    convert.convert_split(os.path.join(tmp, "raw"), "sota", "train", out, num_shards=4,
                          log=lambda *_: None)
    per_core = time_pipeline(out, "sota", args.size, workers=0)
  row = {"pipeline": f"SOTA PNG {args.source_size} px -> {args.size} px, full augmentation",
         "pipeline_images_per_s_per_core": round(per_core, 1),
         "step_images_per_s": round(step_images_per_s, 2),
         "cores_to_feed_the_step": round(step_images_per_s / per_core, 3)}
  print(row, flush=True)
  return row


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--encoder", default="vit_b_rvsa")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--method", default="gather", choices=["gather", "matmul"])
  p.add_argument("--source-size", type=int, default=1024)
  p.add_argument("--images", type=int, default=16, help="synthetic images for the pipeline part")
  p.add_argument("--out", default="benchmarks/results/side_by_side.json")
  args = p.parse_args()
  if jax.default_backend() != "cpu":
    raise SystemExit("side_by_side.py compares against PyTorch on the CPU: run it with JAX_PLATFORMS=cpu")
  images = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  models = models_side_by_side(args, images)
  result = {"backend": "cpu", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "image_px": args.size, "batch": args.batch, "grid_sample": args.method,
            "models": models, "rotated_ops": rotated_ops_side_by_side(args.repeats),
            "input_pipeline": pipeline_against_step(args, models[-1]["images_per_s_jax"])}
  write_result(result, args.out)


if __name__ == "__main__":
  main()
