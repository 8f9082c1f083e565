"""Reads one image of a SAMRS release tree into a `schema.SamrsRecord` (MTP_SPEC §4).

Every problem with an image's files raises `BadSample(reason)`, so the converter can name the
file, skip it and count it. Layout problems (not a SAMRS tree at all) raise `DataError`.
"""

import io
import os
import pickle
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image

from data_pipelines.samrs import classes as samrs_classes
from data_pipelines.samrs.schema import SamrsRecord
from mtp_jax.errors import DataError
from mtp_jax.ops import boxes

DIOR_CORNERS = ("left_top", "right_top", "right_bottom", "left_bottom")
# PIL modes accepted for each role: RGB images may arrive as RGBA, grey or palette files (the
# reader converts them to RGB); semantic maps must be single-channel uint8.
ACCEPTED_MODES = {"RGB": ("RGB", "RGBA", "L", "P"), "L": ("L",)}


class BadSample(Exception):
  """One image whose files are unusable; the message is the reason."""


def subset_paths(root: str, layout: samrs_classes.SubsetLayout) -> dict[str, str]:
  base = os.path.join(root, layout.base)
  return {
      "base": base,
      "images": os.path.join(base, layout.images),
      "gray": os.path.join(base, layout.segs, "gray"),
      "ins": os.path.join(base, layout.segs, "ins"),
      "rotated": os.path.join(base, layout.rotated_dir),
  }


def check_layout(root: str, layout: samrs_classes.SubsetLayout, split: str) -> dict[str, str]:
  """Returns the subset's folders, or raises DataError naming what is missing."""
  paths = subset_paths(root, layout)
  paths["list"] = os.path.join(paths["base"], f"{split}.txt")
  missing = [p for p in paths.values() if not os.path.exists(p)]
  if paths["base"] in missing:
    missing = [paths["base"]]
  if missing:
    raise DataError(
        f"{root!r} is not a SAMRS tree for subset {layout.name!r}: missing {', '.join(missing)} "
        f"(expected layout: see data_pipelines/samrs/classes.py)")
  return paths


def read_split_list(path: str) -> list[str]:
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def _decode_image(data: bytes, what: str, mode: str) -> Image.Image:
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # PIL raises many types for broken files
    raise BadSample(f"{what} cannot be decoded ({type(e).__name__}: {e})") from None
  if img.mode not in ACCEPTED_MODES[mode]:
    raise BadSample(f"{what} has mode {img.mode}, expected {mode}")
  return img


def _read(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise BadSample(f"cannot read {path} ({e.strerror or e})") from None


def _dior_polygons(path: str) -> list[tuple[str, np.ndarray]]:
  try:
    tree = ET.parse(path)
  except (OSError, ET.ParseError) as e:
    raise BadSample(f"cannot parse {path} ({e})") from None
  out = []
  for obj in tree.getroot().iter("object"):
    rb = obj.find("robndbox")
    name = obj.findtext("name")
    if rb is None or name is None:
      raise BadSample(f"{path}: object without <name> or <robndbox>")
    try:
      corners = [[float(rb.findtext(f"x_{c}")), float(rb.findtext(f"y_{c}"))] for c in DIOR_CORNERS]
    except (TypeError, ValueError):
      raise BadSample(f"{path}: <robndbox> with a missing or non-numeric corner") from None
    out.append((name.strip(), np.asarray(corners, np.float64)))
  return out


def _check_polygon(poly, where):
  if not np.all(np.isfinite(poly)):
    raise BadSample(f"{where}: polygon holds NaN or inf")
  if len({tuple(p) for p in np.round(poly, 6).tolist()}) < 3:
    raise BadSample(f"{where}: polygon has fewer than 3 distinct points")
  e1, e2 = poly[1] - poly[0], poly[2] - poly[1]
  if not abs(e1[0] * e2[1] - e1[1] * e2[0]) > 0:
    raise BadSample(f"{where}: rotated box polygon has zero area")


def _dota_polygons(path: str) -> list[tuple[str, np.ndarray]]:
  """DOTA `rbbtxts` lines `x1 y1 ... x4 y4 class_name k` -> [(class_name, (4, 2) polygon)]."""
  out = []
  try:
    with open(path) as f:
      lines = [line.split() for line in f if line.strip()]
  except OSError as e:
    raise BadSample(f"cannot read {path} ({e.strerror or e})") from None
  for i, parts in enumerate(lines):
    if len(parts) < 9:
      raise BadSample(f"{path} line {i + 1}: expected 8 coordinates and a class name")
    try:
      poly = np.asarray([float(v) for v in parts[:8]], np.float64).reshape(4, 2)
    except ValueError:
      raise BadSample(f"{path} line {i + 1}: non-numeric coordinate") from None
    out.append((parts[8], poly))
  return out


def read_sample(root: str, layout: samrs_classes.SubsetLayout, stem: str,
                coco_instances: list | None = None, image_format: str = "source") -> SamrsRecord:
  """Loads image, semantic map and instances of `stem`; raises BadSample with the reason.

  Instances come from `ins/<stem>.pkl`, or, given `coco_instances` (this image's entries of the
  COCO json that the original's `convert_pkl_json.py` writes, see `coco.py`), from there; the
  json lacks rotated boxes, which then come from `rbbtxts/<stem>.txt` (SOTA, FAST; matched by
  order, as SAMRS writes both from one loop) or the DIOR-R XML (SIOR). `image_format="raw"`
  keeps the decoded RGB pixels instead of the file's bytes (schema.py).
  """
  paths = subset_paths(root, layout)
  image_bytes, image, semantic_bytes = _read_image_and_semantic(paths, layout, stem)
  width, height = image.size
  ins_path, instances = _read_instances(paths, stem, coco_instances)
  rotated_polys = _rotated_polygons(paths, layout, stem, coco_instances is not None, instances,
                                    ins_path)
  labels, polygons, hboxes, rles, areas = [], [], [], [], []
  for k, inst in enumerate(instances):
    rotated = None if rotated_polys is None else rotated_polys[k]
    label, poly, hbox, rle, area = _parse_instance(inst, f"{ins_path} instance {k}", layout,
                                                   height, width, rotated)
    labels.append(label)
    polygons.append(poly)
    hboxes.append(hbox)
    rles.append(rle)
    areas.append(area)

  polygons = np.asarray(polygons, np.float64).reshape(-1, 4, 2)
  if image_format == "raw":
    image_bytes = np.asarray(image.convert("RGB")).tobytes()
  return SamrsRecord(
      image_bytes=image_bytes, image_format=image_format, height=height, width=width,
      filename=stem + layout.image_ext,
      dataset=layout.name, semantic_bytes=semantic_bytes,
      labels=np.asarray(labels, np.int64), rboxes=boxes.poly_to_rbox(polygons).astype(np.float32),
      polygons=polygons.astype(np.float32), hboxes=np.asarray(hboxes, np.float32).reshape(-1, 4),
      mask_rles=rles, areas=np.asarray(areas, np.int64))


def _read_image_and_semantic(paths: dict[str, str], layout: samrs_classes.SubsetLayout,
                             stem: str) -> tuple[bytes, Image.Image, bytes]:
  """(image file bytes, decoded image, semantic PNG bytes) of `stem`; the two must match in size."""
  image_bytes = _read(os.path.join(paths["images"], stem + layout.image_ext))
  image = _decode_image(image_bytes, f"image {stem}{layout.image_ext}", "RGB")
  width, height = image.size
  semantic_bytes = _read(os.path.join(paths["gray"], stem + ".png"))
  semantic = _decode_image(semantic_bytes, f"gray/{stem}.png", "L")
  if semantic.size != image.size:
    raise BadSample(f"gray/{stem}.png is {semantic.size[0]}x{semantic.size[1]} but the image is "
                    f"{width}x{height}")
  return image_bytes, image, semantic_bytes


def _read_instances(paths: dict[str, str], stem: str,
                    coco_instances: list | None) -> tuple[str, list[dict]]:
  """(where they come from, non-empty list of instance dicts): `ins/<stem>.pkl`'s or `coco_instances`."""
  if coco_instances is None:
    ins_path = os.path.join(paths["ins"], stem + ".pkl")
    try:
      instances = pickle.loads(_read(ins_path))
    except BadSample:
      raise
    except Exception as e:
      raise BadSample(f"cannot unpickle {ins_path} ({type(e).__name__}: {e})") from None
  else:
    ins_path, instances = f"COCO json entries of {stem}", coco_instances
  if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
    raise BadSample(f"{ins_path} holds a {type(instances).__name__}, expected a list of dicts")
  if not instances:
    raise BadSample(f"{ins_path}: the image has no instances")
  return ins_path, instances


def _rotated_polygons(paths: dict[str, str], layout: samrs_classes.SubsetLayout, stem: str,
                      from_coco: bool, instances: list, ins_path: str):
  """Per instance (class name, (4, 2) pixel polygon) from the XML or txt files; None: in the instances."""
  rotated_polys = None
  if layout.rotated_source == "xml":
    rotated_polys = _dior_polygons(os.path.join(paths["rotated"], stem + ".xml"))
  elif from_coco:
    rotated_polys = _dota_polygons(os.path.join(paths["rotated"], stem + ".txt"))
  if rotated_polys is not None and len(rotated_polys) != len(instances):
    raise BadSample(f"{stem}: {len(instances)} instances in {ins_path} but {len(rotated_polys)} "
                    f"rotated boxes in {layout.rotated_dir}")
  return rotated_polys


def _parse_instance(inst: dict, where: str, layout: samrs_classes.SubsetLayout, height: int,
                    width: int, rotated: tuple[str, np.ndarray] | None):
  """One instance -> (label, (4, 2) polygon, (4,) x1 y1 x2 y2 box, mask RLE bytes, area), in pixels."""
  try:
    label, mask = int(inst["label"]), inst["mask"]
    hbox = np.asarray(inst["rhbox"] if "rhbox" in inst else inst["bbox"], np.float64).reshape(4)
    counts = mask["counts"]
    size = [int(v) for v in mask["size"]]
  except (KeyError, TypeError, ValueError) as e:
    raise BadSample(f"{where}: malformed instance ({type(e).__name__}: {e})") from None
  if not 0 <= label < layout.num_classes:
    raise BadSample(f"{where}: label {label} outside the {layout.num_classes} {layout.name} classes")
  if size != [height, width]:
    raise BadSample(f"{where}: mask size {size} differs from the image size {[height, width]}")
  if rotated is not None:
    name, poly = rotated
    if name != layout.classes[label]:
      raise BadSample(f"{where}: category {layout.classes[label]!r} but {layout.rotated_dir} "
                      f"says {name!r}")
  else:
    try:
      poly = np.asarray(inst["rbox"], np.float64).reshape(4, 2)
    except (KeyError, ValueError) as e:
      raise BadSample(f"{where}: no usable 4x2 'rbox' polygon ({e})") from None
  _check_polygon(poly, where)
  if not np.isfinite(hbox).all() or hbox[2] <= hbox[0] or hbox[3] <= hbox[1]:
    raise BadSample(f"{where}: box {hbox.tolist()} is empty or not finite")
  rle = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
  return label, poly, hbox, rle, int(inst.get("size", 0))
