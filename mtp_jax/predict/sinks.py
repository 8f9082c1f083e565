"""One sink per kind of prediction: a task's tile outputs go in, the scene's files and the task's
entry of `<stem>.json` come out (pipeline.py feeds them).

  DenseSink      semantic segmentation, change detection: logits averaged strip by strip
                 (dense.py) into a class map streamed to PNG and COG, pixels counted per class
  DetectionSink  rotated and horizontal detection, instance segmentation: boxes pooled and merged
                 by NMS across tiles (detections.py), written as DOTA files, GeoJSON, GeoPackage
  LabelSink      scene classification: one label (and the top 5) per window

Each has `add(tile, outputs, j)` (row j of a batch's outputs, tiles in row-major order),
`finish()` once the last tile is in, and `close()`, which writes what was not streamed and
returns the task's summary.
"""

import dataclasses
import os

import numpy as np

from mtp_jax.predict import outputs as out_lib
from mtp_jax.predict.dense import DenseMerger
from mtp_jax.predict.detections import DetectionMerger


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a scene's outputs go: the folder, the files' stem, the formats asked for and the scene
  (its size, CRS and transform)."""
  folder: str
  stem: str
  formats: tuple
  scene: object

  def path(self, suffix: str) -> str:
    return os.path.join(self.folder, f"{self.stem}{suffix}")


class DenseSink:
  """A class map: averaged logits -> class indices, row strip by row strip, to the PNG / COG
  writers, the per-class pixel counts and `on_rows(y0, classes)` (the preview)."""

  def __init__(self, name: str, classes: list, grid, target: Target, on_rows=None):
    self.name, self.kind, self.classes, self.on_rows = name, "dense", classes, on_rows
    scene, self.writers = target.scene, []
    if "png" in target.formats:
      self.writers.append(out_lib.PngRows(target.path(f"_{name}.png"), scene.height, scene.width))
    if "geotiff" in target.formats:
      self.writers.append(out_lib.GeoTiffRows(target.path(f"_{name}.tif"), scene.height, scene.width,
                                              scene.crs, scene.transform, classes))
    self.counts = np.zeros(len(classes), np.int64)
    self.merger = DenseMerger(grid, len(classes), self._final_rows)

  def _final_rows(self, y0: int, logits: np.ndarray):
    classes = np.argmax(logits, axis=-1).astype(np.uint8)
    self.counts += np.bincount(classes.ravel(), minlength=len(self.counts))
    for w in self.writers:
      w.write(y0, classes)
    if self.on_rows is not None:
      self.on_rows(y0, classes)

  def add(self, tile, outputs, j: int):
    self.merger.add(tile, outputs[self.name][j])

  def finish(self):
    self.merger.finish()

  def close(self) -> dict:
    for w in self.writers:
      w.close()
    return {"kind": "dense", "classes": self.classes,
            "pixels_per_class": dict(zip(self.classes, self.counts.tolist())),
            "files": [os.path.basename(w.path) for w in self.writers]}


class DetectionSink:
  """Detections pooled over the tiles, merged at the end; `result` (for the preview) once closed."""

  def __init__(self, name: str, kind: str, classes: list, tile_size: int, target: Target):
    self.name, self.kind, self.classes, self.target = name, kind, classes, target
    self.merger = DetectionMerger(kind, len(classes), tile_size=tile_size)
    self.result = None

  def add(self, tile, outputs, j: int):
    self.merger.add(tile, outputs[self.name], j)

  def finish(self):
    pass

  def close(self) -> dict:
    name, kind, classes, t = self.name, self.kind, self.classes, self.target
    result = self.result = self.merger.result()
    written = []
    if "dota" in t.formats:
      written.append(t.path(f"_{name}_dota"))
      out_lib.write_dota(written[-1], t.stem, kind, result, classes)
    if "geojson" in t.formats:
      written.append(t.path(f"_{name}.geojson"))
      out_lib.write_geojson(written[-1], kind, result, classes, t.scene.crs, t.scene.transform)
    if "gpkg" in t.formats:
      written.append(t.path(f"_{name}.gpkg"))
      out_lib.write_geopackage(written[-1], kind, result, classes, t.scene.crs, t.scene.transform)
    written = [os.path.basename(p) for p in written]
    return {"kind": kind, "classes": classes, "detections": int(len(result["scores"])),
            "before_merge": int(result["before_merge"]),
            "per_class": {c: int((result["labels"] == k).sum()) for k, c in enumerate(classes)},
            "files": written}


class LabelSink:
  """One label per window: its class, score and top 5."""

  def __init__(self, name: str, classes: list, window: int):
    self.name, self.kind, self.classes, self.window = name, "label", classes, window
    self.found = []   # (tile, class probabilities)

  def add(self, tile, outputs, j: int):
    self.found.append((tile, outputs[self.name][j]))

  def finish(self):
    pass

  def close(self) -> dict:
    classes, tiles = self.classes, []
    for tile, probs in self.found:
      top = np.argsort(-probs, kind="stable")[:5]
      tiles.append({"x": tile.x, "y": tile.y, "size": self.window, "class": classes[int(top[0])],
                    "score": float(probs[top[0]]),
                    "top5": [[classes[int(k)], float(probs[k])] for k in top]})
    return {"kind": "label", "classes": classes, "tiles": tiles}


ORDER = {"dense": 0, "rboxes": 1, "hboxes": 1}   # of the sinks, and of the tasks in <stem>.json; labels last


def make_sinks(predictor, grid, kinds: dict, target: Target, on_rows=None) -> list:
  """The sinks of the tasks {name: prediction kind}: dense ones first, then detections, then labels,
  each group in the tasks' order; the first dense one hands its class rows to `on_rows`."""
  sinks = []
  for name in sorted(kinds, key=lambda n: ORDER.get(kinds[n], 2)):
    kind, classes = kinds[name], predictor.class_names(name)
    if kind == "dense":
      first = not any(s.kind == "dense" for s in sinks)
      sinks.append(DenseSink(name, classes, grid, target, on_rows if first else None))
    elif kind in ("rboxes", "hboxes"):
      sinks.append(DetectionSink(name, kind, classes, predictor.size, target))
    else:
      sinks.append(LabelSink(name, classes, grid.window))
  return sinks
