"""One scene through a Predictor: tiles read in strips, batched on the devices, merged, written.

    summary = predict_scene(predictor, "scene.tif", "out/", stride=384)

For each grid row of tiles (mtp_jax/predict/tiles.py) the rows it spans are read (both dates
for change detection), cut into tiles (zero-padded where the scene is smaller than a tile) and
queued; full batches run on the devices; a grid row whose tiles are all predicted goes to each
task's merger: dense tasks average logits strip by strip (dense.py) into a class map streamed to
PNG (and COG when the scene is georeferenced), detection tasks pool their boxes and merge them by
NMS at the end (detections.py), scene classification keeps one label per tile.

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
from mtp_jax.predict.dense import DenseMerger
from mtp_jax.predict.detections import DetectionMerger
from mtp_jax.predict.scene import have_rasterio, open_scene
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
  scene = scenes[0]
  t0 = time.perf_counter()
  resize = None
  if set(kinds.values()) == {"label"}:
    from data_pipelines.downstream.classification import eval_geometry  # noqa: PLC0415
    resize = eval_geometry
  rgb = tuple(predictor.config.model.get("rgb_bands", ()))
  preview = out_lib.Preview(scene.height, scene.width, rgb_bands=rgb) if "preview" in formats else None
  dense, detectors, labels = {}, {}, {}
  for name, kind in kinds.items():
    classes = predictor.class_names(name)
    if kind == "dense":
      writers = []
      if "png" in formats:
        writers.append(out_lib.PngRows(os.path.join(folder, f"{stem}_{name}.png"), scene.height, scene.width))
      if "geotiff" in formats:
        writers.append(out_lib.GeoTiffRows(os.path.join(folder, f"{stem}_{name}.tif"), scene.height, scene.width,
                                           scene.crs, scene.transform, classes))
      counts = np.zeros(len(classes), np.int64)
      dense[name] = (DenseMerger(grid, len(classes), None), writers, counts)
    elif kind in ("rboxes", "hboxes"):
      detectors[name] = DetectionMerger(kind, len(classes), tile_size=predictor.size)
    else:
      labels[name] = []

  first_dense = next(iter(dense), None)
  strips = {}   # grid row -> its pixels ([T,] rows, W, C), kept until the preview has its rows
  rows = grid.rows()

  def finished_rows(name, y0, avg):
    """A dense task's final rows: class indices to its writers, counts, the preview."""
    _, writers, counts = dense[name]
    classes = np.argmax(avg, axis=-1).astype(np.uint8)
    counts += np.bincount(classes.ravel(), minlength=len(counts))
    for w in writers:
      w.write(y0, classes)
    if name == first_dense:
      r = grid.ys.index(y0)
      if preview is not None:
        preview.add_rows(y0, strips[r][0][:len(classes)], classes)
      del strips[r]

  for name, (merger, _, _) in dense.items():
    merger.sink = lambda y0, avg, name=name: finished_rows(name, y0, avg)

  def take(tile, outputs, j):
    """Row j of a batch's outputs, for `tile`: straight into each task's merger."""
    for name in dense:
      dense[name][0].add(tile, outputs[name][j])
    for name, merger in detectors.items():
      merger.add(tile, outputs[name], j)
    for name, found in labels.items():
      found.append((tile, outputs[name][j]))

  bar = _progress(len(grid), stem, progress)
  queue = []   # (tile, tile pixels) waiting for a full batch

  def run_batch():
    outputs = predictor(np.stack([t for _, t in queue]))
    for j, (tile, _) in enumerate(queue):
      take(tile, outputs, j)
    if bar is not None:
      bar.update(len(queue))
    queue.clear()

  for r, row in enumerate(rows):
    y = row[0].y
    strip = np.stack([s.read(y, min(y + grid.window, grid.height)) for s in scenes])
    if first_dense is not None:
      strips[r] = strip
    elif preview is not None:   # no class map to blend: the rows this grid row alone starts
      end = rows[r + 1][0].y if r + 1 < len(rows) else grid.height
      preview.add_rows(y, strip[0][:end - y])
    for tile in row:
      queue.append((tile, _tile(strip if predictor.multi_date else strip[0], tile.x, predictor.size,
                                grid.window, resize)))
      if len(queue) == predictor.batch:
        run_batch()
  if queue:
    run_batch()
  for merger, _, _ in dense.values():
    merger.finish()
  if bar is not None:
    bar.close()
  seconds = time.perf_counter() - t0

  summary = {"input": [s.path for s in scenes], "width": scene.width, "height": scene.height,
             "crs": scene.crs.to_string() if scene.georeferenced else None,
             "transform": list(scene.transform)[:6] if scene.georeferenced else None,
             "window": grid.window, "stride": grid.stride, "tiles": len(grid),
             "checkpoint_step": predictor.step, "subset": predictor.subset,
             "seconds": round(seconds, 3), "megapixels_per_s": round(scene.width * scene.height / 1e6 / max(seconds, 1e-9), 4),
             "tasks": {}}
  for name, (_, writers, counts) in dense.items():
    for w in writers:
      w.close()
    classes = predictor.class_names(name)
    summary["tasks"][name] = {"kind": "dense", "classes": classes,
                              "pixels_per_class": dict(zip(classes, counts.tolist())),
                              "files": [os.path.basename(w.path) for w in writers]}
  drawn = None
  for name, merger in detectors.items():
    classes, kind = predictor.class_names(name), kinds[name]
    result = merger.result()
    drawn = drawn or (kind, result)
    written = []
    if "dota" in formats:
      dota = os.path.join(folder, f"{stem}_{name}_dota")
      out_lib.write_dota(dota, stem, kind, result, classes)
      written.append(os.path.basename(dota))
    if "geojson" in formats:
      out_lib.write_geojson(os.path.join(folder, f"{stem}_{name}.geojson"), kind, result, classes,
                            scene.crs, scene.transform)
      written.append(f"{stem}_{name}.geojson")
    if "gpkg" in formats:
      out_lib.write_geopackage(os.path.join(folder, f"{stem}_{name}.gpkg"), kind, result, classes,
                               scene.crs, scene.transform)
      written.append(f"{stem}_{name}.gpkg")
    summary["tasks"][name] = {"kind": kind, "classes": classes, "detections": int(len(result["scores"])),
                              "before_merge": int(result["before_merge"]),
                              "per_class": {c: int((result["labels"] == k).sum()) for k, c in enumerate(classes)},
                              "files": written}
  for name, found in labels.items():
    classes = predictor.class_names(name)
    tiles = []
    for tile, probs in found:
      top = np.argsort(-probs, kind="stable")[:5]
      tiles.append({"x": tile.x, "y": tile.y, "size": grid.window, "class": classes[int(top[0])],
                    "score": float(probs[top[0]]),
                    "top5": [[classes[int(k)], float(probs[k])] for k in top]})
    summary["tasks"][name] = {"kind": "label", "classes": classes, "tiles": tiles}
  if preview is not None:
    preview.save(os.path.join(folder, f"{stem}_preview.png"), *(drawn or ("", None)))
  if "json" in formats:
    with open(os.path.join(folder, f"{stem}.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return summary


