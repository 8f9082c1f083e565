"""Scene-classification releases laid out as one folder per class (MTP_SPEC §5.2).

    EuroSAT (RGB):  <root>/2750/<Class>/<Class>_<n>.jpg            10 classes, 64 x 64
    EuroSAT (MS):   <root>/[ds/images/remote_sensing/otherDatasets/sentinel_2/]tif/<Class>/<Class>_<n>.tif
                    the same 27,000 scenes, 13 Sentinel-2 bands uint16 (bands 1-3: B02-B04)
    RESISC-45:      <root>/NWPU-RESISC45/<class>/<class>_<nnn>.jpg  45 classes, 256 x 256

`--root` may name the release folder itself (2750/, NWPU-RESISC45/) or the folder holding it.
Splits are drawn per class with a seeded permutation (`split_samples`): RESISC-45 keeps MTP's
20 % for training ("nwpu28": 140 of each class's 700) and the other 80 % for evaluation; EuroSAT
60 % train / 20 % valid / 20 % test, 16,200 / 5,400 / 5,400 scenes: the counts of the original's
logs (254 iterations of 64 per epoch, `Scene_Classification/logs/eurosat/*.json`), the usual
60/20/20 split of EuroSAT; which scenes its list files held is not part of its release, so ours
are drawn. Both EuroSAT releases name their scenes alike, so one seed gives them the same split. The split lists are written into
dataset_info.json, so a conversion says exactly which images trained. Multispectral scenes are
stored as raw pixels (schema "raw", their own dtype), every band kept; a config picks bands.
"""

import dataclasses
import io
import os

import numpy as np
import tifffile
from PIL import Image

from data_pipelines.downstream.schema import DownstreamRecord

EUROSAT_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                   "Pasture", "PermanentCrop", "Residential", "River", "SeaLake")
RESISC45_CLASSES = (
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral",
    "church", "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert",
    "forest", "freeway", "golf_course", "ground_track_field", "harbor", "industrial_area",
    "intersection", "island", "lake", "meadow", "medium_residential", "mobile_home_park",
    "mountain", "overpass", "palace", "parking_lot", "railway", "railway_station",
    "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship", "snowberg",
    "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
    "thermal_power_station", "wetland")


class BadSample(Exception):
  """A sample that cannot be used; the message says why (the converter names and skips it)."""


@dataclasses.dataclass(frozen=True)
class SceneRelease:
  """One class-folder release: its folder name, classes, image suffix and split fractions
  (valid_fraction 0: every scene that does not train evaluates, no test split)."""
  name: str
  folder: str
  classes: tuple
  suffix: str
  train_fraction: float
  valid_fraction: float = 0.0
  bands = 3               # RGB (L images are converted)
  pixel_dtype = "uint8"

  def release_root(self, root: str) -> str:
    """The folder holding the class folders, from --root (the release folder, its parent or the
    archive's top folder)."""
    for candidate in (os.path.join(root, self.folder), os.path.join(root, os.path.basename(self.folder)), root):
      if os.path.isdir(candidate) and any(os.path.isdir(os.path.join(candidate, c)) for c in self.classes):
        return candidate
    raise BadSample(f"{root!r} holds no {self.name} release: expected {self.folder}/<class>/ folders "
                    f"named {', '.join(self.classes[:3])}, ...")

  def list_samples(self, root: str):
    """([(relative path, label)] sorted, [(path, reason)] of what does not belong).

    A folder that is not a class of the list, and a file that is not `<class>_<n><suffix>`,
    is named in the second list (the converter skips it, or stops with --strict)."""
    top = self.release_root(root)
    samples, foreign = [], []
    for entry in sorted(os.listdir(top)):
      path = os.path.join(top, entry)
      if not os.path.isdir(path):
        continue
      if entry not in self.classes:
        foreign.append((entry, f"folder {entry!r} is not one of the {len(self.classes)} "
                               f"{self.name} classes"))
        continue
      for file in sorted(os.listdir(path)):
        stem, suffix = os.path.splitext(file)
        number = stem[len(entry) + 1:]
        if suffix.lower() != self.suffix or not stem.startswith(entry + "_") or not number.isdigit():
          foreign.append((f"{entry}/{file}", f"not a {entry}_<n>{self.suffix} image"))
          continue
        samples.append((f"{entry}/{file}", self.classes.index(entry)))
    missing = [c for c in self.classes if not os.path.isdir(os.path.join(top, c))]
    if missing:
      foreign.append(("/".join((os.path.basename(top), "")), f"class folders missing: {missing}"))
    return samples, foreign

  def splits(self, root: str, seed: int = 0):
    """({'train': [(path, label)], 'valid': [...][, 'test': [...]]}, [(path, reason)] of what does
    not belong)."""
    samples, foreign = self.list_samples(root)
    return split_samples(samples, len(self.classes), self.train_fraction, seed, self.valid_fraction), foreign

  def read(self, root: str, relative: str, label: int) -> DownstreamRecord:
    """One image as a record (its source bytes kept); BadSample if it does not decode."""
    path = os.path.join(self.release_root(root), relative)
    try:
      with open(path, "rb") as f:
        data = f.read()
      with Image.open(io.BytesIO(data)) as image:
        image.load()
        width, height = image.size
        if image.mode not in ("RGB", "L"):
          raise BadSample(f"image mode {image.mode}, not RGB")
    except BadSample:
      raise
    except Exception as e:  # noqa: BLE001 (any unreadable image: truncated, not an image)
      raise BadSample(f"unreadable image ({type(e).__name__}: {e})") from None
    return DownstreamRecord(image_bytes=data, height=height, width=width, channels=3,
                            filename=relative, dataset=self.name, label=label)


def split_samples(samples: list, num_classes: int, train_fraction: float, seed: int,
                  valid_fraction: float = 0.0) -> dict:
  """{'train': [...], 'valid': [...]}: per class, a seeded permutation's first
  round(train_fraction * n) samples train, the rest evaluate; with valid_fraction, the next up to
  round((train_fraction + valid_fraction) * n) are 'valid' and the rest 'test'. Each list sorted
  by path."""
  rng = np.random.default_rng(seed)
  out = {"train": [], "valid": []} | ({"test": []} if valid_fraction else {})
  for c in range(num_classes):
    members = [s for s in samples if s[1] == c]
    order = rng.permutation(len(members))
    k = int(round(train_fraction * len(members)))
    v = int(round((train_fraction + valid_fraction) * len(members))) if valid_fraction else len(members)
    out["train"] += [members[i] for i in order[:k]]
    out["valid"] += [members[i] for i in order[k:v]]
    if valid_fraction:
      out["test"] += [members[i] for i in order[v:]]
  return {split: sorted(items) for split, items in out.items()}


@dataclasses.dataclass(frozen=True)
class MultibandSceneRelease(SceneRelease):
  """A class-folder release of multi-band TIFFs (read with tifffile, band-last or band-first),
  each `bands` bands of `pixel_dtype`; `folder` may be a path below --root."""
  bands: int = 13
  pixel_dtype = "uint16"   # Sentinel-2 L1C digital numbers

  def read(self, root: str, relative: str, label: int) -> DownstreamRecord:
    path = os.path.join(self.release_root(root), relative)
    try:
      pixels = tifffile.imread(path)
    except Exception as e:  # noqa: BLE001 (any unreadable file: truncated, not a TIFF)
      raise BadSample(f"unreadable TIFF ({type(e).__name__}: {e})") from None
    if pixels.ndim == 3 and pixels.shape[0] == self.bands and pixels.shape[-1] != self.bands:
      pixels = np.moveaxis(pixels, 0, -1)   # band-first (planar) files
    if pixels.ndim != 3 or pixels.shape[-1] != self.bands:
      raise BadSample(f"{pixels.shape} pixels, not {self.bands} bands of an H x W image")
    if pixels.dtype != np.dtype(self.pixel_dtype):
      raise BadSample(f"pixels of type {pixels.dtype}, not {self.pixel_dtype}")
    pixels = np.ascontiguousarray(pixels)
    height, width = pixels.shape[:2]
    return DownstreamRecord(image_bytes=pixels.tobytes(), height=height, width=width,
                            channels=self.bands, filename=relative, dataset=self.name, label=label,
                            image_format="raw", dtype=pixels.dtype.name)


EUROSAT = SceneRelease("eurosat", "2750", EUROSAT_CLASSES, ".jpg", 0.6, 0.2)
EUROSAT_MS = MultibandSceneRelease("eurosat_ms", "ds/images/remote_sensing/otherDatasets/sentinel_2/tif",
                                   EUROSAT_CLASSES, ".tif", 0.6, 0.2, bands=13)
RESISC45 = SceneRelease("resisc45", "NWPU-RESISC45", RESISC45_CLASSES, ".jpg", 0.2)
