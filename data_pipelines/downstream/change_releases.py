"""Change-detection releases of MTP's finetuning (MTP_SPEC §5.2), read in their native layouts.

    LEVIR-CD:  <root>/{train,val,test}/{A,B,label}/<name>.png, 1024 x 1024, labels 0 / 255;
               cut into non-overlapping 256 x 256 tiles, as MTP trains on (7,120 train tiles =
               445 images x 16), tile ids <name>_<row>_<col>
    WHU-CD:    <root>/{train,val,test}/{A,B,label}/<name>.png (or .tif), its 256 x 256 tiles
    CDD/SVCD:  <root>/{train,val,test}/{A,B,OUT}/<name>.jpg, 256 x 256 (labels are JPEGs)
Labels become 0 unchanged / 1 changed by thresholding at 128 (the releases store 0 / 255; CDD's
JPEG labels carry compression noise around both). The release's splits are kept: train -> train,
val -> valid, test -> test. A pair whose dates or label differ in size, a missing date or label,
and an unreadable file are named and skipped (or refused with --strict).
"""

import io
import os

import numpy as np
from PIL import Image

from data_pipelines.downstream.schema import DownstreamRecord, encode_png
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
