"""One scene through a Predictor: tiles read in strips, batched on the devices, merged, written.

    summary = predict_scene(predictor, "scene.tif", "out/", stride=384)

For each grid row of tiles (mtp_jax/predict/tiles.py) the rows it spans are read (both dates
for change detection), cut into tiles (zero-padded where the scene is smaller than a tile) and
queued; full batches run on the devices, and each tile's outputs go to each task's sink
(sinks.py, one per kind of prediction): dense tasks average logits strip by strip (dense.py) into
a class map streamed to PNG (and COG when the scene is georeferenced), detection tasks pool their
boxes and merge them by NMS at the end (detections.py), scene classification keeps one label per
tile.

Every output of a scene is written into `<out>/.<stem>.partial/` and moved into `<out>` only
when the whole scene succeeded, so an error never leaves partial files (the folder is removed).

Host memory, for a W px wide scene of C bands, window S, K classes, batch B: the pixels of the
grid rows whose class rows are not final yet (2 * S * W * C at most, in the file's type), B
tiles as float32 (B * S^2 * C * 4) and their outputs (each tile's go to the mergers as soon as
its batch returns), each dense task's strip of 4 * S * W * (K + 1) bytes and the averaged rows
it hands over (4 * stride * W * K), the pooled detections, the preview (<= 2048 px) and GDAL's block cache, capped at
GDAL_CACHE_MB. Independent of the height; PNG / JPEG without the geo extra are decoded whole.
"""

import json
import os
import shutil
import time

import numpy as np

from mtp_jax.errors import DataError
from mtp_jax.predict import outputs as out_lib
from mtp_jax.predict.scene import have_rasterio, open_scene
from mtp_jax.predict.sinks import DetectionSink, Target, make_sinks
from mtp_jax.predict.tiles import TileGrid

MIN_SIDE = 32    # px: an image smaller than one cell of the stride-32 feature map is refused
FORMATS = ("png", "geotiff", "dota", "geojson", "gpkg", "json", "preview")
GEO_FORMATS = ("geotiff", "geojson", "gpkg")


def default_stride(predictor) -> int:
  """eval.slide_stride when the config slides windows of the model's size, else 3/4 window."""
  e = predictor.config.eval
  if e.get("slide_window", 0) == predictor.size and e.get("slide_stride", 0):
    return int(e.slide_stride)
  return predictor.size - predictor.size // 4


def _formats(requested, georeferenced: bool, path: str) -> tuple:
  if requested is None:   # everything the scene allows
    return tuple(f for f in FORMATS if georeferenced or f not in GEO_FORMATS)
  bad = [f for f in requested if f not in FORMATS]
  if bad:
    raise DataError(f"--formats {bad}: choose among {list(FORMATS)}")
  geo = [f for f in requested if f in GEO_FORMATS]
  if geo and not have_rasterio():
    raise DataError(f"--formats {geo} needs the geo extra: pip install -e '.[geo]' (rasterio, pyogrio)")
  if geo and not georeferenced:
    raise DataError(f"{path}: not georeferenced (no CRS and transform), so no {geo} output; "
                    "ask for png / dota / json / preview")
  return tuple(requested)


def _progress(total: int, name: str, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm import tqdm  # noqa: PLC0415
  except ImportError:
    return None
  return tqdm(total=total, desc=name, unit="tile", dynamic_ncols=True)


def _tile(strip: np.ndarray, x: int, size: int, window: int, resize) -> np.ndarray:
  """The window at column x of a strip ([T,] rows, W, C), zero-padded to window x window, resized
  to the model's size when `resize` (scene classification)."""
  crop = strip[..., :, x:x + window, :]
  pad = [(0, 0)] * (crop.ndim - 3) + [(0, window - crop.shape[-3]), (0, window - crop.shape[-2]), (0, 0)]
  crop = np.pad(crop, pad) if any(p[1] for p in pad) else crop
  return resize(crop, size) if resize is not None else crop


def predict_scene(predictor, path: str, out: str, *, path2: str | None = None, stride: int | None = None,
                  window: int | None = None, formats=None, image_id: str | None = None,
                  progress: bool = True, use_rasterio: bool | None = None) -> dict:
  """Predicts every task of `predictor` on the scene at `path` (and its second date `path2` for
  change detection) and writes the outputs under `out`. Returns the scene's summary (what
  `<stem>.json` holds)."""
  stem = image_id or os.path.splitext(os.path.basename(path))[0]
  if predictor.multi_date != (path2 is not None):
    raise DataError(f"{path}: change detection takes two dates (--input and --input2)" if predictor.multi_date
                    else f"--input2 {path2}: only change detection takes a second date")
  with _gdal_env():
    scenes = [open_scene(p, predictor.bands, use_rasterio) for p in ([path, path2] if path2 else [path])]
    try:
      return _predict(predictor, scenes, out, stem, stride, window, formats, progress)
    finally:
      for s in scenes:
        s.close()


GDAL_CACHE_MB = 128   # GDAL's block cache while a scene is read and written (its default: 5 % of RAM)


def _gdal_env():
  """rasterio.Env with GDAL's block cache capped, or a no-op without rasterio."""
  if not have_rasterio():
    import contextlib  # noqa: PLC0415
    return contextlib.nullcontext()
  import rasterio  # noqa: PLC0415
  return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)


def _predict(predictor, scenes, out, stem, stride, window, formats, progress):
  scene = scenes[0]
  for s in scenes:
    if s.channels != predictor.channels:
      raise DataError(f"{s.path}: {s.channels} band(s) after data.bands {predictor.bands or '()'}; "
                      f"the model was trained on {predictor.channels}")
    if min(s.height, s.width) < MIN_SIDE:
      raise DataError(f"{s.path}: {s.width} x {s.height} px; images need at least {MIN_SIDE} px a side")
    if (s.height, s.width) != (scene.height, scene.width):
      raise DataError(f"{s.path}: {s.width} x {s.height} px, but the first date is "
                      f"{scene.width} x {scene.height}")
  kinds = {n: t.prediction for n, t in predictor.tasks.items()}
  labels_only = set(kinds.values()) == {"label"}
  if labels_only:
    window = window or max(scene.height, scene.width)
  elif window not in (None, predictor.size):
    raise DataError(f"--window {window}: the model sees {predictor.size}-px tiles (data.image_size); "
                    "only scene classification resizes its windows")
  window = window or predictor.size
  stride = stride or (window if labels_only else default_stride(predictor))
  grid = TileGrid(scene.height, scene.width, window, stride)   # checks stride <= window
  formats = _formats(formats, scene.georeferenced, scene.path)

  os.makedirs(out, exist_ok=True)
  partial = os.path.join(out, f".{stem}.partial")
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    summary = _run(predictor, scenes, grid, kinds, formats, partial, stem, progress)
    for name in sorted(os.listdir(partial)):
      target = os.path.join(out, name)
      if os.path.isdir(target):
        shutil.rmtree(target)
      os.replace(os.path.join(partial, name), target)
    os.rmdir(partial)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return summary


def _run(predictor, scenes, grid, kinds, formats, folder, stem, progress):
  t0 = time.perf_counter()
  resize = None
  if set(kinds.values()) == {"label"}:
    from data_pipelines.downstream.classification import eval_geometry  # noqa: PLC0415
    resize = eval_geometry
  rgb = tuple(predictor.config.model.get("rgb_bands", ()))
  preview = out_lib.Preview(grid.height, grid.width, rgb_bands=rgb) if "preview" in formats else None
  pixels = _PreviewPixels(preview, grid, blend="dense" in kinds.values())
  sinks = make_sinks(predictor, grid, kinds, Target(folder, stem, formats, scenes[0]), on_rows=pixels.class_rows)
  _feed(predictor, scenes, grid, sinks, pixels, resize, _progress(len(grid), stem, progress))
  summary = _summary(predictor, scenes, grid, time.perf_counter() - t0)
  for sink in sinks:
    summary["tasks"][sink.name] = sink.close()
  if preview is not None:
    drawn = next(((s.kind, s.result) for s in sinks if isinstance(s, DetectionSink)), ("", None))
    preview.save(os.path.join(folder, f"{stem}_preview.png"), *drawn)
  if "json" in formats:
    with open(os.path.join(folder, f"{stem}.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return summary


def _feed(predictor, scenes, grid, sinks, pixels, resize, bar):
  """Reads the scenes grid row by grid row, runs their tiles in batches of predictor.batch and
  hands every tile's outputs to every sink, in row-major order."""
  queue = []   # (tile, tile pixels) waiting for a full batch

  def run_batch():
    outputs = predictor(np.stack([t for _, t in queue]))
    for j, (tile, _) in enumerate(queue):
      for sink in sinks:
        sink.add(tile, outputs, j)
    if bar is not None:
      bar.update(len(queue))
    queue.clear()

  for r, row in enumerate(grid.rows()):
    y = row[0].y
    strip = np.stack([s.read(y, min(y + grid.window, grid.height)) for s in scenes])
    pixels.read(r, y, strip)
    for tile in row:
      queue.append((tile, _tile(strip if predictor.multi_date else strip[0], tile.x, predictor.size,
                                grid.window, resize)))
      if len(queue) == predictor.batch:
        run_batch()
  if queue:
    run_batch()
  for sink in sinks:
    sink.finish()
  if bar is not None:
    bar.close()


class _PreviewPixels:
  """The scene's pixels for the preview. With a class map to blend in, a grid row's strip waits
  until the first dense task's rows under it are final (class_rows); without, the rows that the
  grid row alone starts go in as soon as it is read."""

  def __init__(self, preview, grid, blend: bool):
    self.preview, self.grid, self.blend, self.ys = preview, grid, blend, grid.ys
    self.strips = {}   # grid row -> its pixels ([T,] rows, W, C)

  def read(self, r: int, y: int, strip: np.ndarray):
    if self.preview is None:
      return
    if self.blend:
      self.strips[r] = strip
    else:
      end = self.ys[r + 1] if r + 1 < len(self.ys) else self.grid.height
      self.preview.add_rows(y, strip[0][:end - y])

  def class_rows(self, y0: int, classes: np.ndarray):
    if self.preview is not None:
      strip = self.strips.pop(self.ys.index(y0))
      self.preview.add_rows(y0, strip[0][:len(classes)], classes)


def _summary(predictor, scenes, grid, seconds: float) -> dict:
  """<stem>.json without its tasks."""
  scene = scenes[0]
  return {"input": [s.path for s in scenes], "width": scene.width, "height": scene.height,
          "crs": scene.crs.to_string() if scene.georeferenced else None,
          "transform": list(scene.transform)[:6] if scene.georeferenced else None,
          "window": grid.window, "stride": grid.stride, "tiles": len(grid),
          "checkpoint_step": predictor.step, "subset": predictor.subset,
          "seconds": round(seconds, 3), "megapixels_per_s": round(scene.width * scene.height / 1e6 / max(seconds, 1e-9), 4),
          "tasks": {}}
