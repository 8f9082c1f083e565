"""The three SAMRS subsets: class lists (label index = position) and release layouts (MTP_SPEC §3.1, §4).

Paths are relative to a SAMRS root folder that holds the three subset folders side by side, as the
release unpacks:

  <root>/dotav2_1024_rbb/trainval/{images, rhbox_segs_init/{gray,ins}, rbbtxts, train.txt, valid.txt}
  <root>/dior/{JPEGImages-trainval, hbox_segs_trainvaltest_init/{gray,ins},
               Annotations/Oriented Bounding Boxes, train.txt, valid.txt}
  <root>/fair1m_1024/trainval/{images, rhbox_segs_init/{gray,ins}, rbbtxts, train.txt, valid.txt}

`train.txt` / `valid.txt` hold one image stem per line (the lists that the original's
`convert_pkl_json.py` reads).
"""

import dataclasses

SOTA_CLASSES = (
    "large-vehicle", "swimming-pool", "helicopter", "bridge", "plane", "ship", "soccer-ball-field",
    "basketball-court", "ground-track-field", "small-vehicle", "baseball-diamond", "tennis-court",
    "roundabout", "storage-tank", "harbor", "container-crane", "airport", "helipad",
)
SIOR_CLASSES = (
    "airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney",
    "expressway-service-area", "expressway-toll-station", "dam", "golffield", "groundtrackfield",
    "harbor", "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation", "vehicle",
    "windmill",
)
FAST_CLASSES = (
    "A220", "A321", "A330", "A350", "ARJ21", "Baseball-Field", "Basketball-Court", "Boeing737",
    "Boeing747", "Boeing777", "Boeing787", "Bridge", "Bus", "C919", "Cargo-Truck", "Dry-Cargo-Ship",
    "Dump-Truck", "Engineering-Ship", "Excavator", "Fishing-Boat", "Football-Field", "Intersection",
    "Liquid-Cargo-Ship", "Motorboat", "other-airplane", "other-ship", "other-vehicle",
    "Passenger-Ship", "Roundabout", "Small-Car", "Tennis-Court", "Tractor", "Trailer",
    "Truck-Tractor", "Tugboat", "Van", "Warship",
)

SPLITS = ("train", "valid")


@dataclasses.dataclass(frozen=True)
class SubsetLayout:
  """Where one subset's files live inside a SAMRS root, and what kind of boxes its pickles hold."""

  name: str
  classes: tuple[str, ...]
  base: str            # subset folder relative to the SAMRS root
  images: str          # image folder relative to `base`
  image_ext: str       # ".png" or ".jpg"
  segs: str            # folder with gray/ and ins/, relative to `base`
  rotated_source: str  # "pkl" (rbox polygons in ins/*.pkl, plus rbbtxts/) or "xml" (DIOR-R XML)
  rotated_dir: str     # rbbtxts/ or the DIOR-R XML folder, relative to `base`

  @property
  def num_classes(self) -> int:
    return len(self.classes)


SUBSETS = {
    "sota": SubsetLayout("sota", SOTA_CLASSES, "dotav2_1024_rbb/trainval", "images", ".png",
                         "rhbox_segs_init", "pkl", "rbbtxts"),
    "sior": SubsetLayout("sior", SIOR_CLASSES, "dior", "JPEGImages-trainval", ".jpg",
                         "hbox_segs_trainvaltest_init", "xml", "Annotations/Oriented Bounding Boxes"),
    "fast": SubsetLayout("fast", FAST_CLASSES, "fair1m_1024/trainval", "images", ".png",
                         "rhbox_segs_init", "pkl", "rbbtxts"),
}


def subset(name: str) -> SubsetLayout:
  """Returns the layout of subset `name` ('sota', 'sior' or 'fast') or raises a clear ValueError."""
  if name not in SUBSETS:
    raise ValueError(f"unknown SAMRS subset {name!r}; expected one of {sorted(SUBSETS)}")
  return SUBSETS[name]
