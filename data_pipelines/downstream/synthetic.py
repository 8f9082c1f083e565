"""Tiny finetuning releases in their exact native layouts, for tests, smoke runs and the docs.

    python -m data_pipelines.downstream.synthetic eurosat --out data/eurosat_sample [--per-class 12]
    python -m data_pipelines.downstream.synthetic spacenet1 --out data/spacenet_sample [--images 12]

Scene releases (EuroSAT `2750/<Class>/<Class>_<n>.jpg`, RESISC-45 `NWPU-RESISC45/<class>/
<class>_<nnn>.jpg`): each class a distinct texture (a colour and a stripe orientation) with
noise, so a small model separates them in a few dozen steps. EuroSAT's 13-band release
(`ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/<Class>_<n>.tif`, uint16, bands
last): the same textures in B04/B03/B02 at Sentinel-2 reflectance scale (x 8 + 500), the other
bands their mean plus noise.
Segmentation releases: SpaceNet v1 (`3band/3band_AOI_1_RIO_img<N>.tif` GeoTIFFs with their
geotransform tags, `geojson/Geo_AOI_1_RIO_img<N>.geojson` building polygons in lon/lat, bright
roofs on green-brown ground) and LoveDA (`{Train,Val}/{Urban,Rural}/{images_png,masks_png}/
<n>.png`, blobs of the 7 classes in distinct colours, or with --style objects the SAMRS sample's
objects, mask 0 = no-data at the borders).
Change releases: LEVIR-CD / WHU-CD / CDD pairs (write_change_pairs) and OSCD's Onera folders
(write_oscd: 13 Sentinel-2 bands per date at their own resolutions).
Rotated-detection releases: DOTA (write_dota: `{train,val}/images/P<n>.png` + `labelTxt/P<n>.txt`
with the imagesource / gsd header lines and difficult flags, `test/images/`), FAIR1M-2.0
(write_fair1m: `train/part<k>/{images,labelXml}`, `validation/`, `test/`, class names with
spaces), xView (write_xview: `train_images/<n>.tif` + `xView_train.geojson`) and DIOR-R
(write_dior_r: JPEGs, `Annotations/Oriented Bounding Boxes/<n>.xml`, `ImageSets/Main/*.txt`);
objects are rotated rectangles in their class's colour and aspect on a textured ground.
"""

import json
import os

import numpy as np
import tifffile
from PIL import Image

from data_pipelines.downstream import scene_folders, sentinel2
from mtp_jax import cli

RELEASES = {"eurosat": (scene_folders.EUROSAT, 64, "{c}_{n}.jpg"),
            "eurosat_ms": (scene_folders.EUROSAT_MS, 64, "{c}_{n}.tif"),
            "resisc45": (scene_folders.RESISC45, 256, "{c}_{n:03d}.jpg")}

# SpaceNet v1 Rio's geotransform scale (about 50 cm per pixel at 22.9 S): degrees per pixel.
RIO_ORIGIN, RIO_DEGREES = (-43.68, -22.88), 4.5e-6


def scene_image(label: int, num_classes: int, size: int, rng) -> np.ndarray:
  """(size, size, 3) uint8: class `label`'s colour and stripe angle, plus noise."""
  hue = 2 * np.pi * label / num_classes
  colour = 127 + 100 * np.array([np.cos(hue), np.cos(hue + 2.1), np.cos(hue + 4.2)])
  angle = np.pi * (label % 4) / 4
  y, x = np.mgrid[:size, :size] / size
  stripes = np.sin(2 * np.pi * 6 * (x * np.cos(angle) + y * np.sin(angle)))
  image = colour[None, None] * (0.75 + 0.25 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def write_scene_release(name: str, out: str, per_class: int = 12, seed: int = 0, classes=None) -> str:
  """Writes `per_class` images of each class (all classes, or the first `classes`) under
  `<out>/<release folder>/`; returns that folder."""
  release, size, pattern = RELEASES[name]
  rng = np.random.default_rng(seed)
  top = os.path.join(out, release.folder)
  names = release.classes[:classes] if classes else release.classes
  for label, c in enumerate(names):
    os.makedirs(os.path.join(top, c), exist_ok=True)
    for n in range(1, per_class + 1):
      image = scene_image(label, len(release.classes), size, rng)
      path = os.path.join(top, c, pattern.format(c=c, n=n))
      if release.suffix == ".tif":
        tifffile.imwrite(path, multiband_scene(image, release.bands, rng), photometric="minisblack",
                         planarconfig="contig")   # one page, the bands interleaved per pixel
      else:
        Image.fromarray(image).save(path, quality=95)
  return top


def multiband_scene(rgb: np.ndarray, bands: int, rng) -> np.ndarray:
  """(H, W, bands) uint16: `rgb` in the Sentinel-2 RGB bands (x 8 + 500), noise elsewhere."""
  h, w, _ = rgb.shape
  out = np.clip(rng.normal(1500, 200, (h, w, bands)), 0, 65535)
  out[..., list(sentinel2.RGB)] = rgb.astype(np.float64) * 8 + 500
  return out.astype(np.uint16)


def write_geotiff(path: str, image: np.ndarray, origin: tuple, degrees: float):
  """An RGB GeoTIFF whose pixel (0, 0) corner is at `origin` (lon, lat), `degrees` per pixel."""
  from PIL import TiffImagePlugin  # noqa: PLC0415
  tags = TiffImagePlugin.ImageFileDirectory_v2()
  tags[33550] = (degrees, degrees, 0.0)                           # ModelPixelScaleTag
  tags.tagtype[33550] = 12
  tags[33922] = (0.0, 0.0, 0.0, origin[0], origin[1], 0.0)        # ModelTiepointTag
  tags.tagtype[33922] = 12
  Image.fromarray(image).save(path, tiffinfo=tags)


def write_spacenet1(out: str, images: int = 12, seed: int = 0, size=(88, 80)) -> str:
  """SpaceNet v1 tiles of about `size` (w, h) px (each a few px larger or smaller), each with
  2-5 buildings (rotated rectangles, one with a courtyard hole) drawn and written as GeoJSON."""
  from data_pipelines.downstream.segmentation_releases import rasterise  # noqa: PLC0415
  import json  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(out, "3band"), exist_ok=True)
  os.makedirs(os.path.join(out, "geojson"), exist_ok=True)
  for n in range(1, images + 1):
    w, h = size[0] + int(rng.integers(-4, 5)), size[1] + int(rng.integers(-4, 5))
    lon0 = RIO_ORIGIN[0] + n * 0.01
    lat0 = RIO_ORIGIN[1]
    features = []
    for b in range(int(rng.integers(2, 6))):
      cx, cy = rng.uniform(12, w - 12), rng.uniform(12, h - 12)
      bw, bh, angle = rng.uniform(8, 20), rng.uniform(8, 16), rng.uniform(0, np.pi)
      c, s_ = np.cos(angle), np.sin(angle)
      corners = [(cx + dx * c - dy * s_, cy + dx * s_ + dy * c)
                 for dx, dy in ((-bw / 2, -bh / 2), (bw / 2, -bh / 2), (bw / 2, bh / 2), (-bw / 2, bh / 2))]
      rings = [corners + corners[:1]]
      if b == 0:   # a courtyard: a hole of a third of the size
        rings.append([(cx + (x - cx) / 3, cy + (y - cy) / 3) for x, y in rings[0]])
      lonlat = [[[lon0 + x * RIO_DEGREES, lat0 - y * RIO_DEGREES, 0.0] for x, y in ring] for ring in rings]
      features.append({"type": "Feature", "properties": {"building": "yes"},
                       "geometry": {"type": "Polygon", "coordinates": lonlat}})
    collection = {"type": "FeatureCollection", "features": features}
    label = rasterise(collection, (lon0, RIO_DEGREES, lat0, -RIO_DEGREES), (h, w))
    ground = np.array([70, 110, 60]) + rng.normal(0, 10, (h, w, 3))
    roof = np.array([200, 190, 185]) + rng.normal(0, 10, (h, w, 3))
    image = np.clip(np.where(label[..., None] == 1, roof, ground), 0, 255).astype(np.uint8)
    write_geotiff(os.path.join(out, "3band", f"3band_AOI_1_RIO_img{n}.tif"), image, (lon0, lat0), RIO_DEGREES)
    with open(os.path.join(out, "geojson", f"Geo_AOI_1_RIO_img{n}.geojson"), "w") as f:
      json.dump(collection, f)
  return out


LOVEDA_COLOURS = np.array([[200, 200, 200], [220, 60, 60], [240, 240, 70], [40, 90, 220],
                           [160, 120, 80], [30, 140, 40], [200, 170, 30]])


def write_loveda(out: str, per_domain: int = 3, seed: int = 0, size: int = 96, style: str = "blobs") -> str:
  """LoveDA Train and Val, `per_domain` images per domain (Urban, Rural), mask values 1..7 with a
  no-data border (0); numbered as the release (Rural from 0, Urban after it).

  style "blobs": 16-px blocks of the 7 classes in their colours (a small model learns them from
  colour alone). style "objects": the six land-cover classes drawn as the SAMRS sample's objects
  (building..agricultural = the first six SAMRS classes' colours, stripes and shapes, rotated and
  overlapping, data_pipelines.samrs.synthetic) on its textured ground (background), the way the
  real downstream datasets share their objects with SAMRS: a pretrained encoder has seen them."""
  if style not in ("blobs", "objects"):
    raise ValueError(f"write_loveda: style {style!r} is not 'blobs' or 'objects'")
  from data_pipelines.samrs import classes as samrs_classes, synthetic as samrs_synthetic  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  number = 0
  for split in ("Train", "Val"):
    for domain in ("Rural", "Urban"):
      for folder in ("images_png", "masks_png"):
        os.makedirs(os.path.join(out, split, domain, folder), exist_ok=True)
      for _ in range(per_domain):
        if style == "objects":
          image, gray, _ = samrs_synthetic.make_scene(rng, samrs_classes.subset("sota"), size, classes=6)
          mask = np.where(gray == 255, 1, gray.astype(np.int64) + 2).astype(np.uint8)
        else:
          classes = np.zeros((size // 16, size // 16), np.int64)
          classes[:] = rng.integers(0, 7, classes.shape)
          cls = np.kron(classes, np.ones((16, 16), np.int64))
          image = np.clip(LOVEDA_COLOURS[cls] + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
          mask = (cls + 1).astype(np.uint8)
        mask[:2], mask[:, :2] = 0, 0   # no-data
        Image.fromarray(image).save(os.path.join(out, split, domain, "images_png", f"{number}.png"))
        Image.fromarray(mask).save(os.path.join(out, split, domain, "masks_png", f"{number}.png"))
        number += 1
  return out


def write_change_pairs(out: str, label_folder: str = "label", per_split: int = 4, size: int = 64,
                       seed: int = 0, suffix: str = ".png") -> str:
  """{train,val,test}/{A,B,<label_folder>}/<n><suffix> pairs: date B is date A with 2-4 new
  bright buildings (the changed pixels, 255 in the label) and a global brightness shift."""
  rng = np.random.default_rng(seed)
  for split in ("train", "val", "test"):
    for folder in ("A", "B", label_folder):
      os.makedirs(os.path.join(out, split, folder), exist_ok=True)
    for n in range(per_split):
      a = np.clip(np.array([90, 120, 70]) + rng.normal(0, 14, (size, size, 3)), 0, 255)
      label = np.zeros((size, size), np.uint8)
      for _ in range(int(rng.integers(2, 5))):
        h, w = rng.integers(size // 6, size // 3, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        label[y:y + h, x:x + w] = 255
      b = np.where(label[..., None] > 0, np.array([215, 205, 200]) + rng.normal(0, 8, (size, size, 3)), a + 12)
      name = f"{split}_{n}{suffix}"
      Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(os.path.join(out, split, "A", name))
      Image.fromarray(np.clip(b, 0, 255).astype(np.uint8)).save(os.path.join(out, split, "B", name))
      Image.fromarray(label).save(os.path.join(out, split, label_folder, name))
  return out


OSCD_FOLDERS = tuple(f"Onera Satellite Change Detection dataset - {k}" for k in ("Images", "Train Labels", "Test Labels"))


def write_oscd(out: str, train=("abudhabi", "beihai", "bercy"), test=("brasilia", "dubai"),
               size=(100, 112), seed: int = 0) -> str:
  """The Onera release's folders (OSCD_FOLDERS) for the given cities, each `size` (H, W) px at
  10 m: train.txt / test.txt, per city imgs_{1,2}_rect/<band>.tif for the 13 bands (uint16; the
  20 m and 60 m bands at 1/2 and 1/6 of the size, cv2 INTER_AREA), dates.txt, and the labels
  cm/cm.png (0 / 255) and cm/<city>-cm.tif (1 / 2). Date 2 is date 1 with 2-3 bright new
  buildings (the changed pixels, +1,500 in every band) and a small global shift."""
  import cv2  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  images, *labels = (os.path.join(out, f) for f in OSCD_FOLDERS)
  h, w = size
  for split, cities, label_root in (("train", train, labels[0]), ("test", test, labels[1])):
    os.makedirs(images, exist_ok=True)
    with open(os.path.join(images, f"{split}.txt"), "w") as f:
      f.write(",".join(cities) + "\n")
    for city in cities:
      change = np.zeros((h, w), np.uint8)
      for _ in range(int(rng.integers(2, 4))):
        bh, bw = rng.integers(h // 6, h // 3), rng.integers(w // 6, w // 3)
        y, x = rng.integers(0, h - bh), rng.integers(0, w - bw)
        change[y:y + bh, x:x + bw] = 1
      one = np.clip(np.array(sentinel2.L1C_MEAN) + rng.normal(0, 120, (h, w, 13)), 0, 65535)
      two = one + 40 + change[..., None] * 1500.0
      for date, pixels in ((1, one), (2, two)):
        folder = os.path.join(images, city, f"imgs_{date}_rect")
        os.makedirs(folder, exist_ok=True)
        for i, band in enumerate(sentinel2.BANDS):
          factor = sentinel2.METRES[band] // 10
          plane = pixels[..., i].astype(np.float32)
          if factor > 1:
            plane = cv2.resize(plane, (-(-w // factor), -(-h // factor)), interpolation=cv2.INTER_AREA)
          tifffile.imwrite(os.path.join(folder, f"{band}.tif"), np.round(plane).clip(0, 65535).astype(np.uint16))
      with open(os.path.join(images, city, "dates.txt"), "w") as f:
        f.write("date_1: 20151126\ndate_2: 20170925\n")
      cm = os.path.join(label_root, city, "cm")
      os.makedirs(cm, exist_ok=True)
      Image.fromarray(change * 255).save(os.path.join(cm, "cm.png"))
      tifffile.imwrite(os.path.join(cm, f"{city}-cm.tif"), change + 1)
  return out


def detection_scene(rng, width: int, height: int, num_classes: int, count: int, sides=(16, 40)):
  """(image (H, W, 3) uint8, polygons (N, 4, 2) clockwise from the box's top left, labels (N,)):
  `count` rotated rectangles wholly inside the image, class k in its own colour and aspect."""
  from mtp_jax.ops import boxes  # noqa: PLC0415
  y, x = np.mgrid[:height, :width]
  image = 90 + 20 * np.sin(x / 7.0)[..., None] * np.cos(y / 11.0)[..., None] + rng.normal(0, 6, (height, width, 3))
  polygons, labels = [], []
  for _ in range(count * 20):
    if len(labels) == count:
      break
    label = int(rng.integers(num_classes))
    long = rng.uniform(*sides)
    w, h = long, long / (1.0 + 0.8 * (label % 3))
    rbox = np.array([rng.uniform(0, width), rng.uniform(0, height), w, h, rng.uniform(-np.pi / 2, np.pi / 2)])
    poly = boxes.rbox_to_poly(rbox)
    if poly[:, 0].min() < 1 or poly[:, 1].min() < 1 or poly[:, 0].max() > width - 1 or poly[:, 1].max() > height - 1:
      continue
    # pixels whose centres lie in the box
    dx, dy = x + 0.5 - rbox[0], y + 0.5 - rbox[1]
    u = dx * np.cos(rbox[4]) + dy * np.sin(rbox[4])
    v = -dx * np.sin(rbox[4]) + dy * np.cos(rbox[4])
    inside = (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)
    hue = 2 * np.pi * label / num_classes
    image[inside] = 127 + 110 * np.array([np.cos(hue), np.cos(hue + 2.1), np.cos(hue + 4.2)])
    polygons.append(np.round(poly, 1))
    labels.append(label)
  return (np.clip(image, 0, 255).astype(np.uint8), np.asarray(polygons, np.float64).reshape(-1, 4, 2),
          np.asarray(labels, np.int64))


def write_dota(out: str, classes=None, per_split=(("train", 6), ("val", 3), ("test", 2)), size=(200, 280),
               seed: int = 0, objects: int = 8) -> str:
  """A DOTA release under `<out>/DOTA` (module docstring), images of size (height, width); class
  names from `classes` (default DOTA-v1.0's, all used); every third image's gsd is 'null' and one
  object in five is difficult. Returns the release folder."""
  from data_pipelines.downstream.detection_releases import DOTA_V1_CLASSES  # noqa: PLC0415
  classes = tuple(classes or DOTA_V1_CLASSES)
  rng = np.random.default_rng(seed)
  top, n = os.path.join(out, "DOTA"), 0
  for split, count in per_split:
    os.makedirs(os.path.join(top, split, "images"), exist_ok=True)
    if split != "test":
      os.makedirs(os.path.join(top, split, "labelTxt"), exist_ok=True)
    for _ in range(count):
      image, polys, labels = detection_scene(rng, size[1], size[0], len(classes), objects)
      stem = f"P{n:04d}"
      Image.fromarray(image).save(os.path.join(top, split, "images", stem + ".png"))
      if split != "test":
        lines = ["imagesource:GoogleEarth", "gsd:null" if n % 3 == 0 else f"gsd:{0.1 + 0.01 * n:.6f}"]
        for i, (p, c) in enumerate(zip(polys, labels)):
          lines.append(" ".join(f"{v:.1f}" for v in p.reshape(-1)) + f" {classes[c]} {int(i % 5 == 4)}")
        with open(os.path.join(top, split, "labelTxt", stem + ".txt"), "w") as f:
          f.write("\n".join(lines) + "\n")
      n += 1
  return top


def write_fair1m(out: str, per_split=(("train", 4), ("validation", 2), ("test", 1)), size=(300, 420),
                 seed: int = 0, objects: int = 10, classes: int = 0) -> str:
  """A FAIR1M-2.0 release under `<out>/FAIR1M2.0` (module docstring): train in part1/ and part2/,
  .tif images of size (height, width), the first `classes` classes (0: all 37, names with
  spaces). Returns the release folder."""
  from data_pipelines.downstream.detection_releases import FAIR1M_CLASSES  # noqa: PLC0415
  names = FAIR1M_CLASSES[:classes] if classes else FAIR1M_CLASSES
  rng = np.random.default_rng(seed)
  top, n = os.path.join(out, "FAIR1M2.0"), 0
  for split, count in per_split:
    for i in range(count):
      part = f"part{1 + i % 2}" if split == "train" else ""
      base = os.path.join(top, split, part)
      os.makedirs(os.path.join(base, "images"), exist_ok=True)
      image, polys, labels = detection_scene(rng, size[1], size[0], len(names), objects)
      tifffile.imwrite(os.path.join(base, "images", f"{n}.tif"), image)
      if split != "test":
        os.makedirs(os.path.join(base, "labelXml"), exist_ok=True)
        objs = "".join(
            "    <object>\n      <coordinate>pixel</coordinate>\n      <type>rectangle</type>\n"
            "      <description>None</description>\n"
            f"      <possibleresult>\n        <name>{names[c]}</name>\n      </possibleresult>\n"
            "      <points>\n" + "".join(f"        <point>{x:.6f},{y:.6f}</point>\n" for x, y in [*p, p[0]])
            + "      </points>\n    </object>\n" for p, c in zip(polys, labels))
        with open(os.path.join(base, "labelXml", f"{n}.xml"), "w") as f:
          f.write(f"<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<annotation>\n  <source>\n"
                  f"    <filename>{n}.tif</filename>\n    <origin>GF2/GF3</origin>\n  </source>\n"
                  f"  <research>\n    <version>1.0</version>\n    <provider>FAIR1M</provider>\n  </research>\n"
                  f"  <size>\n    <width>{size[1]}</width>\n    <height>{size[0]}</height>\n    <depth>3</depth>\n"
                  f"  </size>\n  <objects>\n{objs}  </objects>\n</annotation>\n")
      n += 1
  return top


def write_xview(out: str, images: int = 6, size=(500, 700), seed: int = 0, objects: int = 12) -> str:
  """An xView release under `<out>/xView` (module docstring): `train_images/<n>.tif` and
  `xView_train.geojson` (each object's enclosing integer box, its type id, and bogus geographic
  coordinates), plus one object of type 75 (not one of the 60 classes), one with malformed
  bounds, and an image listed in the geojson but missing. Returns the release folder."""
  from data_pipelines.downstream.detection_releases import XVIEW_TYPES  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  top = os.path.join(out, "xView")
  os.makedirs(os.path.join(top, "train_images"), exist_ok=True)
  features = []
  for n in range(images):
    image, polys, labels = detection_scene(rng, size[1], size[0], len(XVIEW_TYPES), objects, sides=(12, 40))
    image_id = f"{100 + n}.tif"
    tifffile.imwrite(os.path.join(top, "train_images", image_id), image)
    for p, c in zip(polys, labels):
      x1, y1 = np.floor(p.min(0)).astype(int)
      x2, y2 = np.ceil(p.max(0)).astype(int)
      features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [0, 1], [1, 1], [0, 0]]]},
                       "properties": {"bounds_imcoords": f"{x1},{y1},{x2},{y2}", "type_id": XVIEW_TYPES[c][0],
                                      "image_id": image_id, "feature_id": len(features)}})
  features.append({"type": "Feature", "geometry": None,
                   "properties": {"bounds_imcoords": "10,10,40,40", "type_id": 75, "image_id": "100.tif"}})
  features.append({"type": "Feature", "geometry": None,
                   "properties": {"bounds_imcoords": "10,10,40", "type_id": 73, "image_id": "100.tif"}})
  features.append({"type": "Feature", "geometry": None,
                   "properties": {"bounds_imcoords": "1,1,9,9", "type_id": 73, "image_id": "1395.tif"}})
  with open(os.path.join(top, "xView_train.geojson"), "w") as f:
    json.dump({"type": "FeatureCollection", "features": features}, f)
  return top


def write_dior_r(out: str, classes: int = 0, per_split=(("train", 6), ("val", 2), ("test", 4)), size: int = 128,
                 seed: int = 0, objects: int = 6) -> str:
  """A DIOR / DIOR-R release under `<out>/DIOR` (module docstring): JPEGs of size x size, the
  first `classes` DIOR classes (0: all 20), each object's rotated box and its enclosing
  horizontal box in the two annotation folders. Returns the release folder."""
  from data_pipelines.downstream.detection_releases import DIOR_CLASSES, DIOR_CORNERS  # noqa: PLC0415
  names = DIOR_CLASSES[:classes] if classes else DIOR_CLASSES
  rng = np.random.default_rng(seed)
  top = os.path.join(out, "DIOR")
  notes = os.path.join(top, "Annotations", "Oriented Bounding Boxes")
  hnotes = os.path.join(top, "Annotations", "Horizontal Bounding Boxes")
  for folder in (notes, hnotes, os.path.join(top, "ImageSets", "Main"), os.path.join(top, "JPEGImages-trainval"),
                 os.path.join(top, "JPEGImages-test")):
    os.makedirs(folder, exist_ok=True)
  n = 1
  for split, count in per_split:
    stems = []
    for _ in range(count):
      image, polys, labels = detection_scene(rng, size, size, len(names), objects, sides=(14, 36))
      stem = f"{n:05d}"
      folder = "JPEGImages-test" if split == "test" else "JPEGImages-trainval"
      Image.fromarray(image).save(os.path.join(top, folder, stem + ".jpg"), quality=95)
      objs, hobjs = [], []
      for p, c in zip(polys, labels):
        corners = "".join(f"<x_{k}>{p[i, 0]:.1f}</x_{k}><y_{k}>{p[i, 1]:.1f}</y_{k}>" for i, k in enumerate(DIOR_CORNERS))
        # the release spells some classes in mixed case (Expressway-Service-area)
        name = names[c].title() if names[c].startswith("expressway") else names[c]
        objs.append(f"  <object>\n    <name>{name}</name>\n    <pose>Unspecified</pose>\n"
                    f"    <truncated>0</truncated>\n    <difficult>0</difficult>\n"
                    f"    <robndbox>{corners}</robndbox>\n    <angle>0</angle>\n  </object>\n")
        (x1, y1), (x2, y2) = np.floor(p.min(0)), np.ceil(p.max(0))
        hobjs.append(f"  <object>\n    <name>{name}</name>\n    <pose>Unspecified</pose>\n"
                     f"    <truncated>0</truncated>\n    <difficult>0</difficult>\n    <bndbox>\n"
                     f"      <xmin>{int(x1)}</xmin>\n      <ymin>{int(y1)}</ymin>\n      <xmax>{int(x2)}</xmax>\n"
                     f"      <ymax>{int(y2)}</ymax>\n    </bndbox>\n  </object>\n")
      for folder, these in ((notes, objs), (hnotes, hobjs)):
        with open(os.path.join(folder, stem + ".xml"), "w") as f:
          f.write(f"<annotation>\n  <filename>{stem}.jpg</filename>\n  <source><database>DIOR</database></source>\n"
                  f"  <size><width>{size}</width><height>{size}</height><depth>3</depth></size>\n"
                  f"{''.join(these)}</annotation>\n")
      stems.append(stem)
      n += 1
    with open(os.path.join(top, "ImageSets", "Main", f"{split}.txt"), "w") as f:
      f.write("\n".join(stems) + "\n")
  return top


def main(argv=None):
  parser = cli.parser(__file__, __doc__)
  datasets = sorted([*RELEASES, "spacenet1", "loveda", "oscd", "dota", "dior_r", "fair1m", "xview"])
  parser.add_argument("dataset", choices=datasets, metavar="DATASET", help=f"the release: {', '.join(datasets)}")
  parser.add_argument("--out", required=True, help="folder to write the release into")
  parser.add_argument("--per-class", type=int, default=12, help="scene releases: images per class")
  parser.add_argument("--images", type=int, default=12, help="spacenet1: tiles; loveda: per domain and split")
  parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
  parser.add_argument("--size", type=int, default=96, help="loveda: image side, px")
  parser.add_argument("--style", choices=("blobs", "objects"), default="blobs",
                      help="loveda: colour blocks, or the SAMRS sample's objects")
  args = parser.parse_args(argv)
  if args.dataset == "spacenet1":
    print(f"wrote {write_spacenet1(args.out, args.images, args.seed)}")
  elif args.dataset == "loveda":
    print(f"wrote {write_loveda(args.out, args.images, args.seed, args.size, args.style)}")
  elif args.dataset == "oscd":
    print(f"wrote {write_oscd(args.out, seed=args.seed)}")
  elif args.dataset == "dota":
    print(f"wrote {write_dota(args.out, seed=args.seed)}")
  elif args.dataset == "xview":
    print(f"wrote {write_xview(args.out, seed=args.seed)}")
  elif args.dataset == "fair1m":
    print(f"wrote {write_fair1m(args.out, seed=args.seed)}")
  elif args.dataset == "dior_r":
    print(f"wrote {write_dior_r(args.out, seed=args.seed)}")
  else:
    print(f"wrote {write_scene_release(args.dataset, args.out, args.per_class, args.seed)}")


if __name__ == "__main__":
  main()
