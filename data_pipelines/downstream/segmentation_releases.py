"""Semantic-segmentation releases of MTP's finetuning (MTP_SPEC §5.2), read in their native layouts.

    SpaceNet v1 (AOI 1, Rio): <root>/3band/3band_AOI_1_RIO_img<N>.tif (8-bit RGB GeoTIFF) and
        <root>/geojson/Geo_AOI_1_RIO_img<N>.geojson (or vectordata/geojson/): building polygons
        in lon/lat, rasterised with the image's geotransform (GeoTIFF ModelTiepoint +
        ModelPixelScale, or ModelTransformation). Labels: 0 background, 1 building. A pixel is a
        building when its centre lies inside a polygon (holes excluded), as rasterio's
        `rasterize` (all_touched=False) does. Split: seeded per image, 80 % train / 20 % valid
        (MTP's SpaceNet list files are not part of its release); the lists go into
        dataset_info.json.
    LoveDA: <root>/{Train,Val}/{Urban,Rural}/{images_png,masks_png}/<n>.png, 1024 x 1024.
        Masks 0 = no-data, 1..7 = background, building, road, water, barren, forest,
        agricultural; mmseg's reduce_zero_label, as MTP: 0 -> 255 (ignored), k -> k - 1.
        Train -> train, Val -> valid (Test has no masks: it is predicted, not converted).

Each release gives `splits(root) -> ({split: [(relative image path, -1)]}, [(path, reason)] of
what does not belong)` and `read(root, path, _) -> DownstreamRecord` (BadSample with the reason).
"""

import io
import json
import os
import re

import cv2
import numpy as np
from PIL import Image

from data_pipelines.downstream.schema import DownstreamRecord, encode_png
from data_pipelines.downstream.scene_folders import BadSample, split_samples


def _open_rgb(path: str, relative: str):
  try:
    with open(path, "rb") as f:
      data = f.read()
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as e:  # noqa: BLE001 (any unreadable image)
    raise BadSample(f"unreadable image ({type(e).__name__}: {e})") from None
  if image.mode != "RGB":
    raise BadSample(f"image mode {image.mode}, not 8-bit RGB")
  return data, image


# ----------------------------------------------------------------------------------------------
# SpaceNet v1
# ----------------------------------------------------------------------------------------------
def geotransform(image: Image.Image, relative: str) -> tuple:
  """(x0, dx, y0, dy) of a GeoTIFF (world = x0 + col * dx, y0 + row * dy, corners of pixels)."""
  tags = getattr(image, "tag_v2", {})
  if 34264 in tags:   # ModelTransformationTag: a 4 x 4 row-major matrix
    m = np.asarray(tags[34264], np.float64).reshape(4, 4)
    if m[0, 1] or m[1, 0]:
      raise BadSample("rotated geotransform (ModelTransformation with shear) is not supported")
    return m[0, 3], m[0, 0], m[1, 3], m[1, 1]
  if 33922 in tags and 33550 in tags:   # ModelTiepoint (i, j, k, x, y, z) + ModelPixelScale
    i, j, _, x, y, _ = np.asarray(tags[33922], np.float64)[:6]
    sx, sy = np.asarray(tags[33550], np.float64)[:2]
    return x - i * sx, sx, y + j * sy, -sy
  raise BadSample("the GeoTIFF has no geotransform (ModelTiepoint + ModelPixelScale tags)")


def rasterise(geojson: dict, transform: tuple, shape: tuple) -> np.ndarray:
  """(H, W) uint8: 1 where a pixel centre lies inside a (Multi)Polygon of the collection (its
  holes excluded): rasterio's `rasterize` rule (all_touched=False), tested exactly per pixel
  centre with matplotlib's even-odd point-in-polygon over each ring's bounding box."""
  from matplotlib.path import Path  # noqa: PLC0415 (matplotlib is loaded lazily)
  x0, dx, y0, dy = transform
  out = np.zeros(shape, np.uint8)
  h, w = shape
  for feature in geojson.get("features", []):
    geometry = feature.get("geometry") or {}
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    polygons = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
    for polygon in polygons:
      inside = None
      for ring_index, ring in enumerate(polygon):
        xy = np.asarray(ring, np.float64)[:, :2]
        pixels = np.stack([(xy[:, 0] - x0) / dx, (xy[:, 1] - y0) / dy], axis=1)
        if ring_index == 0:
          c0, r0 = np.clip(np.floor(pixels.min(0)).astype(int), 0, [w, h])
          c1, r1 = np.clip(np.ceil(pixels.max(0)).astype(int), 0, [w, h])
          if c1 <= c0 or r1 <= r0:
            break
          cols, rows = np.meshgrid(np.arange(c0, c1) + 0.5, np.arange(r0, r1) + 0.5)
          centres = np.stack([cols.ravel(), rows.ravel()], axis=1)
          inside = Path(pixels).contains_points(centres)
        else:   # a hole
          inside &= ~Path(pixels).contains_points(centres)
      if inside is not None:
        block = out[r0:r1, c0:c1]
        block[inside.reshape(block.shape)] = 1
  return out


class SpaceNetV1:
  name = "spacenet1"
  classes = ("building",)
  train_fraction = 0.8
  _image = re.compile(r"^3band_AOI_1_RIO_img(\d+)\.tif$")

  def _root(self, root):
    for candidate in (root, os.path.join(root, "processedData"), os.path.join(root, "AOI_1_Rio")):
      if os.path.isdir(os.path.join(candidate, "3band")):
        return candidate
    raise BadSample(f"{root!r} holds no SpaceNet v1 release: expected 3band/3band_AOI_1_RIO_img<N>.tif")

  def _geojson(self, top, number):
    for folder in ("geojson", os.path.join("vectordata", "geojson")):
      path = os.path.join(top, folder, f"Geo_AOI_1_RIO_img{number}.geojson")
      if os.path.isfile(path):
        return path
    return None

  def splits(self, root, seed: int = 0):
    top = self._root(root)
    items, foreign = [], []
    for file in sorted(os.listdir(os.path.join(top, "3band"))):
      if not self._image.match(file):
        foreign.append((f"3band/{file}", "not a 3band_AOI_1_RIO_img<N>.tif image"))
        continue
      items.append((f"3band/{file}", 0))
    # One "class" for the seeded split: a permutation of all images.
    split = split_samples(items, 1, self.train_fraction, seed)
    return {k: [(p, -1) for p, _ in v] for k, v in split.items()}, foreign

  def read(self, root, relative, _label=-1) -> DownstreamRecord:
    top = self._root(root)
    number = self._image.match(os.path.basename(relative)).group(1)
    _, image = _open_rgb(os.path.join(top, relative), relative)
    geo = self._geojson(top, number)
    if geo is None:
      raise BadSample(f"no geojson/Geo_AOI_1_RIO_img{number}.geojson for it")
    try:
      with open(geo) as f:
        collection = json.load(f)
    except (OSError, ValueError) as e:
      raise BadSample(f"unreadable {os.path.basename(geo)} ({e})") from None
    label = rasterise(collection, geotransform(image, relative), (image.height, image.width))
    # TIFF is re-encoded as PNG (lossless, the same pixels): decoders need no GeoTIFF support.
    return DownstreamRecord(image_bytes=encode_png(np.asarray(image)), height=image.height,
                            width=image.width, channels=3,
                            filename=relative, dataset=self.name, semantic_bytes=encode_png(label))


# ----------------------------------------------------------------------------------------------
# LoveDA
# ----------------------------------------------------------------------------------------------
class LoveDA:
  name = "loveda"
  classes = ("building", "road", "water", "barren", "forest", "agricultural")   # + background 0
  release_splits = {"train": "Train", "valid": "Val"}

  def _root(self, root):
    for candidate in (root, os.path.join(root, "LoveDA")):
      if all(os.path.isdir(os.path.join(candidate, s)) for s in self.release_splits.values()):
        return candidate
    raise BadSample(f"{root!r} holds no LoveDA release: expected Train/ and Val/ with "
                    "{Urban,Rural}/{images_png,masks_png}/")

  def splits(self, root, seed: int = 0):
    del seed   # the release's own splits
    top = self._root(root)
    out, foreign = {}, []
    for split, folder in self.release_splits.items():
      out[split] = []
      for domain in ("Urban", "Rural"):
        images = os.path.join(top, folder, domain, "images_png")
        if not os.path.isdir(images):
          foreign.append((f"{folder}/{domain}", "folder missing (expected images_png/, masks_png/)"))
          continue
        for file in sorted(os.listdir(images), key=lambda f: (len(f), f)):
          relative = f"{folder}/{domain}/images_png/{file}"
          if not file.endswith(".png"):
            foreign.append((relative, "not a .png image"))
            continue
          out[split].append((relative, -1))
    return out, foreign

  def read(self, root, relative, _label=-1) -> DownstreamRecord:
    top = self._root(root)
    data, image = _open_rgb(os.path.join(top, relative), relative)
    mask_path = os.path.join(top, relative.replace("/images_png/", "/masks_png/"))
    if not os.path.isfile(mask_path):
      raise BadSample("its mask (masks_png/ of the same name) is missing")
    raw = cv2.imread(mask_path, cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 2:
      raise BadSample("its mask is unreadable or not a one-channel PNG")
    if raw.shape != (image.height, image.width):
      raise BadSample(f"its mask is {raw.shape[1]}x{raw.shape[0]}, the image {image.width}x{image.height}")
    if raw.max() > 7:
      raise BadSample(f"its mask holds value {int(raw.max())}, outside LoveDA's 0..7")
    label = np.where(raw == 0, 255, raw.astype(np.int32) - 1).astype(np.uint8)   # reduce_zero_label
    return DownstreamRecord(image_bytes=data, height=image.height, width=image.width, channels=3,
                            filename=relative, dataset=self.name, semantic_bytes=encode_png(label))


SPACENET1 = SpaceNetV1()
LOVEDA = LoveDA()
