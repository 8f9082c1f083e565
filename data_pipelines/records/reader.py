"""The grain pipeline over one subset/split of converted TFRecords: a dataset of batches.

The split's shards are divided across readers (`shards.shard_files`), their order shuffled per
epoch by seed, read sequentially and interleaved, window-shuffled, parsed by the source's
`parse(raw, rng)` into static examples (rng None when evaluating), and batched. Corrupt records
are skipped and counted (corrupt.py). batches.py zips the training streams of several subsets.
"""

import functools

import grain
import numpy as np

from data_pipelines.records.corrupt import DropCorrupt, SkipCorrupt
from data_pipelines.records.shards import shard_files
from mtp_jax.errors import DataError


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


def _records(files: list[str], train: bool, seed: int, shuffle_window: int, cycle_length: int):
  """The raw records of `files`: endless, shuffled shard order, interleaved and window-shuffled
  when training; one pass in file order otherwise."""
  ds = grain.MapDataset.source(files)
  if train:
    ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.map(_tfrecord_dataset)
  ds = grain.experimental.InterleaveIterDataset(ds, cycle_length=min(cycle_length, len(files)) if train else 1)
  if train:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
  return ds


def make_dataset(data_dir: str, subset: str, split: str, *, parse, batch_size: int, seed: int = 0,
                 train: bool = True, process_index: int = 0, process_count: int = 1,
                 shuffle_window: int = 256, cycle_length: int = 4, max_corrupt_fraction: float = 0.01,
                 corrupt_min_seen: int = 100, skip_counter: list | None = None,
                 num_workers: int = 0, worker_buffer: int = 2):
  """A grain IterDataset of batches for one subset (`<data_dir>/<subset>/<split>`).

  parse(raw, rng) -> static example reads one record (rng None when evaluating); the source
  gives it (data_pipelines/samrs/examples.py, data_pipelines/downstream/).

  train=True: endless, shard order reshuffled every epoch, window shuffle, per-example randomness
  from `seed` and the position in the stream (so it is part of the checkpointed iterator state),
  full batches only. train=False: one pass in file order; the last batch is padded with
  `is_real=False` examples. Corrupt records are skipped and counted (`SkipCorrupt`, appended to
  `skip_counter` when given) up to `max_corrupt_fraction`; training examples also carry
  `corrupt_skipped`, the records dropped just before them (`DropCorrupt`).

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
  ds = _records(files, train, seed, shuffle_window, cycle_length)
  what = f"{subset}/{split}"
  if train:
    safe = SkipCorrupt(functools.partial(_parse_train, parse), what, max_corrupt_fraction, corrupt_min_seen)
    ds = ds.random_map(safe, seed=seed)
  else:
    safe = SkipCorrupt(lambda raw: parse(raw, rng=None), what, max_corrupt_fraction, corrupt_min_seen)
    ds = ds.map(safe)
  if skip_counter is not None:
    skip_counter.append(safe)
  if train:
    ds = DropCorrupt(ds).batch(batch_size, drop_remainder=True)
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
