"""grain input pipeline over the SAMRS TFRecords written by `convert.py`.

Per subset: the split's shards are divided across processes (`process_index::process_count`),
their order shuffled per epoch by seed, read sequentially and interleaved, window-shuffled,
parsed, turned into static-shape examples and batched. `PretrainBatches` zips the three subsets
so that every step gets `batch_per_subset` images of each ("avg" mode, MTP_SPEC §3.2), and its
state (`get_state` / `set_state`) restores the exact stream.

A static example (numpy), S = image_size, M = max_instances:
  image (S, S, 3) uint8 RGB, zero-padded;
  semantic (S, S) uint8, SAMRS gray + 1 with uint8 wrap (background 255 -> 0, class k -> k+1,
    MTP_SPEC §3.4) and 255 = padding (ignored by the loss);
  labels (M,) int32, rboxes (M, 5) float32 le90, hboxes (M, 4) float32, valid (M,) bool;
  num_instances () int32: instances in the record before the cap (the excess is truncated);
  is_real () bool: False for the padding examples of a final partial evaluation batch.
Images of another size are resized (longer side = S, aspect kept) before zero padding; boxes are
scaled with them. Augmentations arrive with the data-pipeline issue.
"""

import functools
import io
import json
import os

import grain
import numpy as np
from PIL import Image

from data_pipelines.samrs import schema
from data_pipelines.samrs.convert import INFO_FILE
from mtp_jax.errors import DataError


def load_info(data_dir: str, subset: str, split: str) -> dict:
  """Reads `<data_dir>/<subset>/<split>/dataset_info.json`, or raises DataError with a hint."""
  path = os.path.join(data_dir, subset, split, INFO_FILE)
  if not os.path.isfile(path):
    raise DataError(
        f"{data_dir!r} is not a converted SAMRS TFRecord folder: {path} does not exist. Convert a "
        f"SAMRS tree first: python -m data_pipelines.samrs.convert --root SAMRS_DIR --out {data_dir}")
  try:
    with open(path) as f:
      info = json.load(f)
    missing = [s["file"] for s in info["shards"]
               if not os.path.isfile(os.path.join(data_dir, subset, split, s["file"]))]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path} is unreadable or malformed ({type(e).__name__}: {e})") from None
  if missing:
    raise DataError(f"{path} lists shards that do not exist: {missing}")
  return info


def decode_png_or_jpeg(data: bytes, mode: str) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert(mode))


def to_static_example(raw: bytes, image_size: int, max_instances: int) -> dict:
  """Parses one TFRecord into the static-shape example described in the module docstring."""
  record = schema.decode(raw)
  image = decode_png_or_jpeg(record.image_bytes, "RGB")
  gray = decode_png_or_jpeg(record.semantic_bytes, "L")
  h, w = gray.shape
  scale = 1.0
  if (h, w) != (image_size, image_size):
    scale = image_size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    gray = np.asarray(Image.fromarray(gray).resize((new_w, new_h), Image.NEAREST))
    h, w = new_h, new_w
  out_image = np.zeros((image_size, image_size, 3), np.uint8)
  out_image[:h, :w] = image
  semantic = np.full((image_size, image_size), 255, np.uint8)
  semantic[:h, :w] = gray.astype(np.uint8) + np.uint8(1)  # uint8 wrap: 255 -> 0 (background)

  n = min(record.num_instances, max_instances)
  labels = np.zeros((max_instances,), np.int32)
  rboxes = np.zeros((max_instances, 5), np.float32)
  hboxes = np.zeros((max_instances, 4), np.float32)
  valid = np.zeros((max_instances,), bool)
  labels[:n] = record.labels[:n]
  rboxes[:n] = record.rboxes[:n] * np.array([scale, scale, scale, scale, 1.0], np.float32)
  hboxes[:n] = record.hboxes[:n] * np.float32(scale)
  valid[:n] = True
  return {"image": out_image, "semantic": semantic, "labels": labels, "rboxes": rboxes,
          "hboxes": hboxes, "valid": valid, "num_instances": np.int32(record.num_instances),
          "is_real": np.bool_(True)}


def shard_files(data_dir: str, subset: str, split: str, process_index: int = 0,
                process_count: int = 1) -> list[str]:
  """This process's shard paths of one subset/split."""
  info = load_info(data_dir, subset, split)
  files = [os.path.join(data_dir, subset, split, s["file"]) for s in info["shards"]]
  mine = files[process_index::process_count]
  if not mine:
    raise DataError(f"{subset}/{split} has {len(files)} shard(s), fewer than the {process_count} "
                    f"processes; reconvert with --num-shards >= {process_count}")
  return mine


def _tfrecord_dataset(path: str):
  return grain.experimental.TFRecordIterDataset(path)


def make_dataset(data_dir: str, subset: str, split: str, *, image_size: int, max_instances: int,
                 batch_size: int, seed: int = 0, train: bool = True, process_index: int = 0,
                 process_count: int = 1, shuffle_window: int = 256, cycle_length: int = 4):
  """A grain IterDataset of batches for one subset.

  train=True: endless, shard order reshuffled every epoch, window shuffle, full batches only.
  train=False: one pass in file order; the last batch is padded with `is_real=False` examples.
  """
  files = shard_files(data_dir, subset, split, process_index, process_count)
  ds = grain.MapDataset.source(files)
  if train:
    ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.map(_tfrecord_dataset)
  ds = grain.experimental.InterleaveIterDataset(ds, cycle_length=min(cycle_length, len(files)) if train else 1)
  if train:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
  ds = ds.map(functools.partial(to_static_example, image_size=image_size, max_instances=max_instances))
  if train:
    return ds.batch(batch_size, drop_remainder=True)
  return ds.batch(batch_size, drop_remainder=False, batch_fn=functools.partial(_pad_batch, size=batch_size))


def _pad_batch(examples: list[dict], size: int) -> dict:
  pad = size - len(examples)
  if pad:
    filler = {k: np.zeros_like(v) for k, v in examples[0].items()}
    examples = examples + [filler] * pad  # is_real is False in the filler
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class PretrainBatches:
  """Zips one endless batch iterator per subset; a step's batch is {subset: batch}."""

  def __init__(self, data_dir: str, subsets, *, image_size: int, max_instances: dict,
               batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
               shuffle_window: int = 256):
    self.subsets = tuple(subsets)
    self._iters = {
        s: iter(make_dataset(data_dir, s, "train", image_size=image_size,
                             max_instances=max_instances[s], batch_size=batch_size,
                             seed=seed + 1000 * i, process_index=process_index,
                             process_count=process_count, shuffle_window=shuffle_window))
        for i, s in enumerate(self.subsets)}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return {s: next(it) for s, it in self._iters.items()}

  def get_state(self) -> dict:
    return {s: it.get_state() for s, it in self._iters.items()}

  def close(self):
    for it in self._iters.values():
      it.close()

  def set_state(self, state: dict):
    if set(state) != set(self.subsets):
      raise DataError(f"data-iterator state for subsets {sorted(state)} cannot restore a run over "
                      f"{sorted(self.subsets)}")
    for s, it in self._iters.items():
      it.set_state(state[s])
