"""A small synthetic sample in the exact SAMRS release layout, for quickstarts and tests.

    python -m data_pipelines.samrs.synthetic --out data/samrs_sample [--images 24] [--size 128] [--seed 0]

For each subset (sota, sior, fast) it writes `--images` scenes of `--size` x `--size` pixels in the
layout of `classes.SUBSETS` (MTP_SPEC §4): RGB images (PNG; JPEG for SIOR, as DIOR ships),
`gray/*.png` (uint8 class index, 255 background, later objects overwrite earlier ones),
`ins/*.pkl` (a list of dicts: COCO-RLE `mask` with an ascii `counts` string, `rbox` 4x2 polygon and
`rhbox` for the rotated subsets or `bbox` [x1, y1, x2, y2] for SIOR, `category`, `label`, `size` =
mask area), DOTA-style `rbbtxts/*.txt` (SOTA, FAST) or DIOR-R XML (SIOR), and `train.txt` /
`valid.txt`.

Objects are rotated rectangles whose colour, stripe period, aspect ratio and size depend on their
class, so a model can learn them; about a third are placed on top of an earlier object, so
overlaps occur. Coordinates are multiples of 1/100 px so that the text formats hold them exactly.
The same arguments give the same bytes.
"""

import colorsys
import io
import os
import pickle

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from data_pipelines.samrs import classes as samrs_classes
from mtp_jax import cli
from mtp_jax.ops import boxes

MIN_MASK_AREA = 8  # pixels; smaller objects are not placed


def class_appearance(label: int, num_classes: int):
  """Returns (rgb colour in [0,1], stripe period px, aspect ratio, relative size) of a class."""
  hue = (label * 0.61803398875) % 1.0
  value = 0.95 if label % 2 == 0 else 0.7
  colour = np.array(colorsys.hsv_to_rgb(hue, 0.85, value))
  period = 2.0 + (label % 4) * 1.5
  aspect = 1.0 + (label % 3) * 0.8
  rel_size = 0.12 + 0.04 * ((label // 3) % 3)
  return colour, period, aspect, rel_size


def _background(rng, size):
  base = rng.uniform(0.25, 0.45, size=3) * np.array([0.9, 1.0, 0.8])
  coarse = rng.normal(0.0, 0.06, size=(max(2, size // 16), max(2, size // 16), 3))
  coarse = np.asarray(
      Image.fromarray(((coarse + 0.5) * 255).clip(0, 255).astype(np.uint8)).resize(
          (size, size), Image.BILINEAR), np.float32) / 255.0 - 0.5
  fine = rng.normal(0.0, 0.02, size=(size, size, 3))
  return np.clip(base + coarse + fine, 0.0, 1.0)


def _rasterize(rbox, size):
  """Boolean (size, size) mask of the pixels whose centres lie inside the rotated box."""
  cx, cy, w, h, t = rbox
  ys, xs = np.mgrid[0:size, 0:size] + 0.5
  dx, dy = xs - cx, ys - cy
  u = dx * np.cos(t) + dy * np.sin(t)
  v = -dx * np.sin(t) + dy * np.cos(t)
  return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2), u


def _place_object(rng, size, label, num_classes, previous):
  """Draws a class-shaped rotated box fully inside the image; None after 30 failed tries."""
  _, _, aspect, rel_size = class_appearance(label, num_classes)
  for _ in range(30):
    length = rel_size * size * rng.uniform(0.8, 1.25)
    w, h = length * np.sqrt(aspect), max(length / np.sqrt(aspect), 3.0)
    angle = rng.uniform(-np.pi / 2, np.pi / 2)
    if previous and rng.uniform() < 0.35:  # overlap an earlier object
      pcx, pcy = previous[rng.integers(len(previous))][:2]
      cx, cy = pcx + rng.uniform(-0.4, 0.4) * w, pcy + rng.uniform(-0.4, 0.4) * h
    else:
      cx, cy = rng.uniform(0, size, size=2)
    poly = np.round(boxes.rbox_to_poly(np.array([cx, cy, w, h, angle])), 2)
    if poly.min() >= 0 and poly.max() <= size:
      return poly
  return None


def _rle(mask):
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def make_scene(rng, layout, size, classes: int = 0):
  """Returns (rgb uint8 image, gray uint8 map, list of instance dicts) for one scene; objects of
  the layout's first `classes` classes only when `classes` > 0."""
  num_classes = min(classes, layout.num_classes) if classes > 0 else layout.num_classes
  image = _background(rng, size)
  gray = np.full((size, size), 255, np.uint8)
  instances, placed = [], []
  for _ in range(int(rng.integers(3, 9))):
    label = int(rng.integers(num_classes))
    poly = _place_object(rng, size, label, num_classes, placed)
    if poly is None:
      continue
    rbox = boxes.poly_to_rbox(poly)
    # Rasterise from the polygon's own frame (p0->p1 is the w-axis) so stripes follow the object.
    e1 = poly[1] - poly[0]
    frame = (*poly.mean(0), np.hypot(*e1), np.hypot(*(poly[2] - poly[1])), np.arctan2(e1[1], e1[0]))
    mask, u = _rasterize(frame, size)
    area = int(mask.sum())
    if area < MIN_MASK_AREA:
      continue
    colour, period, _, _ = class_appearance(label, num_classes)
    stripes = (np.floor(u / period) % 2)[..., None]
    shade = colour * (1.0 - 0.35 * stripes) + rng.normal(0, 0.015, size=(size, size, 3))
    image = np.where(mask[..., None], shade, image)
    gray[mask] = label
    placed.append(rbox)
    inst = {"mask": _rle(mask), "category": layout.classes[label], "label": label, "size": area}
    hbox = [float(v) for v in boxes.poly_to_hbox(poly)]
    if layout.rotated_source == "pkl":
      inst["rbox"] = poly.tolist()
      inst["rhbox"] = hbox
    else:
      inst["bbox"] = hbox
      inst["_polygon"] = poly  # written to the DIOR-R XML, not to the pickle
    instances.append(inst)
  return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), gray, instances


def _dota_line(poly, category, label):
  return " ".join(f"{v:.2f}" for v in poly.reshape(-1)) + f" {category} {label}\n"


def _dior_xml(stem, size, instances):
  objs = []
  for inst in instances:
    p = inst["_polygon"]
    corners = "".join(
        f"<x_{n}>{p[i, 0]:.2f}</x_{n}><y_{n}>{p[i, 1]:.2f}</y_{n}>"
        for i, n in enumerate(("left_top", "right_top", "right_bottom", "left_bottom")))
    objs.append(f"  <object>\n    <name>{inst['category']}</name>\n    <pose>Unspecified</pose>\n"
                f"    <truncated>0</truncated>\n    <difficult>0</difficult>\n"
                f"    <type>robndbox</type>\n    <robndbox>{corners}</robndbox>\n  </object>\n")
  return (f"<annotation>\n  <filename>{stem}.jpg</filename>\n  <source><database>DIOR-R (synthetic)"
          f"</database></source>\n  <size><width>{size}</width><height>{size}</height>"
          f"<depth>3</depth></size>\n{''.join(objs)}</annotation>\n")


def _write(path, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _encode_image(rgb, ext):
  buf = io.BytesIO()
  if ext == ".jpg":
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
  else:
    Image.fromarray(rgb).save(buf, format="PNG")
  return buf.getvalue()


def stem_name(subset_name: str, index: int) -> str:
  return {"sota": f"P{index:04d}_0000", "sior": f"{index + 1:05d}", "fast": f"{index:06d}"}[subset_name]


def generate(out: str, images: int = 24, size: int = 128, seed: int = 0,
             valid_fraction: float = 0.25) -> dict[str, list[str]]:
  """Writes the sample under `out`; returns {subset: [stems]}. Deterministic in all arguments."""
  if images < 2:
    raise ValueError(f"--images must be at least 2 (one train, one valid image), got {images}")
  if size < 32:
    raise ValueError(f"--size must be at least 32 pixels, got {size}")
  written = {}
  for subset_index, (name, layout) in enumerate(sorted(samrs_classes.SUBSETS.items())):
    rng = np.random.default_rng([seed, subset_index])
    base = os.path.join(out, layout.base)
    stems = [stem_name(name, i) for i in range(images)]
    for stem in stems:
      rgb, gray, instances = make_scene(rng, layout, size)
      _write(os.path.join(base, layout.images, stem + layout.image_ext), _encode_image(rgb, layout.image_ext))
      _write(os.path.join(base, layout.segs, "gray", stem + ".png"), _encode_image(gray, ".png"))
      if layout.rotated_source == "pkl":
        text = "".join(_dota_line(np.asarray(i["rbox"]), i["category"], i["label"]) for i in instances)
        _write(os.path.join(base, layout.rotated_dir, stem + ".txt"), text.encode())
      else:
        _write(os.path.join(base, layout.rotated_dir, stem + ".xml"),
               _dior_xml(stem, size, instances).encode())
        for inst in instances:
          del inst["_polygon"]
      _write(os.path.join(base, layout.segs, "ins", stem + ".pkl"), pickle.dumps(instances, protocol=4))
    num_valid = max(1, int(round(images * valid_fraction)))
    _write(os.path.join(base, "train.txt"), "".join(s + "\n" for s in stems[:-num_valid]).encode())
    _write(os.path.join(base, "valid.txt"), "".join(s + "\n" for s in stems[-num_valid:]).encode())
    written[name] = stems
  return written


def main(argv=None):
  parser = cli.parser(__file__, __doc__)
  parser.add_argument("--out", required=True, help="folder to write the SAMRS-layout sample into")
  parser.add_argument("--images", type=int, default=24, help="images per subset (default 24)")
  parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
  parser.add_argument("--seed", type=int, default=0, help="random seed (default 0): the same arguments give the same bytes")
  args = parser.parse_args(argv)
  try:
    written = generate(args.out, args.images, args.size, args.seed)
  except ValueError as e:
    parser.error(str(e))
  for name, stems in written.items():
    print(f"{name}: {len(stems)} images of {args.size}x{args.size} px under {args.out}")


if __name__ == "__main__":
  main()
