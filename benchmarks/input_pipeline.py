"""Training input pipeline throughput, images/s per CPU core (figures, not a test).

    python benchmarks/input_pipeline.py [--source-size 1024] [--image-size 448] [--images 48] \
        [--workers 0 1 2] [--out benchmarks/results/input_pipeline.json]

Writes a synthetic SAMRS sample of `--images` images per subset at `--source-size` px (SOTA's
DOTA patches are 1024 px; the synthetic images are noisy, so their PNGs are as large as real
aerial ones, about 2 MB), converts it, and times the full training pipeline of SOTA (PNG) and
SIOR (JPEG) at `--image-size`, and SOTA converted with `--image-format raw` (no decoding): shard interleave, window shuffle, parse, PNG decode, augmentation (flip, resize,
crop, photometric), padding, packing, batching of 8. For each worker count (0 = in-process) it
reports steady-state images/s after a warm-up, and images/s per core (0 workers use one core;
k workers use k cores for the per-image work). Also a per-stage profile of one image.
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grain  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from _report import write_result  # noqa: E402
from data_pipelines import augment  # noqa: E402
from data_pipelines.records import shards  # noqa: E402
from data_pipelines.samrs import convert, schema, synthetic  # noqa: E402
from data_pipelines.samrs import examples as samrs_examples  # noqa: E402


def time_pipeline(data_dir, subset, image_size, workers, batches=12, warmup=3):
  ds = samrs_examples.make_dataset(data_dir, subset, "train", image_size=image_size, max_instances=64,
                                   batch_size=8, seed=0, shuffle_window=32)
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  it = iter(ds)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()
  return batches * 8 / seconds


def profile_stages(data_dir, subset, image_size, repeats=20):
  path = shards.shard_files(data_dir, subset, "train")[0]
  raw = next(iter(grain.experimental.TFRecordIterDataset(path)))
  rng = np.random.default_rng(0)
  stages = {}

  def clock(name, fn):
    start = time.perf_counter()
    for _ in range(repeats):
      out = fn()
    stages[name] = (time.perf_counter() - start) / repeats * 1e3
    return out

  record = clock("parse_ms", lambda: schema.decode(raw))
  sample = clock("decode_ms", lambda: samrs_examples.record_to_sample(record))
  h = sample["image"].shape[0]
  resized = clock("resize_ms", lambda: augment.resize(sample, image_size / h))
  clock("crop_ms", lambda: augment.crop(resized, 0, 0, image_size, image_size))
  clock("photometric_ms", lambda: augment.photometric(resized["image"][:image_size, :image_size], rng))
  clock("full_example_ms", lambda: samrs_examples.to_static_example(raw, image_size, 64, rng=rng))
  return {k: round(v, 2) for k, v in stages.items()}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--source-size", type=int, default=1024)
  p.add_argument("--image-size", type=int, default=448)
  p.add_argument("--images", type=int, default=48)
  p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--out", default="benchmarks/results/input_pipeline.json")
  args = p.parse_args()
  flags.FLAGS.mark_as_parsed()   # grain's worker processes read absl flags
  with tempfile.TemporaryDirectory() as tmp:
    synthetic.generate(os.path.join(tmp, "raw"), images=args.images, size=args.source_size, seed=0)
    data_dir = os.path.join(tmp, "tfrecords")
    rows, stages = [], {}
    for subset, image_format in (("sota", "source"), ("sota", "raw"), ("sior", "source")):
      out = os.path.join(data_dir, image_format)
      convert.convert_split(os.path.join(tmp, "raw"), subset, "train", out, num_shards=4,
                            image_format=image_format, log=lambda *_: None)
      for workers in args.workers:
        rate = time_pipeline(out, subset, args.image_size, workers)
        rows.append({"subset": subset, "image_format": image_format, "workers": workers,
                     "images_per_s": round(rate, 1),
                     "images_per_s_per_core": round(rate / max(workers, 1), 1)})
        print(rows[-1], flush=True)
      stages[f"{subset}_{image_format}"] = profile_stages(out, subset, args.image_size)
    result = {"source_px": args.source_size, "image_px": args.image_size, "cpu_count": os.cpu_count(),
              "rows": rows, "stages_one_image": stages}
  write_result(result, args.out)


if __name__ == "__main__":
  main()
