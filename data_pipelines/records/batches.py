"""`TrainBatches`: the training batches of every subset, zipped, with checkpointable state.

Every step gets `batch_size` images of each subset ("avg" mode, MTP_SPEC §3.2, for the three
SAMRS subsets; one subset for a finetuning dataset), and the state (`get_state` / `set_state`)
restores the exact stream.
"""

import numpy as np

from data_pipelines.records.reader import make_dataset
from mtp_jax.errors import DataError


class TrainBatches:
  """Zips one endless batch iterator per subset; a step's batch is {subset: batch}.

  Streams: the data of each subset is read by `num_streams` independent streams (stream j reads
  shards j::num_streams with its own seed); this process runs `streams` and concatenates their
  batches, `batch_size` rows in all. With one stream per process this is ordinary multi-host
  reading; a fixed `num_streams` makes the global batch, and the iterator state, the same on any
  number of processes. The state holds every local stream's position under its index.

  num_workers: grain worker processes per subset and stream (`make_dataset`); the state records
  the count, since a stream read by k workers is another stream than one read by 0.
  """

  def __init__(self, data_dir: str, subsets, *, parse: dict, batch_size: int, seed: int,
               streams=(0,), num_streams: int = 1, shuffle_window: int = 256,
               max_corrupt_fraction: float = 0.01, num_workers: int = 0):
    """parse: {subset: parse(raw, rng)}, the source's record parsers (see make_dataset)."""
    self.subsets, self.streams, self.num_streams = tuple(subsets), tuple(streams), num_streams
    self.num_workers = num_workers
    self._corrupt = dict.fromkeys(self.subsets, 0)
    if batch_size % len(self.streams):
      raise DataError(f"{batch_size} images per subset do not split over {len(self.streams)} streams")
    self._iters = {
        (s, j): iter(make_dataset(data_dir, s, "train", parse=parse[s],
                                  batch_size=batch_size // len(self.streams),
                                  seed=seed + 1000 * i + 100_000 * j, process_index=j,
                                  process_count=num_streams, shuffle_window=shuffle_window,
                                  max_corrupt_fraction=max_corrupt_fraction, num_workers=num_workers))
        for i, s in enumerate(self.subsets) for j in self.streams}

  def corrupt_records(self) -> dict:
    """{subset: corrupt records skipped before the batches this object returned so far} (its
    worker processes' too; see `corrupt.DropCorrupt`)."""
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
