"""Rotated-detection releases of MTP's finetuning (MTP_SPEC §5.2), read in their native layouts.

    DOTA-v1.0 / v2.0:  <root>/{train,val}/images/P<n>.png + <root>/{train,val}/labelTxt/P<n>.txt,
                       <root>/test/images/ (no labels); the label archives unpack into labelTxt/.
                       A label file: optional header lines `imagesource:<source>` and
                       `gsd:<metres per pixel or null>`, then one object per line
                       `x1 y1 x2 y2 x3 y3 x4 y4 <class> <difficult 0/1>`. 15 / 18 classes.
                       Every image is cut into 1024-px patches (downstream/dota_split.py): v1.0
                       multi-scale (rates 0.5, 1.0, 1.5, gap 500: MTP's split_ms_dotav1), v2.0
                       single-scale (gap 200: split_ss_dotav2); `--dota-split ss|ms` chooses.
    FAIR1M-2.0:        <root>/train/[part<k>/]images/<n>.tif + labelXml/<n>.xml, <root>/validation/
                       {images,labelXml}/, <root>/test/images/. A label file: `<objects><object>
                       <possibleresult><name>Small Car</name></possibleresult><points><point>x,y
                       </point> x 5 (the first repeated)</points>`. 37 classes, their names with
                       spaces (the submission's spelling). Images are cut into 800-px patches every
                       600 px (MTP's fair1m20_clip at 800; the clip step is not in MTP's code, so
                       the 200-px overlap is ours, mmrotate's single-scale gap).
    DIOR-R:            <root>/JPEGImages-trainval/<n>.jpg, <root>/JPEGImages-test/<n>.jpg,
                       <root>/Annotations/Oriented Bounding Boxes/<n>.xml (`<object><name>`,
                       `<difficult>`, `<robndbox><x_left_top>...<y_left_bottom>`), and
                       <root>/ImageSets/Main/{train,val,test}.txt. 800 x 800, 20 classes.
    Xview:             <root>/train_images/<n>.tif + <root>/xView_train.geojson (features with
                       `image_id`, `type_id` and `bounds_imcoords` "x1,y1,x2,y2"), the 60 classes
                       of xView's list (type ids 11-94; other ids, e.g. 75 and 82, are dropped).
                       MTP's prepare_xview_dataset.py, step by step (XviewRelease): boxes clipped
                       to the image; a seeded split of the labelled images (700 of the 846 for
                       training, MTP's count; MTP's shuffle is unseeded); images smaller than 416
                       px padded with 128; 416-px patches at np.linspace positions (no overlap
                       beyond what the spread needs); a patch holds the boxes whose centre lies in
                       it, clipped to it (x2 to the patch's last pixel index, x2 = end - 1, as the
                       script does: Deliberate); patches without boxes are not written, in every
                       split (the script's); patch ids <n>_<k>, k counting the patches that hold
                       a box centre; boxes under 1 px after the clip are dropped (mmdet's
                       CocoDataset drops them when it loads the script's files).
    DIOR:              the same images and lists, <root>/Annotations/Horizontal Bounding Boxes/
                       <n>.xml (`<bndbox><xmin><ymin><xmax><ymax>`), for horizontal detection
                       (the `hd` task; its boxes are written as their 4 corners).
Splits: DOTA train -> train, val -> valid, test -> test; FAIR1M train (all parts) -> train,
validation -> valid, test -> test (MTP trains on train + val and scores test online; here val is
held out to measure). DIOR and DIOR-R train + val -> train (MTP's trainval), test -> test, the
split MTP reports.
Objects: a polygon that is not finite, has fewer than 3 distinct corners or no area, an unknown
class, or lies wholly outside the image is named and dropped (the image is kept); `--strict`
refuses the image instead. Patches of the training split without objects are not written
(mmrotate's filter_empty_gt); every patch of the other splits is. The first patch of each image
carries the image's whole annotation, which the writer keeps in the split's sources.json for
scoring merged detections (mtp_jax/metrics/patch_merge.py).
"""

import copy
import dataclasses
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image

from data_pipelines.downstream import dota_split
from data_pipelines.downstream.scene_folders import BadSample
from data_pipelines.downstream.schema import DownstreamRecord, encode_png
from data_pipelines.samrs.classes import FAST_CLASSES, SIOR_CLASSES

DOTA_V1_CLASSES = ("plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle",
                   "large-vehicle", "ship", "tennis-court", "basketball-court", "storage-tank",
                   "soccer-ball-field", "roundabout", "harbor", "swimming-pool", "helicopter")
DOTA_V2_CLASSES = DOTA_V1_CLASSES + ("container-crane", "airport", "helipad")
# FAIR1M-2.0's 37 classes as its XML spells them ('Small Car'), in the SAMRS FAST subset's order.
FAIR1M_CLASSES = tuple(c if c.startswith("other-") else c.replace("-", " ") for c in FAST_CLASSES)
DIOR_CLASSES = SIOR_CLASSES   # mmrotate's DIORDataset order (the SAMRS SIOR subset's)
DIOR_CORNERS = ("left_top", "right_top", "right_bottom", "left_bottom")

Image.MAX_IMAGE_PIXELS = None   # DOTA-v2.0 holds 20,000 x 20,000 px scenes


def _open_rgb(path: str, relative: str):
  if not os.path.isfile(path):
    raise BadSample(f"{relative}: the image is missing")
  try:
    with open(path, "rb") as f:
      data = f.read()
    import io  # noqa: PLC0415
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  except Exception as e:  # noqa: BLE001 (any unreadable image)
    raise BadSample(f"{relative}: the image is unreadable ({type(e).__name__}: {e})") from None
  return data, image


def check_objects(polygons, names, classes, width: int, height: int, where: str):
  """(kept indices, labels of the kept, [(where, reason)] of the dropped) (module docstring)."""
  keep, labels, dropped = [], [], []
  index = {c: i for i, c in enumerate(classes)}
  for i, (poly, name) in enumerate(zip(polygons, names)):
    what = f"{where} object {i + 1} ({name})"
    reason = None
    if name not in index:
      reason = f"class {name!r} is not one of the {len(classes)} classes"
    elif not np.isfinite(poly).all():
      reason = "its polygon holds NaN or inf"
    elif len({tuple(p) for p in np.round(poly, 6).tolist()}) < 3:
      reason = "its polygon has fewer than 3 distinct corners"
    else:
      x, y = poly[:, 0], poly[:, 1]
      if abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2 <= 0:
        reason = "its polygon has no area"
      elif x.max() <= 0 or y.max() <= 0 or x.min() >= width or y.min() >= height:
        reason = f"it lies outside the {width}x{height} image"
    if reason:
      dropped.append((what, reason))
    else:
      keep.append(i)
      labels.append(index[name])
  return np.asarray(keep, np.int64), np.asarray(labels, np.int32), dropped


class _DetectionRelease:
  """What the detection releases share: records of whole images or of their patches."""

  name = ""
  classes = ()
  bands, pixel_dtype = 3, "uint8"
  split = None   # a dota_split.SplitConfig: images cut into patches; None: whole images

  def with_split(self, kind: str | None = None, size: int = 0, gap: int = 0):
    """This release cut with mmrotate's 'ss' or 'ms' split (None: its own), patches of `size`
    px overlapping by `gap` px at rate 1 (0: the split's)."""
    if self.split is None:
      raise ValueError(f"{self.name} images are not cut into patches")
    split = {"ss": dota_split.SPLIT_SS, "ms": dota_split.SPLIT_MS, None: self.split}[kind]
    if size or gap:
      size, gap = size or split.sizes[0], gap or split.gaps[0]
      if gap >= size:
        raise ValueError(f"--patch-gap {gap} must be smaller than --patch-size {size}")
      split = dataclasses.replace(split, sizes=(size,), gaps=(gap,))
    out = copy.copy(self)
    out.split = split
    return out

  def _records(self, relative, data, image, polygons, labels, difficult, meta: dict, dropped, train: bool):
    h, w = image.shape[:2]
    source_id = os.path.splitext(os.path.basename(relative))[0]
    meta_text = json.dumps(meta, sort_keys=True)
    if self.split is None:
      if train and not len(labels):
        raise BadSample(f"{relative}: no object to learn from (mmrotate's filter_empty_gt)")
      return DownstreamRecord(image_bytes=data, height=h, width=w, channels=3, filename=relative,
                              dataset=self.name, polygons=polygons.astype(np.float32), object_labels=labels,
                              difficult=difficult, meta=meta_text, dropped=dropped)
    windows = dota_split.sliding_windows(w, h, self.split)
    per_window = dota_split.split_objects(polygons, labels, difficult, windows, self.split.iof_thr)
    records = []
    for window, (keep, shifted, flags) in zip(windows, per_window):
      if train and not len(keep):
        continue
      patch = dota_split.crop_window(image, window)
      pid = dota_split.patch_id(source_id, window)
      records.append(DownstreamRecord(
          image_bytes=encode_png(patch), height=patch.shape[0], width=patch.shape[1], channels=3,
          filename=f"{os.path.dirname(relative)}/{pid}.png", dataset=self.name,
          polygons=shifted.astype(np.float32), object_labels=labels[keep], difficult=flags.astype(np.int32),
          meta=meta_text, patch_source=source_id, patch_x=int(window[0]), patch_y=int(window[1]),
          patch_size=int(window[2] - window[0])))
    if not records:   # a training image whose objects no window holds: nothing to learn from
      raise BadSample(f"{relative}: no patch holds an object ({len(labels)} objects, IoF < "
                      f"{self.split.iof_thr} in every window)")
    records[0].dropped = dropped
    records[0].source_annotation = {
        "id": source_id, "width": int(w), "height": int(h), "polygons": polygons.reshape(-1, 8).tolist(),
        "labels": labels.tolist(), "difficult": np.asarray(difficult).tolist(), "meta": meta}
    return records


# ----------------------------------------------------------------------------------------------
# DOTA
# ----------------------------------------------------------------------------------------------
def parse_dota_labels(path: str):
  """A DOTA labelTxt file -> (polygons (N, 4, 2) float64, class names, difficult (N,) int,
  header {"imagesource": str, "gsd": float or None}); BadSample naming the line of a malformed one."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise BadSample(f"cannot read {path} ({e})") from None
  header, polygons, names, difficult = {}, [], [], []
  for n, line in enumerate(lines, 1):
    text = line.strip()
    if not text:
      continue
    key, sep, value = text.partition(":")
    if sep and key in ("imagesource", "gsd") and " " not in key:
      if key == "gsd":
        try:
          header["gsd"] = float(value)
        except ValueError:
          header["gsd"] = None   # 'null' / 'None' in the release
      else:
        header["imagesource"] = value.strip()
      continue
    parts = text.split()
    if len(parts) not in (9, 10):
      raise BadSample(f"{path} line {n}: expected 8 coordinates, a class and a difficult flag, "
                      f"got {len(parts)} fields")
    try:
      coords = [float(v) for v in parts[:8]]
      flag = int(parts[9]) if len(parts) == 10 else 0
    except ValueError:
      raise BadSample(f"{path} line {n}: a coordinate or the difficult flag is not a number") from None
    polygons.append(np.asarray(coords, np.float64).reshape(4, 2))
    names.append(parts[8])
    difficult.append(flag)
  return (np.asarray(polygons, np.float64).reshape(-1, 4, 2), names,
          np.asarray(difficult, np.int32), header)


class DotaRelease(_DetectionRelease):
  """DOTA-v1.0 or v2.0 (module docstring)."""

  release_splits = {"train": "train", "valid": "val", "test": "test"}

  def __init__(self, name: str, classes: tuple, split: dota_split.SplitConfig):
    self.name, self.classes, self.split = name, classes, split

  def _root(self, root):
    for candidate in (root, os.path.join(root, "DOTA")):
      if os.path.isdir(os.path.join(candidate, "train", "images")):
        return candidate
    raise BadSample(f"{root!r} holds no {self.name} release: expected train/images/ and "
                    "train/labelTxt/ (and val/, test/)")

  def splits(self, root, seed: int = 0):
    del seed   # the release's own splits
    top = self._root(root)
    out, foreign = {}, []
    for split, folder in self.release_splits.items():
      images = os.path.join(top, folder, "images")
      if not os.path.isdir(images):
        continue
      labelled = split != "test"
      if labelled and not os.path.isdir(os.path.join(top, folder, "labelTxt")):
        raise BadSample(f"{top}/{folder} has images/ but no labelTxt/ (unpack the label archive there)")
      out[split] = []
      for file in sorted(os.listdir(images)):
        if not file.lower().endswith((".png", ".jpg", ".tif")):
          foreign.append((f"{folder}/images/{file}", "not a .png image"))
          continue
        out[split].append((f"{folder}/images/{file}", -1))
    return out, foreign

  def read(self, root, relative, _label=-1):
    top = self._root(root)
    folder = relative.split("/")[0]
    data, image = _open_rgb(os.path.join(top, relative), relative)
    h, w = image.shape[:2]
    stem = os.path.splitext(os.path.basename(relative))[0]
    if folder == self.release_splits["test"]:
      polygons, names, difficult, header = np.zeros((0, 4, 2)), [], np.zeros((0,), np.int32), {}
    else:
      path = os.path.join(top, folder, "labelTxt", stem + ".txt")
      if not os.path.isfile(path):
        raise BadSample(f"{relative}: its label file {folder}/labelTxt/{stem}.txt is missing")
      polygons, names, difficult, header = parse_dota_labels(path)
    keep, labels, dropped = check_objects(polygons, names, self.classes, w, h, f"{folder}/labelTxt/{stem}.txt")
    return self._records(relative, data, image, polygons[keep], labels, difficult[keep], header,
                         dropped, train=folder == self.release_splits["train"])


DOTA_V1 = DotaRelease("dota_v1", DOTA_V1_CLASSES, dota_split.SPLIT_MS)
DOTA_V2 = DotaRelease("dota_v2", DOTA_V2_CLASSES, dota_split.SPLIT_SS)


# ----------------------------------------------------------------------------------------------
# FAIR1M-2.0
# ----------------------------------------------------------------------------------------------
def parse_fair1m_xml(path: str):
  """A FAIR1M label XML -> (polygons (N, 4, 2) float64, class names, difficult (N,) zeros,
  header {"filename", "origin"}); the closing fifth point is dropped. BadSample naming the
  object of a malformed one."""
  try:
    root = ET.parse(path).getroot()
  except (OSError, ET.ParseError) as e:
    raise BadSample(f"cannot parse {path} ({e})") from None
  polygons, names = [], []
  for n, obj in enumerate(root.iter("object"), 1):
    name = (obj.findtext("possibleresult/name") or "").strip()
    try:
      points = [[float(v) for v in p.text.split(",")] for p in obj.iter("point")]
    except (AttributeError, ValueError):
      raise BadSample(f"{path} object {n} ({name}): a <point> that is not 'x,y'") from None
    if len(points) == 5 and points[4] == points[0]:
      points = points[:4]
    if len(points) != 4 or any(len(p) != 2 for p in points):
      raise BadSample(f"{path} object {n} ({name}): {len(points)} points, expected 4 (and the closing 5th)")
    polygons.append(points)
    names.append(name)
  header = {"filename": (root.findtext("source/filename") or "").strip(),
            "origin": (root.findtext("source/origin") or "").strip()}
  return np.asarray(polygons, np.float64).reshape(-1, 4, 2), names, np.zeros(len(names), np.int32), header


class Fair1mRelease(_DetectionRelease):
  """FAIR1M-2.0 (module docstring), cut into 800-px patches."""

  name, classes = "fair1m", FAIR1M_CLASSES
  split = dota_split.SplitConfig(sizes=(800,), gaps=(200,))
  release_splits = {"train": "train", "valid": "validation", "test": "test"}

  def _root(self, root):
    for candidate in (root, os.path.join(root, "FAIR1M2.0"), os.path.join(root, "FAIR1M")):
      if os.path.isdir(os.path.join(candidate, "train")) or os.path.isdir(os.path.join(candidate, "validation")):
        return candidate
    raise BadSample(f"{root!r} holds no FAIR1M-2.0 release: expected train/[part<k>/]images/ with "
                    "labelXml/ beside it (and validation/, test/)")

  def splits(self, root, seed: int = 0):
    del seed
    top = self._root(root)
    out, foreign = {}, []
    for split, folder in self.release_splits.items():
      base = os.path.join(top, folder)
      if not os.path.isdir(base):
        continue
      parts = [""] if os.path.isdir(os.path.join(base, "images")) else sorted(
          p for p in os.listdir(base) if os.path.isdir(os.path.join(base, p, "images")))
      out[split] = []
      for part in parts:
        rel = "/".join(x for x in (folder, part, "images") if x)
        if split != "test" and not os.path.isdir(os.path.join(top, rel[:-len("images")], "labelXml")):
          raise BadSample(f"{top}/{rel} has no labelXml/ beside it")
        for file in sorted(os.listdir(os.path.join(top, rel))):
          if not file.lower().endswith((".tif", ".tiff", ".png", ".jpg")):
            foreign.append((f"{rel}/{file}", "not a .tif image"))
            continue
          out[split].append((f"{rel}/{file}", -1))
    return out, foreign

  def read(self, root, relative, _label=-1):
    top = self._root(root)
    data, image = _open_rgb(os.path.join(top, relative), relative)
    h, w = image.shape[:2]
    stem = os.path.splitext(os.path.basename(relative))[0]
    labels_dir = os.path.join(os.path.dirname(os.path.dirname(relative)), "labelXml")
    test = relative.split("/")[0] == self.release_splits["test"]
    if test:
      polygons, names, difficult, header = np.zeros((0, 4, 2)), [], np.zeros((0,), np.int32), {}
    else:
      path = os.path.join(top, labels_dir, stem + ".xml")
      if not os.path.isfile(path):
        raise BadSample(f"{relative}: its label file {labels_dir}/{stem}.xml is missing")
      polygons, names, difficult, header = parse_fair1m_xml(path)
    keep, labels, dropped = check_objects(polygons, names, self.classes, w, h, f"{labels_dir}/{stem}.xml")
    return self._records(relative, data, image, polygons[keep], labels, difficult[keep], header, dropped,
                         train=relative.split("/")[0] == self.release_splits["train"])


FAIR1M = Fair1mRelease()


# ----------------------------------------------------------------------------------------------
# DIOR-R
# ----------------------------------------------------------------------------------------------
def parse_dior_xml(path: str):
  """A DIOR-R (or DIOR) VOC XML -> (polygons (N, 4, 2) float64, lower-case class names,
  difficult (N,) int, (width, height) from <size>); BadSample naming the object of a malformed one.
  rotated: read <robndbox> corners (DIOR-R); the horizontal <bndbox> is read as its 4 corners."""
  try:
    tree = ET.parse(path)
  except (OSError, ET.ParseError) as e:
    raise BadSample(f"cannot parse {path} ({e})") from None
  root = tree.getroot()
  polygons, names, difficult = [], [], []
  for n, obj in enumerate(root.iter("object"), 1):
    name = (obj.findtext("name") or "").strip().lower()
    rb, hb = obj.find("robndbox"), obj.find("bndbox")
    try:
      if rb is not None:
        corners = [[float(rb.findtext(f"x_{c}")), float(rb.findtext(f"y_{c}"))] for c in DIOR_CORNERS]
      elif hb is not None:
        x1, y1, x2, y2 = (float(hb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        corners = [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]
      else:
        raise BadSample(f"{path} object {n} ({name}): no <robndbox> or <bndbox>")
      flag = int((obj.findtext("difficult") or "0").strip())
    except (TypeError, ValueError):
      raise BadSample(f"{path} object {n} ({name}): a missing or non-numeric corner or difficult flag") from None
    polygons.append(corners)
    names.append(name)
    difficult.append(flag)
  size = root.find("size")
  try:
    wh = (int(size.findtext("width")), int(size.findtext("height"))) if size is not None else None
  except (TypeError, ValueError):
    wh = None
  return (np.asarray(polygons, np.float64).reshape(-1, 4, 2), names, np.asarray(difficult, np.int32), wh)


class DiorRelease(_DetectionRelease):
  """DIOR (horizontal boxes) or DIOR-R (rotated; module docstring): whole 800 x 800 images."""

  classes = DIOR_CLASSES
  release_splits = {"train": ("train", "val"), "test": ("test",)}

  def __init__(self, name: str, annotations: str):
    self.name, self.annotations = name, os.path.join("Annotations", annotations)

  def _root(self, root):
    for candidate in (root, os.path.join(root, "DIOR"), os.path.join(root, "DIOR-R")):
      if os.path.isdir(os.path.join(candidate, self.annotations)):
        return candidate
    raise BadSample(f"{root!r} holds no {self.name} release: expected '{self.annotations}/', "
                    "JPEGImages-trainval/, JPEGImages-test/ and ImageSets/Main/")

  def splits(self, root, seed: int = 0):
    del seed
    top = self._root(root)
    out, foreign = {}, []
    for split, lists in self.release_splits.items():
      out[split] = []
      for name in lists:
        path = os.path.join(top, "ImageSets", "Main", name + ".txt")
        if not os.path.isfile(path):
          raise BadSample(f"{top}: ImageSets/Main/{name}.txt is missing")
        with open(path) as f:
          stems = [s.strip() for s in f if s.strip()]
        folder = "JPEGImages-test" if name == "test" else "JPEGImages-trainval"
        out[split] += [(f"{folder}/{s}.jpg", -1) for s in stems]
    return out, foreign

  def read(self, root, relative, _label=-1):
    top = self._root(root)
    data, image = _open_rgb(os.path.join(top, relative), relative)
    h, w = image.shape[:2]
    stem = os.path.splitext(os.path.basename(relative))[0]
    path = os.path.join(top, self.annotations, stem + ".xml")
    if not os.path.isfile(path):
      raise BadSample(f"{relative}: its annotation {self.annotations}/{stem}.xml is missing")
    polygons, names, difficult, size = parse_dior_xml(path)
    if size is not None and size != (w, h):
      raise BadSample(f"{relative}: the XML says {size[0]}x{size[1]}, the image is {w}x{h}")
    keep, labels, dropped = check_objects(polygons, names, self.classes, w, h, f"{stem}.xml")
    return self._records(relative, data, image, polygons[keep], labels, difficult[keep], {}, dropped,
                         train=relative.startswith("JPEGImages-trainval"))


# ----------------------------------------------------------------------------------------------
# Xview
# ----------------------------------------------------------------------------------------------
# xView's 60 classes: type id -> name (xview_class_labels.txt); the class index is the position.
XVIEW_TYPES = (
    (11, "Fixed-wing Aircraft"), (12, "Small Aircraft"), (13, "Cargo Plane"), (15, "Helicopter"),
    (17, "Passenger Vehicle"), (18, "Small Car"), (19, "Bus"), (20, "Pickup Truck"), (21, "Utility Truck"),
    (23, "Truck"), (24, "Cargo Truck"), (25, "Truck w/Box"), (26, "Truck Tractor"), (27, "Trailer"),
    (28, "Truck w/Flatbed"), (29, "Truck w/Liquid"), (32, "Crane Truck"), (33, "Railway Vehicle"),
    (34, "Passenger Car"), (35, "Cargo Car"), (36, "Flat Car"), (37, "Tank car"), (38, "Locomotive"),
    (40, "Maritime Vessel"), (41, "Motorboat"), (42, "Sailboat"), (44, "Tugboat"), (45, "Barge"),
    (47, "Fishing Vessel"), (49, "Ferry"), (50, "Yacht"), (51, "Container Ship"), (52, "Oil Tanker"),
    (53, "Engineering Vehicle"), (54, "Tower crane"), (55, "Container Crane"), (56, "Reach Stacker"),
    (57, "Straddle Carrier"), (59, "Mobile Crane"), (60, "Dump Truck"), (61, "Haul Truck"),
    (62, "Scraper/Tractor"), (63, "Front loader/Bulldozer"), (64, "Excavator"), (65, "Cement Mixer"),
    (66, "Ground Grader"), (71, "Hut/Tent"), (72, "Shed"), (73, "Building"), (74, "Aircraft Hangar"),
    (76, "Damaged Building"), (77, "Facility"), (79, "Construction Site"), (83, "Vehicle Lot"),
    (84, "Helipad"), (86, "Storage Tank"), (89, "Shipping container lot"), (91, "Shipping Container"),
    (93, "Pylon"), (94, "Tower"))
XVIEW_CLASSES = tuple(name for _, name in XVIEW_TYPES)


def parse_xview_geojson(path: str) -> dict:
  """xView_train.geojson -> {image id ('<n>.tif'): [(feature index, bounds_imcoords text, type_id)]}
  in file order; BadSample for a file that is not a FeatureCollection."""
  try:
    with open(path) as f:
      collection = json.load(f)
    features = collection["features"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise BadSample(f"cannot read {path} as a GeoJSON FeatureCollection ({type(e).__name__}: {e})") from None
  out = {}
  for n, feature in enumerate(features):
    p = feature.get("properties") or {}
    if p.get("bounds_imcoords") and p.get("image_id"):
      out.setdefault(p["image_id"], []).append((n, str(p["bounds_imcoords"]), p.get("type_id")))
  return out


def xview_boxes(objects, width: int, height: int, where: str):
  """[(feature index, bounds text, type_id)] -> (boxes (N, 4) float64 clipped to the image,
  labels (N,), [(where, reason)] of the dropped: a type id outside the 60 classes, bounds that
  are not 4 integers, or a box that clipping leaves empty)."""
  index = {t: i for i, (t, _) in enumerate(XVIEW_TYPES)}
  boxes, labels, dropped = [], [], []
  for n, bounds, type_id in objects:
    what = f"{where} feature {n} (type_id {type_id})"
    try:
      box = [int(v) for v in bounds.split(",")]
    except ValueError:
      dropped.append((what, f"bounds_imcoords {bounds!r} are not integers"))
      continue
    if len(box) != 4:
      dropped.append((what, f"bounds_imcoords {bounds!r} do not hold 4 numbers"))
    elif type_id not in index:
      dropped.append((what, f"type_id {type_id} is not one of xView's 60 classes"))
    else:
      x1, x2 = np.clip([box[0], box[2]], 0, width)
      y1, y2 = np.clip([box[1], box[3]], 0, height)
      if x2 <= x1 or y2 <= y1:
        dropped.append((what, f"the box {box} is empty inside the {width}x{height} image"))
        continue
      boxes.append([x1, y1, x2, y2])
      labels.append(index[type_id])
  return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels, np.int32), dropped


def xview_patches(image: np.ndarray, boxes: np.ndarray, size: int = 416, fill: int = 128):
  """MTP's 416-px patches of one image (module docstring): [(x, y, patch pixels, indices of its
  boxes, the boxes in patch pixels)] for the patches that hold a box centre, in row order."""
  h, w = image.shape[:2]
  if h < size or w < size:
    padded = np.full((max(h, size), max(w, size), image.shape[2]), fill, image.dtype)
    padded[:h, :w] = image
    image = padded
  h, w = image.shape[:2]
  y_end, x_end = h - size, w - size
  xs = np.linspace(0, x_end, int(np.ceil(x_end / size)) + 1, endpoint=True).astype(int)
  ys = np.linspace(0, y_end, int(np.ceil(y_end / size)) + 1, endpoint=True).astype(int)
  cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
  out = []
  for y in ys:
    for x in xs:
      inside = np.flatnonzero((cx >= x) & (cx < x + size) & (cy >= y) & (cy < y + size))
      if not len(inside):
        continue
      b = boxes[inside].copy()
      b[:, 0], b[:, 1] = np.maximum(b[:, 0], x), np.maximum(b[:, 1], y)
      b[:, 2] = np.where(b[:, 2] >= x + size, x + size - 1, b[:, 2])   # the script's end - 1
      b[:, 3] = np.where(b[:, 3] >= y + size, y + size - 1, b[:, 3])
      out.append((int(x), int(y), image[y:y + size, x:x + size], inside, b - [x, y, x, y]))
  return out


class XviewRelease(_DetectionRelease):
  """xView (module docstring): 416-px patches of the labelled training images."""

  name, classes = "xview", XVIEW_CLASSES
  patch = 416
  train_images, labelled_images = 700, 846   # MTP's split of the 846 labelled images

  def __init__(self):
    self._index = {}   # geojson path -> parsed index (the file is ~500 MB: read once)

  def _root(self, root):
    for candidate in (root, os.path.join(root, "xView"), os.path.join(root, "Xview-dataset")):
      if os.path.isfile(os.path.join(candidate, "xView_train.geojson")):
        return candidate
    raise BadSample(f"{root!r} holds no xView release: expected xView_train.geojson and train_images/")

  def _objects(self, top):
    path = os.path.join(top, "xView_train.geojson")
    if path not in self._index:
      self._index[path] = parse_xview_geojson(path)
    return self._index[path]

  def splits(self, root, seed: int = 0):
    top = self._root(root)
    objects = self._objects(top)
    folder = os.path.join(top, "train_images")
    files = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    foreign = [(f"train_images/{i}", "listed in xView_train.geojson but missing") for i in sorted(objects)
               if i not in files]
    foreign += [(f"train_images/{f}", "no box of it in xView_train.geojson") for f in sorted(files)
                if f not in objects]
    items = sorted(i for i in objects if i in files)
    order = np.random.default_rng(seed).permutation(len(items))
    n_train = int(round(len(items) * self.train_images / self.labelled_images))
    picked = [f"train_images/{items[i]}" for i in order]
    return {"train": [(p, -1) for p in sorted(picked[:n_train])],
            "valid": [(p, -1) for p in sorted(picked[n_train:])]}, foreign

  def read(self, root, relative, _label=-1):
    top = self._root(root)
    data, image = _open_rgb(os.path.join(top, relative), relative)
    h, w = image.shape[:2]
    image_id = os.path.basename(relative)
    stem = os.path.splitext(image_id)[0]
    boxes, labels, dropped = xview_boxes(self._objects(top).get(image_id, []), w, h, f"xView_train.geojson {image_id}")
    records = []
    for k, (x, y, pixels, inside, patch_boxes) in enumerate(xview_patches(image, boxes, self.patch)):
      # mmdet's CocoDataset drops boxes under 1 px when it loads MTP's files; a patch left empty
      # is not written (ours: the script wrote it, mmdet filtered it from training)
      wide = ((patch_boxes[:, 2] - patch_boxes[:, 0]) >= 1) & ((patch_boxes[:, 3] - patch_boxes[:, 1]) >= 1)
      dropped += [(f"{relative} patch {k} box {i}", "under 1 px after the patch's clip (mmdet's CocoDataset "
                   "drops it)") for i in np.flatnonzero(~wide)]
      inside, patch_boxes = inside[wide], patch_boxes[wide]
      if not len(inside):
        continue
      corners = np.stack([patch_boxes[:, [0, 1]], patch_boxes[:, [2, 1]], patch_boxes[:, [2, 3]],
                          patch_boxes[:, [0, 3]]], axis=1)
      records.append(DownstreamRecord(
          image_bytes=encode_png(pixels), height=self.patch, width=self.patch, channels=3,
          filename=f"train_images/{stem}_{k}.png", dataset=self.name,
          polygons=corners.astype(np.float32), object_labels=labels[inside],
          difficult=np.zeros(len(inside), np.int32), meta="{}", patch_source=stem, patch_x=x, patch_y=y,
          patch_size=self.patch))
    if not records:
      raise BadSample(f"{relative}: no usable box ({len(dropped)} dropped)")
    records[0].dropped = dropped
    return records


XVIEW = XviewRelease()
DIOR = DiorRelease("dior", "Horizontal Bounding Boxes")
DIOR_R = DiorRelease("dior_r", "Oriented Bounding Boxes")
