"""The next training batches read and placed on the devices while the current step runs.

`DevicePrefetch` runs a background thread that takes host batches from the reader
(`TrainBatches`, whose grain worker processes may parse and augment further ahead), turns
them into device batches (`to_device`, e.g. `batching.device_batch`) and queues `depth` of them.
Each queued item carries the reader's state and corrupt-record counts taken right after its
batch was read, so a checkpoint saves the position of the last batch the step *consumed*, not of
the ones read ahead: a resumed run sees exactly the batches the interrupted one had not trained
on. depth=0 reads in the calling thread (no read-ahead).
"""

import dataclasses
import queue
import threading
import time
from typing import Any, Callable


@dataclasses.dataclass
class Fed:
  """One step's data: host batch {subset: {field: array}}, device batch, and the reader's state
  and {subset: corrupt records so far} right after this batch."""
  raw: dict
  batch: Any
  data_state: dict
  corrupt: dict


class DevicePrefetch:
  """Iterator of `Fed`; `wait_seconds()` is the time spent blocked on it since the last call."""

  def __init__(self, batches, to_device: Callable[[dict], Any], depth: int = 2):
    self._batches, self._to_device, self._depth = batches, to_device, depth
    self._waited = 0.0
    self._stop = threading.Event()
    if depth:
      self._queue = queue.Queue(maxsize=depth)
      self._thread = threading.Thread(target=self._fill, name="device-prefetch", daemon=True)
      self._thread.start()

  def _read(self) -> Fed:
    raw = next(self._batches)
    return Fed(raw, self._to_device(raw), self._batches.get_state(), self._batches.corrupt_records())

  def _fill(self):
    while not self._stop.is_set():
      try:
        item = self._read()
      except BaseException as e:  # handed to the consuming thread, which raises it
        item = e
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item, BaseException):
        return

  def __iter__(self):
    return self

  def __next__(self) -> Fed:
    start = time.perf_counter()
    try:
      if not self._depth:
        return self._read()
      item = self._queue.get()
      if isinstance(item, BaseException):
        raise item
      return item
    finally:
      self._waited += time.perf_counter() - start

  def wait_seconds(self) -> float:
    """Seconds spent waiting for data since the previous call."""
    waited, self._waited = self._waited, 0.0
    return waited

  def close(self):
    """Stops the thread (the reader itself is closed by its owner)."""
    self._stop.set()
    if self._depth:
      while self._thread.is_alive():
        try:
          self._queue.get(timeout=0.1)
        except queue.Empty:
          pass
      self._thread.join()
