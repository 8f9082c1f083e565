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
  rbox_valid (M,) bool: the rotated box is usable (its centre survived the crop);
  with `with_masks`: mask_crops (M, R, R) uint8, R = MASK_CROP_SIZE: each packed instance's mask
    as mmcv's aligned RoIAlign over its packed hbox at R x R, soft coverage 0..255
    (`mtp_jax.ops.mask_targets.crop_masks`; the device resizes them to the sampled RoIs with
    `mask_targets`; dense (M, S, S) masks would cost 51 MB per image at S = 448), zeros for
    padding slots; evaluation examples (rng None) also mask_rles (M,) object array of the
    instances' COCO RLE `counts` (ascii str) in the evaluated S x S geometry, '' for padding
    slots (host only, for the COCO ground truth);
  num_instances () int32: usable instances before the cap (the excess is truncated);
  is_real () bool: False for the padding examples of a final partial evaluation batch;
  image_id () str: the image's file stem (unique within a subset; '' for padding examples).
Training examples go through `augment.train_augment`; evaluation images are resized (longer
side = S, aspect kept) and zero padded, boxes scaled with them.
"""

import functools
import io
import json
import os

import cv2
import grain
import numpy as np
from PIL import Image

from data_pipelines.samrs import augment, schema
from data_pipelines.samrs.convert import INFO_FILE
from mtp_jax.errors import DataError
from mtp_jax.ops import mask_targets

# Side of the per-instance mask crops (module docstring), chosen by
# benchmarks/mask_target_fidelity.py: targets within 0.1% of mmdet's full-mask ones at 1/64 of
# the dense masks' bytes (docs/benchmarks.md). The device reads it from the crops' shape.
MASK_CROP_SIZE = 56


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
  """PNG/JPEG bytes -> (H, W, 3) uint8 RGB (mode "RGB") or (H, W) uint8 (mode "L").

  OpenCV decodes straight into numpy (PIL's conversion costs two extra copies); images OpenCV
  cannot read (rare modes) fall back to PIL. Raises ValueError for undecodable bytes.
  """
  flag = cv2.IMREAD_COLOR_RGB if mode == "RGB" else cv2.IMREAD_GRAYSCALE
  array = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
  if array is None:
    try:
      return np.asarray(Image.open(io.BytesIO(data)).convert(mode))
    except Exception as e:
      raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from None
  return array


def record_to_sample(record: schema.SamrsRecord, with_masks: bool = False) -> dict:
  """A decoded record as an `augment` sample (full resolution, all instances usable).

  The semantic map becomes SAMRS gray + 1 with uint8 wrap (background 255 -> 0, class k -> k+1,
  MTP_SPEC §3.4). Masks are decoded from their COCO RLE only when asked (they cost H x W bytes
  per instance).
  """
  if record.image_format == "raw":
    image = np.frombuffer(record.image_bytes, np.uint8).reshape(record.height, record.width, 3)
  else:
    image = decode_png_or_jpeg(record.image_bytes, "RGB")
  gray = decode_png_or_jpeg(record.semantic_bytes, "L")
  if image.shape[:2] != gray.shape:
    raise ValueError(f"{record.filename}: semantic map {gray.shape} differs from image {image.shape[:2]}")
  n = record.num_instances
  sample = {"image": image, "semantic": gray.astype(np.uint8) + np.uint8(1),
            "hboxes": record.hboxes.astype(np.float32).reshape(n, 4),
            "rboxes": record.rboxes.astype(np.float32).reshape(n, 5),
            "labels": record.labels.astype(np.int32), "box_valid": np.ones(n, bool),
            "rbox_valid": np.ones(n, bool)}
  if with_masks:
    from pycocotools import mask as mask_utils  # lazy: only mask-using pipelines need it
    h, w = gray.shape
    rles = [{"size": [h, w], "counts": c} for c in record.mask_rles]
    sample["masks"] = (np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool) if n
                       else np.zeros((0, h, w), bool))
  for key in ("hboxes", "rboxes"):
    if not np.isfinite(sample[key]).all():
      raise ValueError(f"{record.filename}: non-finite {key}")
  return sample


def resize_and_pad(sample: dict, image_size: int) -> dict:
  """Evaluation geometry (§3.4 validation): longer side to image_size, aspect kept, padded."""
  h, w = sample["image"].shape[:2]
  if (h, w) != (image_size, image_size):
    sample = augment.resize(sample, image_size / max(h, w))
  return augment.pad_to(sample, image_size)


def example_shapes(image_size: int, max_instances: int) -> dict:
  """{field: (shape, numpy dtype)} of a static example's device fields (module docstring;
  `mask_crops` is present only in `with_masks` examples; the host-only `image_id` and
  `mask_rles` are left out)."""
  s, m, r = image_size, max_instances, MASK_CROP_SIZE
  return {"image": ((s, s, 3), np.uint8), "semantic": ((s, s), np.uint8), "labels": ((m,), np.int32),
          "rboxes": ((m, 5), np.float32), "hboxes": ((m, 4), np.float32), "valid": ((m,), bool),
          "rbox_valid": ((m,), bool), "num_instances": ((), np.int32), "is_real": ((), bool),
          "mask_crops": ((m, r, r), np.uint8)}


def pack(sample: dict, image_size: int, max_instances: int, mask_rles: bool = False) -> dict:
  """A padded sample -> the static example of the module docstring.

  Usable instances (a usable box or rotated box) are packed first, in order, then capped at
  `max_instances`; `num_instances` counts them before the cap, so the dropped fraction is
  (num_instances - kept) / num_instances. A sample with masks gives `mask_crops`, and with
  `mask_rles` also the kept masks' RLEs.
  """
  usable = np.flatnonzero(sample["box_valid"] | sample["rbox_valid"])
  kept = usable[:max_instances]
  n = len(kept)
  out = {"image": sample["image"], "semantic": sample["semantic"],
         "labels": np.zeros((max_instances,), np.int32),
         "rboxes": np.zeros((max_instances, 5), np.float32),
         "hboxes": np.zeros((max_instances, 4), np.float32),
         "valid": np.zeros((max_instances,), bool), "rbox_valid": np.zeros((max_instances,), bool),
         "num_instances": np.int32(len(usable)), "is_real": np.bool_(True)}
  out["labels"][:n] = sample["labels"][kept]
  out["rboxes"][:n] = sample["rboxes"][kept]
  out["hboxes"][:n] = sample["hboxes"][kept]
  out["valid"][:n] = sample["box_valid"][kept]
  out["rbox_valid"][:n] = sample["rbox_valid"][kept]
  if "masks" in sample:
    r = MASK_CROP_SIZE
    out["mask_crops"] = np.zeros((max_instances, r, r), np.uint8)
    out["mask_crops"][:n] = mask_targets.crop_masks(sample["masks"][kept], out["hboxes"][:n], r)
    if mask_rles:
      out["mask_rles"] = encode_rles(sample["masks"][kept], max_instances)
  return out


def encode_rles(masks: np.ndarray, length: int) -> np.ndarray:
  """(N, H, W) bool -> (length,) object array of COCO RLE `counts` (ascii str), '' past N."""
  from pycocotools import mask as mask_utils  # lazy: only mask-using pipelines need it
  out = np.full((length,), "", object)
  if len(masks):
    rles = mask_utils.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
    out[:len(masks)] = [r["counts"].decode("ascii") for r in rles]
  return out


def to_static_example(raw: bytes, image_size: int, max_instances: int, rng=None,
                      augment_config=None, with_masks: bool = False) -> dict:
  """Parses one TFRecord into a static example; augments it when `rng` is given (training)."""
  record = schema.decode(raw)
  sample = record_to_sample(record, with_masks)
  if rng is None:
    sample = resize_and_pad(sample, image_size)
  else:
    sample = augment.train_augment(sample, rng, image_size, augment_config or augment.AugmentConfig())
  example = pack(sample, image_size, max_instances, mask_rles=rng is None)
  example["image_id"] = np.str_(image_stem(record.filename))
  return example


def image_stem(filename: str) -> str:
  """'dir/P0001.png' -> 'P0001': the image id used by the evaluators and DOTA submissions."""
  return os.path.splitext(os.path.basename(filename))[0]


def eval_max_instances(data_dir: str, subset: str, split: str = "valid") -> int:
  """Instances to pack per evaluation image: the most any image of the split has (from
  dataset_info.json), so that evaluation scores against the full ground truth, never a cap."""
  info = load_info(data_dir, subset, split)
  if "max_instances_per_image" not in info:
    raise DataError(f"{data_dir}/{subset}/{split}/{INFO_FILE} lacks max_instances_per_image; "
                    "reconvert it with python -m data_pipelines.samrs.convert")
  return max(int(info["max_instances_per_image"]), 1)


class SkipCorrupt:
  """Wraps a record parser: a record that fails to parse is dropped (None) and counted.

  Raises DataError once more than `max_fraction` of the records seen (after `min_seen`) were
  corrupt, so a damaged dataset stops the run instead of silently shrinking it. Counters are per
  process (per grain worker when workers are used).
  """

  def __init__(self, parse, what: str, max_fraction: float = 0.01, min_seen: int = 100):
    self.parse, self.what = parse, what
    self.max_fraction, self.min_seen = max_fraction, min_seen
    self.seen = self.skipped = 0
    self.last_error = None

  def __call__(self, raw, *rng):
    self.seen += 1
    try:
      return self.parse(raw, *rng)
    except Exception as e:  # any failure of one record: corrupt bytes, bad image, bad arrays
      self.skipped += 1
      self.last_error = f"{type(e).__name__}: {e}"
      if self.seen >= self.min_seen and self.skipped > self.max_fraction * self.seen:
        raise DataError(
            f"{self.what}: {self.skipped} of {self.seen} records are corrupt, more than the "
            f"allowed fraction {self.max_fraction} (data.max_corrupt_fraction); last: "
            f"{self.last_error}") from None
      return None


def check_shard_counts(data_dir: str, subsets, split: str, readers: int):
  """Raises DataError unless every subset's split has a shard for each of `readers` readers.

  Every process calls this before any work, so a job that cannot feed all its processes stops
  everywhere with the same message instead of one process failing while the others wait.
  """
  for subset in subsets:
    shard_files(data_dir, subset, split, readers - 1, readers)


def shard_files(data_dir: str, subset: str, split: str, process_index: int = 0,
                process_count: int = 1) -> list[str]:
  """This process's shard paths of one subset/split."""
  info = load_info(data_dir, subset, split)
  files = [os.path.join(data_dir, subset, split, s["file"]) for s in info["shards"]]
  mine = files[process_index::process_count]
  if not mine:
    raise DataError(f"{subset}/{split} has {len(files)} shard(s), fewer than the {process_count} "
                    f"readers (processes or data.num_streams); reconvert with --num-shards >= {process_count}")
  return mine


def _tfrecord_dataset(path: str):
  return grain.experimental.TFRecordIterDataset(path)


# The grain worker process this code runs in (index, count), set by `_note_worker` when the worker
# starts; (0, 0) in the training process itself.
_WORKER = (0, 0)


def _note_worker(index: int, count: int):
  global _WORKER
  _WORKER = (index, count)


def _worker_rng(rng: np.random.Generator) -> np.random.Generator:
  """With worker processes, grain numbers each worker's examples from 0, so the i-th example of
  every worker would draw the same augmentation: mix the worker index into its generator."""
  index, count = _WORKER
  if not count:
    return rng
  return np.random.default_rng((int(rng.integers(2**62)), index, count))


class _DropCorrupt(grain.IterDataset):
  """Drops the records SkipCorrupt turned into None and writes into each example how many it
  dropped just before it (`corrupt_skipped`, int32). The counts travel with the data, so they are
  exact with worker processes too, whose SkipCorrupt counters live in the workers."""

  def __iter__(self):
    return _DropCorruptIterator(self._parent.__iter__())


class _DropCorruptIterator(grain.DatasetIterator):

  def __next__(self):
    dropped = 0
    while (example := next(self._parent)) is None:
      dropped += 1
    example["corrupt_skipped"] = np.int32(dropped)
    return example

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def make_dataset(data_dir: str, subset: str, split: str, *, image_size: int, max_instances: int,
                 batch_size: int, seed: int = 0, train: bool = True, process_index: int = 0,
                 process_count: int = 1, shuffle_window: int = 256, cycle_length: int = 4,
                 augment_config=None, with_masks: bool = False, max_corrupt_fraction: float = 0.01,
                 corrupt_min_seen: int = 100, skip_counter: list | None = None, parse=None,
                 num_workers: int = 0, worker_buffer: int = 2):
  """A grain IterDataset of batches for one subset.

  parse(raw, rng) -> static example (rng None when evaluating) reads one record; by default the
  SAMRS record (`to_static_example` with image_size, max_instances, augment_config, with_masks).
  Other datasets in the same folder layout (`<data_dir>/<subset>/<split>`, dataset_info.json
  with its shard list) pass their own (data_pipelines/downstream/).

  train=True: endless, shard order reshuffled every epoch, window shuffle, augmentation
  (`augment_config`, default MTP's; per-example randomness from `seed` and the position in the
  stream, so it is part of the checkpointed iterator state), full batches only.
  train=False: one pass in file order, resize and pad only; the last batch is padded with
  `is_real=False` examples. Corrupt records are skipped and counted (`SkipCorrupt`, appended to
  `skip_counter` when given) up to `max_corrupt_fraction`; training examples also carry
  `corrupt_skipped`, the records dropped just before them (`_DropCorrupt`).

  num_workers > 0 (training only): reading, parsing, augmentation and batching run in that many
  grain worker processes, `worker_buffer` batches ready per worker, their batches taken in turn.
  grain deals the shuffled, endlessly repeated shard sequence out among them (its n-th entry, one
  shard of one epoch, goes to worker n mod num_workers), so every shard of every epoch is read
  once, by one worker. The stream is then another one than with 0 workers, deterministic for a
  given worker count, and its state restores it exactly.
  """
  files = shard_files(data_dir, subset, split, process_index, process_count)
  if num_workers and not train:
    raise DataError("worker processes are for training streams only (evaluation reads in process)")
  ds = grain.MapDataset.source(files)
  if train:
    ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.map(_tfrecord_dataset)
  ds = grain.experimental.InterleaveIterDataset(ds, cycle_length=min(cycle_length, len(files)) if train else 1)
  if train:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
  if parse is None:
    parse = functools.partial(to_static_example, image_size=image_size, max_instances=max_instances,
                              with_masks=with_masks, augment_config=augment_config or augment.AugmentConfig())
  if train:
    safe = SkipCorrupt(functools.partial(_parse_train, parse), f"{subset}/{split}",
                       max_corrupt_fraction, corrupt_min_seen)
    ds = ds.random_map(safe, seed=seed)
  else:
    safe = SkipCorrupt(lambda raw: parse(raw, rng=None), f"{subset}/{split}", max_corrupt_fraction,
                       corrupt_min_seen)
    ds = ds.map(safe)
  if skip_counter is not None:
    skip_counter.append(safe)
  if train:
    ds = _DropCorrupt(ds).batch(batch_size, drop_remainder=True)
    if num_workers:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                       per_worker_buffer_size=worker_buffer),
                          worker_init_fn=_note_worker)
    return ds
  ds = ds.filter(lambda example: example is not None)
  return ds.batch(batch_size, drop_remainder=False, batch_fn=functools.partial(_pad_batch, size=batch_size))


def _parse_train(parse, raw, rng):
  return parse(raw, rng=_worker_rng(rng))


def _pad_batch(examples: list[dict], size: int) -> dict:
  pad = size - len(examples)
  if pad:
    filler = {k: np.full_like(v, "") if v.dtype == object else np.zeros_like(v)
              for k, v in examples[0].items()}
    examples = examples + [filler] * pad  # is_real is False in the filler, RLEs ''
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class PretrainBatches:
  """Zips one endless batch iterator per subset; a step's batch is {subset: batch}.

  Streams: the data of each subset is read by `num_streams` independent streams (stream j reads
  shards j::num_streams with its own seed); this process runs `streams` and concatenates their
  batches, `batch_size` rows in all. With one stream per process this is ordinary multi-host
  reading; a fixed `num_streams` makes the global batch, and the iterator state, the same on any
  number of processes. The state holds every local stream's position under its index.

  num_workers: grain worker processes per subset and stream (`make_dataset`); the state records
  the count, since a stream read by k workers is another stream than one read by 0.
  """

  def __init__(self, data_dir: str, subsets, *, image_size: int, max_instances: dict,
               batch_size: int, seed: int, streams=(0,), num_streams: int = 1,
               shuffle_window: int = 256, augment_config=None, with_masks: bool = False,
               max_corrupt_fraction: float = 0.01, parse=None, num_workers: int = 0):
    """parse: {subset: parse(raw, rng)} for non-SAMRS records (see make_dataset), else None."""
    self.subsets, self.streams, self.num_streams = tuple(subsets), tuple(streams), num_streams
    self.num_workers = num_workers
    self._corrupt = dict.fromkeys(self.subsets, 0)
    if batch_size % len(self.streams):
      raise DataError(f"{batch_size} images per subset do not split over {len(self.streams)} streams")
    self._iters = {
        (s, j): iter(make_dataset(data_dir, s, "train", image_size=image_size,
                                  max_instances=max_instances.get(s, 0),
                                  batch_size=batch_size // len(self.streams),
                                  seed=seed + 1000 * i + 100_000 * j, process_index=j,
                                  process_count=num_streams, shuffle_window=shuffle_window,
                                  augment_config=augment_config, with_masks=with_masks,
                                  max_corrupt_fraction=max_corrupt_fraction,
                                  parse=parse[s] if parse else None, num_workers=num_workers))
        for i, s in enumerate(self.subsets) for j in self.streams}

  def corrupt_records(self) -> dict:
    """{subset: corrupt records skipped before the batches this object returned so far} (its
    worker processes' too; see `_DropCorrupt`)."""
    return dict(self._corrupt)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    out = {}
    for s in self.subsets:
      parts = [next(self._iters[s, j]) for j in self.streams]
      out[s] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      self._corrupt[s] += int(out[s].pop("corrupt_skipped").sum())
    return out

  def get_state(self) -> dict:
    """{'num_streams': n, 'streams': {'<j>': {subset: grain state}}} for this process's streams."""
    return {"num_streams": self.num_streams, "num_workers": self.num_workers,
            "streams": {str(j): {s: self._iters[s, j].get_state() for s in self.subsets}
                        for j in self.streams}}

  def close(self):
    for it in self._iters.values():
      it.close()

  def set_state(self, state: dict):
    """Restores this process's streams from a state holding them (e.g. all processes' merged)."""
    if state.get("num_streams") != self.num_streams:
      raise DataError(f"the checkpoint's data-iterator state has {state.get('num_streams')} "
                      f"stream(s), this run {self.num_streams}; set data.num_streams="
                      f"{state.get('num_streams')} to continue its data exactly")
    if state.get("num_workers", 0) != self.num_workers:
      raise DataError(f"the checkpoint's data-iterator state was read by {state.get('num_workers', 0)} "
                      f"worker process(es) per stream, this run by {self.num_workers}; set "
                      f"data.num_workers={state.get('num_workers', 0)} to continue its data exactly")
    for j in self.streams:
      saved = state["streams"].get(str(j))
      if saved is None or set(saved) != set(self.subsets):
        raise DataError(f"data-iterator state of stream {j} is missing or covers other subsets "
                        f"({sorted(saved or {})}) than this run's {sorted(self.subsets)}")
      for s in self.subsets:
        self._iters[s, j].set_state(saved[s])
