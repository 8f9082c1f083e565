"""Large-scene prediction: megapixels/s per task and peak host memory on a huge scene (figures).

    python benchmarks/predict_scene.py --workdir workdirs/quickstart [--tasks ss rd is] \
        [--speed-size 1024] [--size 20000] [--batch 16] [--out benchmarks/results/predict_scene.json]

Needs a trained workdir (`make quickstart` makes one) and the geo extra. For each task alone it
predicts a `--speed-size` px square RGB GeoTIFF of synthetic texture (after one warm-up scene
that compiles) and reports megapixels/s and tiles/s with every output written (class map PNG +
COG, or DOTA + GeoJSON + GeoPackage). Then all tasks together on a `--size` px square GeoTIFF
(written by strips, tiled and deflated), with the process's resident memory sampled every 0.1 s:
the baseline (model loaded and compiled), the peak, and the strip bound of
mtp_jax/predict/pipeline.py for comparison. `--size 0` skips it.
"""

import argparse
import os
import resource
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import rasterio  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from _report import write_result  # noqa: E402
from mtp_jax.predict import Predictor, predict_scene  # noqa: E402
from mtp_jax.predict import pipeline  # noqa: E402
from mtp_jax.predict.pipeline import default_stride  # noqa: E402


def write_scene(path: str, size: int, height: int = 0, strip: int = 1024):
  """A size x size (or size wide, height tall) 3-band uint8 GeoTIFF (EPSG:32633, 0.5 m), written strip by strip: smooth
  blobs plus noise, so it neither compresses to nothing nor costs a gigabyte per 20k rows."""
  rng = np.random.default_rng(0)
  base = (rng.random((256, 256, 3)) * 255).astype(np.uint8)
  height = height or size
  with rasterio.open(path, "w", driver="GTiff", height=height, width=size, count=3, dtype="uint8",
                     crs="EPSG:32633", transform=from_origin(500_000.0, 5_000_000.0, 0.5, 0.5),
                     tiled=True, blockxsize=512, blockysize=512, compress="deflate") as ds:
    for y in range(0, height, strip):
      h = min(strip, height - y)
      rows = np.tile(base, (-(-h // 256), -(-size // 256), 1))[:h, :size]
      ds.write(np.moveaxis(rows, -1, 0), window=Window(0, y, size, h))


def rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Sampler:
  """Peak resident memory (MB) of this process while `with` runs, sampled every `every` s."""

  def __init__(self, every=0.1):
    self.every, self.peak, self._stop = every, 0.0, threading.Event()

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_mb())
      time.sleep(self.every)

  def __enter__(self):
    self.peak = rss_mb()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_mb())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="workdirs/quickstart")
  parser.add_argument("--tasks", nargs="+", default=None, help="default: every task of the run that predicts")
  parser.add_argument("--speed-size", type=int, default=1024)
  parser.add_argument("--size", type=int, default=20000)
  parser.add_argument("--height", type=int, default=0, help="of the big scene (default: --size, square)")
  parser.add_argument("--progress", action="store_true", help="show the big scene's progress bar")
  parser.add_argument("--batch", type=int, default=0, help="tiles a call (default: one per device)")
  parser.add_argument("--out", default="benchmarks/results/predict_scene.json")
  args = parser.parse_args()
  tmp = tempfile.mkdtemp(prefix="predict_bench_")
  warm = os.path.join(tmp, "warm.tif")
  speed = os.path.join(tmp, "speed.tif")
  write_scene(warm, 128)
  write_scene(speed, args.speed_size)
  everything = Predictor.from_workdir(args.workdir, tasks=tuple(args.tasks) if args.tasks else None, batch=args.batch)
  result = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "workdir": args.workdir,
            "window": everything.size, "stride": default_stride(everything), "batch": everything.batch,
            "speed_size": args.speed_size, "per_task": {}}
  for task in everything.tasks:
    predictor = Predictor.from_workdir(args.workdir, tasks=(task,), batch=args.batch)
    predict_scene(predictor, warm, os.path.join(tmp, "out_warm"), progress=False)   # compiles
    start = time.perf_counter()
    summary = predict_scene(predictor, speed, os.path.join(tmp, "out_speed"), progress=False)
    seconds = time.perf_counter() - start
    result["per_task"][task] = {"megapixels_per_s": round(args.speed_size ** 2 / 1e6 / seconds, 4),
                                "tiles_per_s": round(summary["tiles"] / seconds, 2), "tiles": summary["tiles"],
                                "seconds": round(seconds, 2)}
    print(task, result["per_task"][task], flush=True)
  if args.size:
    big = os.path.join(tmp, "big.tif")
    start = time.perf_counter()
    write_scene(big, args.size, args.height)
    result["scene_write_s"] = round(time.perf_counter() - start, 1)
    predict_scene(everything, warm, os.path.join(tmp, "out_warm_all"), progress=False)
    baseline = rss_mb()
    start = time.perf_counter()
    with Sampler() as sampler:
      summary = predict_scene(everything, big, os.path.join(tmp, "out_big"), progress=args.progress)
    seconds = time.perf_counter() - start
    classes = sum(len(everything.class_names(n)) for n, t in everything.tasks.items() if t.prediction == "dense")
    w, s, c = args.size, everything.size, everything.channels
    stride = default_stride(everything)
    dense_tasks = sum(t.prediction == "dense" for t in everything.tasks.values())
    bound = (2 * s * w * c + everything.batch * s * s * c * 4
             + 4 * s * w * (classes + dense_tasks) + 4 * stride * w * classes) / 2**20
    bound += pipeline.GDAL_CACHE_MB
    height = args.height or args.size
    result["big_scene"] = {"width": args.size, "height": height, "tiles": summary["tiles"], "seconds": round(seconds, 1),
                           "megapixels_per_s": round(args.size * height / 1e6 / seconds, 4),
                           "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(sampler.peak, 1),
                           "scene_cost_mb": round(sampler.peak - baseline, 1),
                           "strip_bound_mb": round(bound, 1),
                           "max_rss_mb_getrusage": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                           "detections": {n: r.get("detections") for n, r in summary["tasks"].items()}}
  write_result(result, args.out)


if __name__ == "__main__":
  main()
