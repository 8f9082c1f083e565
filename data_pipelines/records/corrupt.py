"""Corrupt records: skipped and counted, up to a bound, instead of stopping or shrinking a run.

`SkipCorrupt` wraps a record parser (a failing record becomes None); `DropCorrupt` removes those
Nones from a training stream and writes the count into the next example, so the counts travel
with the data (exact with grain worker processes too, whose `SkipCorrupt` counters live in the
workers).
"""

import grain
import numpy as np

from mtp_jax.errors import DataError


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


class DropCorrupt(grain.IterDataset):
  """Drops the records SkipCorrupt turned into None and writes into each example how many it
  dropped just before it (`corrupt_skipped`, int32)."""

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
