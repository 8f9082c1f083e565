"""The SAMRS TFRecord schema (DESIGN.md §5): one `tf.train.Example` per image.

Both the converter and the reader use this module; neither needs TensorFlow to build or parse an
Example (the protos come from `tensorflow_datasets.proto`).

Keys:
  image/encoded     PNG or JPEG bytes exactly as in the source file, or raw RGB pixels
  image/format      "source" (PNG/JPEG bytes) or "raw" (H*W*3 uint8, row-major RGB; decode-free
                    at about 1.5x the size of a PNG of an aerial image). Absent means "source".
  image/height, image/width, image/filename, dataset (sota|sior|fast)
  semantic/encoded  PNG bytes, uint8, value = class index (0-based), 255 = background (as SAMRS)
  instances/*       parallel lists over the N instances of the image:
    label (int, 0-based), rbox (N*5 float: cx, cy, w, h, angle le90 radians, pixels),
    polygon (N*8 float: 4 corners x, y), hbox (N*4 float: x1, y1, x2, y2),
    mask_rle (COCO RLE `counts` bytes, image-sized masks), area (int, mask pixels)
"""

import dataclasses

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2


@dataclasses.dataclass
class SamrsRecord:
  """One image with its annotations, before augmentation. Arrays are numpy, N = #instances."""

  image_bytes: bytes
  height: int
  width: int
  filename: str
  dataset: str
  semantic_bytes: bytes
  labels: np.ndarray     # (N,) int64
  rboxes: np.ndarray     # (N, 5) float32, le90
  polygons: np.ndarray   # (N, 4, 2) float32
  hboxes: np.ndarray     # (N, 4) float32
  mask_rles: list        # N COCO RLE `counts` byte strings (column-major, image-sized)
  areas: np.ndarray      # (N,) int64
  image_format: str = "source"   # "source" (PNG/JPEG bytes) or "raw" (RGB uint8 pixels)

  @property
  def num_instances(self) -> int:
    return int(self.labels.shape[0])


def _bytes(feature, values):
  feature.bytes_list.value.extend(values)


def _ints(feature, values):
  feature.int64_list.value.extend(int(v) for v in values)


def _floats(feature, values):
  feature.float_list.value.extend(float(v) for v in np.asarray(values, np.float32).reshape(-1))


def encode(record: SamrsRecord) -> bytes:
  """Serialises a record into `tf.train.Example` bytes."""
  example = tf_example_pb2.Example()
  f = example.features.feature
  _bytes(f["image/encoded"], [record.image_bytes])
  if record.image_format != "source":
    _bytes(f["image/format"], [record.image_format.encode()])
  _ints(f["image/height"], [record.height])
  _ints(f["image/width"], [record.width])
  _bytes(f["image/filename"], [record.filename.encode()])
  _bytes(f["dataset"], [record.dataset.encode()])
  _bytes(f["semantic/encoded"], [record.semantic_bytes])
  _ints(f["instances/label"], record.labels)
  _floats(f["instances/rbox"], record.rboxes)
  _floats(f["instances/polygon"], record.polygons)
  _floats(f["instances/hbox"], record.hboxes)
  _bytes(f["instances/mask_rle"], record.mask_rles)
  _ints(f["instances/area"], record.areas)
  return example.SerializeToString(deterministic=True)   # map keys sorted: same bytes in any process


def decode(raw: bytes) -> SamrsRecord:
  """Parses `tf.train.Example` bytes written by `encode`; raises ValueError on a malformed record."""
  example = tf_example_pb2.Example.FromString(raw)
  f = example.features.feature
  missing = [k for k in ("image/encoded", "semantic/encoded", "image/height", "image/width") if k not in f]
  if missing:
    raise ValueError(f"record lacks the SAMRS keys {missing}")
  labels = np.asarray(f["instances/label"].int64_list.value, np.int64)
  n = labels.shape[0]
  floats = lambda key, *shape: np.asarray(f[key].float_list.value, np.float32).reshape(n, *shape)
  record = SamrsRecord(
      image_bytes=f["image/encoded"].bytes_list.value[0],
      height=int(f["image/height"].int64_list.value[0]),
      width=int(f["image/width"].int64_list.value[0]),
      filename=f["image/filename"].bytes_list.value[0].decode(),
      dataset=f["dataset"].bytes_list.value[0].decode(),
      semantic_bytes=f["semantic/encoded"].bytes_list.value[0],
      labels=labels,
      rboxes=floats("instances/rbox", 5),
      polygons=floats("instances/polygon", 4, 2),
      hboxes=floats("instances/hbox", 4),
      mask_rles=list(f["instances/mask_rle"].bytes_list.value),
      areas=np.asarray(f["instances/area"].int64_list.value, np.int64),
      image_format=(f["image/format"].bytes_list.value[0].decode() if "image/format" in f
                    else "source"),
  )
  if len(record.mask_rles) != n or record.areas.shape[0] != n:
    raise ValueError(f"record {record.filename!r}: instance lists of unequal length")
  return record
