"""The finetuning TFRecord schema: one `tf.train.Example` per sample, for every downstream task.

Keys:
  image/encoded    the source file's bytes (PNG / JPEG; TIFF re-encoded as PNG), or raw pixels (`image/format` "raw":
                   H*W*C row-major, dtype `image/dtype`, for multispectral images)
  image/format     "source" or "raw"; image/height, image/width, image/channels, image/dtype
  image/filename   the sample's path relative to the dataset root (its id is the file stem)
  dataset          the dataset's name (eurosat, resisc45, ...)
  label            classification: the class index (0-based, in the dataset's class list)
  image2/encoded   change detection: the second date (PNG / JPEG, same size and format as image)
  semantic/encoded segmentation, change detection (0 unchanged, 1 changed): PNG, uint8, the training label (0 = background, k + 1 = object
                   class k, 255 = ignored: the `ss` task's convention), already mapped from the
                   release's own values by its reader (e.g. LoveDA's reduce_zero_label)
  objects/polygon  detection: 8 floats per object, its 4 corners (x1 y1 ... x4 y4) in pixels of
                   this image in the release's order (DOTA's, DIOR-R's clockwise from the top
                   left); horizontal boxes are written as their 4 corners too
  objects/label    detection: the object's class index; objects/difficult: 0, 1 (the
                   release's difficult flag) or 2 (cut by the split of a large image: mmrotate's
                   img_split marks an object that a patch holds only in part so)
  image/meta       detection: JSON of the release's per-image header (DOTA's imagesource, gsd)
  patch/source     a patch of a large image (downstream/dota_split.py): the source image's id;
  patch/x, patch/y the window's top-left corner in source pixels; patch/size its side
Encoding and parsing need no TensorFlow (`tensorflow_datasets.proto`).
"""

import dataclasses

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

from data_pipelines.records.images import decode_png_or_jpeg


@dataclasses.dataclass
class DownstreamRecord:
  image_bytes: bytes
  height: int
  width: int
  channels: int
  filename: str
  dataset: str
  image_format: str = "source"   # "source" (PNG/JPEG bytes) or "raw" (pixels, dtype below)
  dtype: str = "uint8"
  label: int = -1                 # classification; -1 when the dataset has none
  semantic_bytes: bytes = b""     # segmentation: PNG of the label map; b"" when none
  image2_bytes: bytes = b""       # change detection: the second date; b"" when none
  polygons: np.ndarray | None = None     # detection: (N, 4, 2) float32 corners; None: no objects field
  object_labels: np.ndarray | None = None  # (N,) int classes
  difficult: np.ndarray | None = None    # (N,) int 0 / 1 / 2 (see the module docstring)
  meta: str = ""                  # detection: JSON of the release's image header
  patch_source: str = ""          # a patch: the source image's id ("" for whole images)
  patch_x: int = 0
  patch_y: int = 0
  patch_size: int = 0
  # Not encoded (the writer's): the source image's whole annotation, on the first patch of a
  # split image ({"id", "width", "height", "polygons", "labels", "difficult", "meta"}), and the
  # objects the reader dropped, [(where, reason)].
  source_annotation: dict | None = None
  dropped: list = dataclasses.field(default_factory=list)


def encode(record: DownstreamRecord) -> bytes:
  example = tf_example_pb2.Example()
  f = example.features.feature
  f["image/encoded"].bytes_list.value.append(record.image_bytes)
  f["image/format"].bytes_list.value.append(record.image_format.encode())
  f["image/dtype"].bytes_list.value.append(record.dtype.encode())
  for key, value in (("image/height", record.height), ("image/width", record.width),
                     ("image/channels", record.channels), ("label", record.label)):
    f[key].int64_list.value.append(int(value))
  f["image/filename"].bytes_list.value.append(record.filename.encode())
  f["dataset"].bytes_list.value.append(record.dataset.encode())
  if record.semantic_bytes:
    f["semantic/encoded"].bytes_list.value.append(record.semantic_bytes)
  if record.image2_bytes:
    f["image2/encoded"].bytes_list.value.append(record.image2_bytes)
  if record.polygons is not None:
    n = len(record.polygons)
    f["objects/polygon"].float_list.value.extend(np.asarray(record.polygons, np.float32).reshape(-1).tolist())
    f["objects/label"].int64_list.value.extend(np.asarray(record.object_labels, np.int64).reshape(n).tolist())
    f["objects/difficult"].int64_list.value.extend(np.asarray(record.difficult, np.int64).reshape(n).tolist())
    f["image/meta"].bytes_list.value.append(record.meta.encode())
  if record.patch_source:
    f["patch/source"].bytes_list.value.append(record.patch_source.encode())
    for key, value in (("patch/x", record.patch_x), ("patch/y", record.patch_y), ("patch/size", record.patch_size)):
      f[key].int64_list.value.append(int(value))
  return example.SerializeToString(deterministic=True)


def decode(raw: bytes) -> DownstreamRecord:
  """Parses bytes written by `encode`; ValueError for a record of another schema."""
  example = tf_example_pb2.Example.FromString(raw)
  f = example.features.feature
  missing = [k for k in ("image/encoded", "image/height", "image/width", "image/channels", "label")
             if k not in f]
  if missing:
    raise ValueError(f"record lacks the finetuning keys {missing}")
  text = lambda key: f[key].bytes_list.value[0].decode()
  number = lambda key: int(f[key].int64_list.value[0])
  objects = {}
  if "objects/polygon" in f or "objects/label" in f:
    polygons = np.asarray(f["objects/polygon"].float_list.value, np.float32)
    labels = np.asarray(f["objects/label"].int64_list.value, np.int64)
    difficult = np.asarray(f["objects/difficult"].int64_list.value, np.int64)
    if polygons.size != 8 * len(labels) or len(difficult) != len(labels):
      raise ValueError(f"record {text('image/filename')!r}: {polygons.size} polygon values, "
                       f"{len(labels)} labels and {len(difficult)} difficult flags do not match")
    objects = {"polygons": polygons.reshape(-1, 4, 2), "object_labels": labels.astype(np.int32),
               "difficult": difficult.astype(np.int32), "meta": text("image/meta") if "image/meta" in f else ""}
  if "patch/source" in f:
    objects.update(patch_source=text("patch/source"), patch_x=number("patch/x"), patch_y=number("patch/y"),
                   patch_size=number("patch/size"))
  return DownstreamRecord(
      image_bytes=f["image/encoded"].bytes_list.value[0], height=number("image/height"),
      width=number("image/width"), channels=number("image/channels"),
      filename=text("image/filename"), dataset=text("dataset"), image_format=text("image/format"),
      dtype=text("image/dtype"), label=number("label"),
      semantic_bytes=f["semantic/encoded"].bytes_list.value[0] if "semantic/encoded" in f else b"",
      image2_bytes=f["image2/encoded"].bytes_list.value[0] if "image2/encoded" in f else b"", **objects)


def decode_image(record: DownstreamRecord, date: int = 1) -> np.ndarray:
  """(H, W, C) pixels of a record (date 2: its second image): source bytes decoded (RGB), raw
  pixels reshaped."""
  data = record.image_bytes if date == 1 else record.image2_bytes
  if not data:
    raise ValueError(f"{record.filename}: the record has no image of date {date}")
  if record.image_format == "raw":
    pixels = np.frombuffer(data, np.dtype(record.dtype))
    return pixels.reshape(record.height, record.width, record.channels)
  image = decode_png_or_jpeg(data, "RGB")
  if image.shape[:2] != (record.height, record.width):
    raise ValueError(f"{record.filename}: decoded {image.shape[:2]}, record says "
                     f"{(record.height, record.width)}")
  return image


def decode_semantic(record: DownstreamRecord) -> np.ndarray:
  """(H, W) uint8 label map of a segmentation record."""
  if not record.semantic_bytes:
    raise ValueError(f"{record.filename}: the record has no label map")
  label = decode_png_or_jpeg(record.semantic_bytes, "L")
  if label.shape != (record.height, record.width):
    raise ValueError(f"{record.filename}: label map {label.shape} differs from the image "
                     f"{(record.height, record.width)}")
  return label


def encode_png(array: np.ndarray) -> bytes:
  """(H, W) or (H, W, 3) RGB uint8 -> PNG bytes (the converters' re-encoded tiles and labels)."""
  import cv2  # noqa: PLC0415
  ok, data = cv2.imencode(".png", array[..., ::-1] if array.ndim == 3 else array)
  if not ok:
    raise ValueError(f"an array of shape {array.shape} could not be encoded as PNG")
  return data.tobytes()
