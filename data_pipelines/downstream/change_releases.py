"""Change-detection releases of MTP's finetuning (MTP_SPEC §5.2), read in their native layouts.

    LEVIR-CD:  <root>/{train,val,test}/{A,B,label}/<name>.png, 1024 x 1024, labels 0 / 255;
               cut into non-overlapping 256 x 256 tiles, as MTP trains on (7,120 train tiles =
               445 images x 16), tile ids <name>_<row>_<col>
    WHU-CD:    <root>/{train,val,test}/{A,B,label}/<name>.png (or .tif), its 256 x 256 tiles
    CDD/SVCD:  <root>/{train,val,test}/{A,B,OUT}/<name>.jpg, 256 x 256 (labels are JPEGs)
    OSCD:      the Onera release (OscdRelease below): 24 Sentinel-2 cities, 13 bands per date
Labels become 0 unchanged / 1 changed by thresholding at 128 (the releases store 0 / 255; CDD's
JPEG labels carry compression noise around both). The release's splits are kept: train -> train,
val -> valid, test -> test. A pair whose dates or label differ in size, a missing date or label,
and an unreadable file are named and skipped (or refused with --strict).
"""

import io
import os

import cv2
import numpy as np
import tifffile
from PIL import Image

from data_pipelines.downstream.schema import DownstreamRecord, encode_png
from data_pipelines.downstream import sentinel2
from data_pipelines.downstream.scene_folders import BadSample

SPLITS = {"train": "train", "valid": "val", "test": "test"}


def _read(path: str, what: str, mode: str):
  if not os.path.isfile(path):
    raise BadSample(f"its {what} is missing ({os.path.basename(os.path.dirname(path))}/{os.path.basename(path)})")
  try:
    with open(path, "rb") as f:
      data = f.read()
    image = Image.open(io.BytesIO(data))
    image = np.asarray(image.convert(mode))
  except Exception as e:  # noqa: BLE001 (any unreadable image)
    raise BadSample(f"its {what} is unreadable ({type(e).__name__}: {e})") from None
  return data, image


class PairRelease:
  """A release of {split}/{A,B,<label folder>}/<name><suffix> pairs; `tile` > 0 cuts each
  pair into non-overlapping tile x tile pieces (the image size must be a multiple of it)."""

  def __init__(self, name: str, label_folder: str, suffixes: tuple, tile: int = 0):
    self.name, self.label_folder, self.suffixes, self.tile = name, label_folder, suffixes, tile
    self.classes = ("changed",)   # output 0 unchanged, 1 changed
    self.bands, self.pixel_dtype = 3, "uint8"

  def _root(self, root):
    for candidate in (root, os.path.join(root, self.name.upper())):
      if all(os.path.isdir(os.path.join(candidate, s, "A")) for s in ("train", "val")):
        return candidate
    raise BadSample(f"{root!r} holds no {self.name} release: expected train/ and val/ (and test/) "
                    f"with A/, B/ and {self.label_folder}/")

  def splits(self, root, seed: int = 0):
    del seed   # the release's own splits
    top = self._root(root)
    out, foreign = {}, []
    for split, folder in SPLITS.items():
      a = os.path.join(top, folder, "A")
      if not os.path.isdir(a):
        continue
      out[split] = []
      for file in sorted(os.listdir(a)):
        if not file.lower().endswith(self.suffixes):
          foreign.append((f"{folder}/A/{file}", f"not a {'/'.join(self.suffixes)} image"))
          continue
        out[split].append((f"{folder}/A/{file}", -1))
    return out, foreign

  def read(self, root, relative, _label=-1):
    """One pair (untiled releases) or the list of its tiles' records (tiled ones)."""
    top = self._root(root)
    folder, _, file = relative.split("/")
    stem = os.path.splitext(file)[0]
    a_bytes, a = _read(os.path.join(top, relative), "date A image", "RGB")
    b_path = os.path.join(top, folder, "B", file)
    b_bytes, b = _read(b_path, "date B image", "RGB")
    label_dir = os.path.join(top, folder, self.label_folder)
    label_file = next((f for f in (stem + s for s in (os.path.splitext(file)[1], ".png", ".jpg", ".tif"))
                       if os.path.isfile(os.path.join(label_dir, f))), file)
    _, label = _read(os.path.join(label_dir, label_file), "label", "L")
    if a.shape != b.shape:
      raise BadSample(f"its dates differ in size: A {a.shape[1]}x{a.shape[0]}, B {b.shape[1]}x{b.shape[0]}")
    if label.shape != a.shape[:2]:
      raise BadSample(f"its label is {label.shape[1]}x{label.shape[0]}, the images {a.shape[1]}x{a.shape[0]}")
    change = (label >= 128).astype(np.uint8)
    h, w = label.shape
    if not self.tile:
      return DownstreamRecord(image_bytes=a_bytes, image2_bytes=b_bytes, height=h, width=w, channels=3,
                              filename=relative, dataset=self.name, semantic_bytes=encode_png(change))
    t = self.tile
    if h % t or w % t:
      raise BadSample(f"a {w}x{h} image does not cut into {t} x {t} tiles")
    return [DownstreamRecord(image_bytes=encode_png(a[y:y + t, x:x + t]), image2_bytes=encode_png(b[y:y + t, x:x + t]),
                             height=t, width=t, channels=3, filename=f"{folder}/A/{stem}_{y // t}_{x // t}.png",
                             dataset=self.name, semantic_bytes=encode_png(change[y:y + t, x:x + t]))
            for y in range(0, h, t) for x in range(0, w, t)]


LEVIR_CD = PairRelease("levir_cd", "label", (".png",), tile=256)
WHU_CD = PairRelease("whu_cd", "label", (".png", ".tif", ".tiff"))
CDD = PairRelease("cdd", "OUT", (".jpg", ".png"))


class OscdRelease:
  """The Onera Satellite Change Detection release (Daudt et al. 2018), as MTP finetunes it.

      <root>/Onera Satellite Change Detection dataset - Images/
          train.txt, test.txt              the cities of each split, comma-separated
          <city>/imgs_1_rect/B01.tif ... B12.tif, B8A.tif    date 1, co-registered
          <city>/imgs_2_rect/...                              date 2
          <city>/dates.txt, pair/, imgs_1/, imgs_2/           (not read)
      <root>/Onera Satellite Change Detection dataset - Train Labels/<city>/cm/cm.png
      <root>/Onera Satellite Change Detection dataset - Test Labels/<city>/cm/cm.png

  (the folders are found by how their names end: "Images", "Train Labels", "Test Labels").
  Records: all 13 bands per date, raw uint16 digital numbers in sentinel2.BANDS order; the 20 m
  and 60 m bands resized bilinearly to the 10 m grid of B04 (as the release's own loader does);
  a config picks its bands with data.bands (RGB: sentinel2.RGB). The city is cut into
  non-overlapping `tile` x `tile` tiles from the top left (MTP: 96-px patches); the tiles at the
  right and bottom borders are padded with zero pixels and ignored labels (255), so every pixel
  is scored exactly once. Label: cm.png, non-zero = changed (the release's loader reads it so).
  Splits: train.txt -> train, test.txt -> test (the release has no validation split). A city
  with a missing or unreadable band, date or label, or whose label differs in size from its
  bands, is named and skipped (or refused with --strict); a city folder in neither list is
  named and left out.
  """

  name = "oscd"
  classes = ("changed",)
  bands = len(sentinel2.BANDS)
  pixel_dtype = "uint16"

  def __init__(self, tile: int = 96):
    self.tile = tile

  @staticmethod
  def _folders(root):
    """(images folder, {"train": labels folder, "test": labels folder})."""
    if not os.path.isdir(root):
      raise BadSample(f"{root!r} holds no OSCD release: no such folder")
    found = {}
    for top in (root, *[os.path.join(root, d) for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]):
      for entry in sorted(os.listdir(top)) if os.path.isdir(top) else ():
        lower = entry.lower().rstrip()
        for key, ending in (("images", "images"), ("train", "train labels"), ("test", "test labels")):
          if lower.endswith(ending) and os.path.isdir(os.path.join(top, entry)):
            found.setdefault(key, os.path.join(top, entry))
    if "images" not in found or not os.path.isfile(os.path.join(found["images"], "train.txt")):
      raise BadSample(f"{root!r} holds no OSCD release: expected 'Onera Satellite Change Detection "
                      "dataset - Images/' with train.txt, test.txt and one folder per city")
    return found["images"], {s: found.get(s) for s in ("train", "test")}

  @staticmethod
  def _cities(path):
    with open(path) as f:
      return [c.strip() for c in f.read().replace("\n", ",").split(",") if c.strip()]

  def splits(self, root, seed: int = 0):
    del seed   # the release's own splits
    images, labels = self._folders(root)
    out, listed = {}, set()
    for split in ("train", "test"):
      path = os.path.join(images, f"{split}.txt")
      if not os.path.isfile(path):
        continue
      if labels[split] is None:
        raise BadSample(f"{root!r} has {split}.txt but no 'Onera Satellite Change Detection dataset - "
                        f"{split.title()} Labels' folder")
      out[split] = [(f"{split}/{c}", -1) for c in self._cities(path)]
      listed.update(self._cities(path))
    foreign = [(d, "a city folder in neither train.txt nor test.txt") for d in sorted(os.listdir(images))
               if os.path.isdir(os.path.join(images, d)) and d not in listed]
    return out, foreign

  @staticmethod
  def _band(folder, band, date):
    """One band of a date: (H, W) uint16, from the file whose name ends in <band>.tif."""
    where = f"{os.path.basename(os.path.dirname(folder))}/{os.path.basename(folder)}"
    if not os.path.isdir(folder):
      raise BadSample(f"its date {date} is missing ({where}/)")
    names = [f for f in os.listdir(folder) if f.upper().endswith(f"{band}.TIF")]
    if not names:
      raise BadSample(f"its date {date} band {band} is missing ({where}/{band}.tif)")
    try:
      pixels = tifffile.imread(os.path.join(folder, sorted(names)[0]))
    except Exception as e:  # noqa: BLE001 (any unreadable file)
      raise BadSample(f"its date {date} band {band} is unreadable ({type(e).__name__}: {e})") from None
    pixels = np.squeeze(pixels)
    if pixels.ndim != 2 or pixels.dtype.kind not in "ui" or pixels.min() < 0 or pixels.max() > 65535:
      raise BadSample(f"its date {date} band {band} holds {pixels.dtype} {pixels.shape} pixels, not one "
                      "band of 16-bit digital numbers")
    return pixels.astype(np.uint16)

  def _date(self, folder, date):
    """(H, W, 13) uint16 on the grid of B04."""
    bands = {b: self._band(folder, b, date) for b in sentinel2.BANDS}
    h, w = bands["B04"].shape
    for b, pixels in bands.items():
      if pixels.shape != (h, w):
        if sentinel2.METRES[b] == 10:
          raise BadSample(f"its date {date} band {b} is {pixels.shape[1]}x{pixels.shape[0]}, B04 {w}x{h}")
        bands[b] = np.round(cv2.resize(pixels.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
                            ).clip(0, 65535).astype(np.uint16)
    return np.stack([bands[b] for b in sentinel2.BANDS], axis=-1)

  def read(self, root, relative, _label=-1):
    """The list of a city's tile records."""
    images, labels = self._folders(root)
    split, city = relative.split("/")
    if not os.path.isdir(os.path.join(images, city)):
      raise BadSample(f"its image folder is missing ({city}/)")
    one = self._date(os.path.join(images, city, "imgs_1_rect"), 1)
    two = self._date(os.path.join(images, city, "imgs_2_rect"), 2)
    if one.shape != two.shape:
      raise BadSample(f"its dates differ in size: 1 {one.shape[1]}x{one.shape[0]}, 2 {two.shape[1]}x{two.shape[0]}")
    _, label = _read(os.path.join(labels[split], city, "cm", "cm.png"), "label", "L")
    if label.shape != one.shape[:2]:
      raise BadSample(f"its label is {label.shape[1]}x{label.shape[0]}, the bands {one.shape[1]}x{one.shape[0]}")
    change = (label > 0).astype(np.uint8)
    t, (h, w) = self.tile, label.shape
    records = []
    for y in range(0, h, t):
      for x in range(0, w, t):
        a, b = (np.zeros((t, t, self.bands), np.uint16) for _ in range(2))
        c = np.full((t, t), 255, np.uint8)
        th, tw = min(t, h - y), min(t, w - x)
        a[:th, :tw], b[:th, :tw], c[:th, :tw] = one[y:y + th, x:x + tw], two[y:y + th, x:x + tw], change[y:y + th, x:x + tw]
        records.append(DownstreamRecord(
            image_bytes=a.tobytes(), image2_bytes=b.tobytes(), height=t, width=t, channels=self.bands,
            filename=f"{city}/{city}_{y // t}_{x // t}", dataset=self.name, image_format="raw",
            dtype="uint16", semantic_bytes=encode_png(c)))
    return records


OSCD = OscdRelease()
