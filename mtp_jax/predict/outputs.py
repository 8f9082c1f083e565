"""What prediction writes: class maps (PNG, Cloud-Optimised GeoTIFF), detections (DOTA txt,
GeoJSON in EPSG:4326, GeoPackage in the scene's CRS; instance segmentation's as mask polygons),
scene labels (JSON) and a preview PNG.

Coordinates: boxes are in continuous scene pixels, (0, 0) the top-left corner of the top-left
pixel, x right, y down; a GeoTIFF's affine transform maps them to its CRS as they are (GDAL's
pixel-is-area). GeoJSON (RFC 7946) holds (longitude, latitude) in EPSG:4326, reprojected by GDAL
(`rasterio.warp.transform`), exterior rings counter-clockwise. Class maps are uint8 class
indices (the task's output_names; 255 never occurs), PNGs palette-coloured with
mtp_jax.metrics.drawing's palette. Writers of rows stream: memory is one strip of rows.
"""

import json
import os
import struct
import zlib

import numpy as np

from mtp_jax.metrics import drawing
from mtp_jax.metrics.submissions import write_dota_task1
from mtp_jax.ops.boxes import rbox_to_poly
from mtp_jax.predict.scene import need_rasterio


# ---- class maps -----------------------------------------------------------------------------
class PngRows:
  """A palette PNG written row strip by row strip (zlib stream): (H, W) uint8 class indices."""

  def __init__(self, path: str, height: int, width: int):
    self.path, self.height, self.width, self.rows = path, height, width, 0
    self._f = open(path, "wb")
    self._z = zlib.compressobj(6)
    self._f.write(b"\x89PNG\r\n\x1a\n")
    self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))   # 8-bit palette
    self._chunk(b"PLTE", drawing.palette().tobytes())

  def _chunk(self, kind: bytes, data: bytes):
    self._f.write(struct.pack(">I", len(data)) + kind + data)
    self._f.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  def write(self, y0: int, labels: np.ndarray):
    if y0 != self.rows or labels.shape[1] != self.width:
      raise ValueError(f"{self.path}: rows must come in order ({y0} given, {self.rows} expected)")
    raw = np.concatenate([np.zeros((len(labels), 1), np.uint8), labels.astype(np.uint8)], 1)  # filter 0
    data = self._z.compress(raw.tobytes())
    if data:
      self._chunk(b"IDAT", data)
    self.rows += len(labels)

  def close(self):
    if self.rows != self.height:
      raise ValueError(f"{self.path}: {self.rows} of {self.height} rows written")
    self._chunk(b"IDAT", self._z.flush())
    self._chunk(b"IEND", b"")
    self._f.close()


class GeoTiffRows:
  """A Cloud-Optimised GeoTIFF of uint8 class indices with the scene's CRS and transform: rows
  stream into a tiled GTiff beside it, which GDAL's COG driver then copies (with overviews)."""

  def __init__(self, path: str, height: int, width: int, crs, transform, class_names):
    rasterio = need_rasterio("a GeoTIFF class map")
    self.path, self.tmp = path, path + ".tiled.tif"
    self.class_names = list(class_names)
    self._ds = rasterio.open(self.tmp, "w", driver="GTiff", height=height, width=width, count=1,
                             dtype="uint8", crs=crs, transform=transform, tiled=True,
                             blockxsize=512, blockysize=512, compress="deflate")
    pal = drawing.palette()
    self._ds.write_colormap(1, {i: tuple(int(v) for v in pal[i]) + (255,) for i in range(256)})

  def write(self, y0: int, labels: np.ndarray):
    from rasterio.windows import Window  # noqa: PLC0415
    self._ds.write(labels.astype(np.uint8)[None], window=Window(0, y0, labels.shape[1], len(labels)))

  def close(self):
    import rasterio.shutil  # noqa: PLC0415
    self._ds.update_tags(class_names=json.dumps(self.class_names))
    self._ds.close()
    rasterio.shutil.copy(self.tmp, self.path, driver="COG", compress="DEFLATE", overview_resampling="nearest")
    os.remove(self.tmp)


# ---- detections -------------------------------------------------------------------------------
def polygons(kind: str, boxes: np.ndarray) -> np.ndarray:
  """(N, 4, 2) corners in scene pixels of rotated (le90) or horizontal boxes."""
  boxes = np.asarray(boxes, np.float64)
  if kind == "rboxes":
    return np.asarray(rbox_to_poly(boxes), np.float64).reshape(-1, 4, 2)
  x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
  return np.stack([np.stack([x1, y1], -1), np.stack([x2, y1], -1), np.stack([x2, y2], -1),
                   np.stack([x1, y2], -1)], 1)


def outlines(kind: str, result: dict) -> list:
  """Each detection's outline in scene pixels: its mask polygon where it has one (instance
  segmentation), else its box's 4 corners."""
  corners = polygons(kind, result["boxes"])
  masks = result.get("polygons")
  return [masks[i] if masks is not None and masks[i] is not None else corners[i] for i in range(len(corners))]


def write_dota(folder: str, image_id: str, kind: str, result: dict, class_names) -> list[str]:
  """DOTA result files of one scene: Task1 (rotated: `id score x1 y1 ... x4 y4`) or Task2
  (horizontal: `id score xmin ymin xmax ymax`), one `Task<k>_<class>.txt` per class."""
  if kind == "rboxes":
    per_class = [np.concatenate([result["boxes"][result["labels"] == c], result["scores"][result["labels"] == c, None]], 1)
                 for c in range(len(class_names))]
    write_dota_task1(folder, {image_id: per_class}, class_names)
    return [os.path.join(folder, f"Task1_{n}.txt") for n in class_names]
  os.makedirs(folder, exist_ok=True)
  files = []
  for c, name in enumerate(class_names):
    pick = result["labels"] == c
    lines = [f"{image_id} {s:.6f} " + " ".join(f"{v:.2f}" for v in b)
             for b, s in zip(result["boxes"][pick], result["scores"][pick])]
    files.append(os.path.join(folder, f"Task2_{name}.txt"))
    with open(files[-1], "w") as f:
      f.write("".join(line + "\n" for line in lines))
  return files


def to_map(transform, corners: np.ndarray):
  """(..., 2) pixel (x, y) -> (xs, ys) arrays in the transform's CRS."""
  a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
  x, y = corners[..., 0], corners[..., 1]
  return a * x + b * y + c, d * x + e * y + f


def _ccw(ring: np.ndarray) -> np.ndarray:
  """A closed ring (K, 2), counter-clockwise (positive shoelace area in x-east, y-north axes)."""
  x, y = ring[:, 0], ring[:, 1]
  area = 0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])
  return ring if area >= 0 else ring[::-1]


def write_geojson(path: str, kind: str, result: dict, class_names, crs, transform):
  """The detections as an RFC 7946 FeatureCollection of polygons in EPSG:4326 (lon, lat), each
  with properties class, label, score."""
  need_rasterio("GeoJSON output")
  from rasterio.warp import transform as reproject  # noqa: PLC0415
  rings = outlines(kind, result)
  features = []
  if rings:
    flat = np.concatenate(rings)
    xs, ys = to_map(transform, flat)
    lon, lat = reproject(crs, "EPSG:4326", xs.tolist(), ys.tolist())
    points = np.stack([lon, lat], -1)
    ends = np.cumsum([len(r) for r in rings])
    for i, ring in enumerate(np.split(points, ends[:-1])):
      ring = _ccw(np.concatenate([ring, ring[:1]]))
      features.append({"type": "Feature",
                       "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]},
                       "properties": {"class": class_names[int(result["labels"][i])],
                                      "label": int(result["labels"][i]), "score": float(result["scores"][i])}})
  with open(path, "w") as f:
    json.dump({"type": "FeatureCollection", "features": features}, f)


def write_geopackage(path: str, kind: str, result: dict, class_names, crs, transform):
  """The detections in the scene's CRS, one polygon layer per class (named as the class, classes
  without detections too), fields class, score."""
  need_rasterio("GeoPackage output")
  try:
    import pyogrio  # noqa: PLC0415
    import shapely  # noqa: PLC0415
  except ImportError:
    from mtp_jax.errors import DataError  # noqa: PLC0415
    raise DataError("GeoPackage output needs the geo extra: pip install -e '.[geo]' (pyogrio, shapely)") from None
  outline = outlines(kind, result)
  for c, name in enumerate(class_names):
    pick = np.flatnonzero(result["labels"] == c)
    rings = [np.stack(to_map(transform, outline[i]), -1) for i in pick]
    geometry = np.array([shapely.to_wkb(shapely.Polygon(r)) for r in rings], dtype=object)
    pyogrio.raw.write(path, geometry, [np.array([name] * len(pick), dtype=object), result["scores"][pick].astype(np.float64)],
                      ["class", "score"], layer=name, driver="GPKG", geometry_type="Polygon", crs=crs.to_wkt())


# ---- preview ------------------------------------------------------------------------------------
class Preview:
  """A subsampled RGB picture of the scene (every `step`-th pixel, longer side <= max_side) with
  the class map blended in or the boxes drawn on: preview.png."""

  def __init__(self, height: int, width: int, max_side: int = 2048, rgb_bands=()):
    self.step = max(1, -(-max(height, width) // max_side))
    self.rgb_bands = tuple(rgb_bands)
    self.image = np.zeros((-(-height // self.step), -(-width // self.step), 3), np.uint8)
    self.labels = None

  def add_rows(self, y0: int, pixels: np.ndarray, labels: np.ndarray | None = None):
    """Scene rows y0 .. y0 + len(pixels) - 1 ((n, W, C) pixels, optional (n, W) class map)."""
    first = -(-y0 // self.step) * self.step - y0
    picked = slice(first, len(pixels), self.step)
    rows = pixels[picked, ::self.step]
    if not len(rows):
      return
    y = (y0 + first) // self.step
    self.image[y:y + len(rows)] = drawing.display_rgb(rows, self.rgb_bands)
    if labels is not None:
      if self.labels is None:
        self.labels = np.zeros(self.image.shape[:2], np.uint8)
      self.labels[y:y + len(rows)] = labels[picked, ::self.step]

  def save(self, path: str, kind: str = "", result: dict | None = None):
    image = self.image
    if self.labels is not None:
      colours = drawing.colourize(self.labels)
      blend = (0.5 * image + 0.5 * colours).astype(np.uint8)
      image = np.where(self.labels[..., None] > 0, blend, image)
    if result is not None and len(result["boxes"]):
      boxes = np.array(result["boxes"], np.float64)
      if kind == "rboxes":
        boxes[:, :4] /= self.step
        image = drawing.draw_rboxes(image, boxes, labels=result["labels"])
      else:
        image = drawing.draw_instances(image, boxes / self.step, labels=result["labels"])
    drawing.save_png(image, path)
