"""The input pipeline off the step's critical path: grain worker processes (exact state, exact
corrupt-record counts, distinct augmentation per worker) and the device read-ahead thread."""

import json
import os

import grain
import numpy as np
import pytest

from data_pipelines.records import reader as records_reader
from data_pipelines.samrs import examples as samrs_examples
from mtp_jax.errors import DataError
from mtp_jax.train.prefetch import DevicePrefetch

from conftest import SAMPLE_SIZE

KW = dict(image_size=SAMPLE_SIZE, max_instances={"sota": 4}, batch_size=2, seed=3, shuffle_window=4)


@pytest.fixture(scope="module")
def corrupt_dir(tfrecord_dir, tmp_path_factory):
  """sota/train with one garbage record after the second record of each of its 2 shards."""
  import tensorflow as tf
  out = tmp_path_factory.mktemp("corrupt")
  split_dir = out / "sota" / "train"
  split_dir.mkdir(parents=True)
  with open(os.path.join(tfrecord_dir, "sota", "train", "dataset_info.json")) as f:
    info = json.load(f)
  for shard in info["shards"]:
    records = list(grain.experimental.TFRecordIterDataset(os.path.join(tfrecord_dir, "sota", "train", shard["file"])))
    with tf.io.TFRecordWriter(str(split_dir / shard["file"])) as w:
      for i, r in enumerate(records):
        w.write(r)
        if i == 1:
          w.write(b"not an Example")
    shard["num_examples"] += 1
  (split_dir / "dataset_info.json").write_text(json.dumps(info))
  return str(out)


def test_workers_restore_exactly_and_count_the_corrupt_records_they_skip(corrupt_dir):
  a = samrs_examples.train_batches(corrupt_dir, ("sota",), num_workers=2, max_corrupt_fraction=0.5, **KW)
  for _ in range(3):
    next(a)
  state = json.loads(json.dumps(a.get_state()))
  expected = [next(a)["sota"]["image"] for _ in range(5)]
  # Batches alternate between the workers; each worker interleaves its 2 shard reads (one shard
  # of epoch 0, the other of epoch 1) and meets both garbage records (after their second records)
  # on its third round, so before its 4th batch: 0 counted through 6 batches, 4 through 8.
  assert a.corrupt_records() == {"sota": 4}
  b = samrs_examples.train_batches(corrupt_dir, ("sota",), num_workers=2, max_corrupt_fraction=0.5, **KW)
  b.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(b)["sota"]["image"], want)
  with pytest.raises(DataError, match="data.num_workers=2"):
    samrs_examples.train_batches(corrupt_dir, ("sota",), max_corrupt_fraction=0.5, **KW).set_state(state)
  a.close(), b.close()


def test_in_process_reader_counts_corrupt_records_per_returned_batch(corrupt_dir):
  batches = samrs_examples.train_batches(corrupt_dir, ("sota",), max_corrupt_fraction=0.5, **KW)
  seen = [batches.corrupt_records()["sota"]]
  for _ in range(6):   # one epoch: 12 good records
    assert "corrupt_skipped" not in next(batches)["sota"]
    seen.append(batches.corrupt_records()["sota"])
  assert seen[0] == 0 and seen[-1] == 2 and seen == sorted(seen)
  batches.close()


def test_each_worker_draws_its_own_augmentation():
  draws = []
  for worker in ((0, 0), (0, 2), (1, 2)):
    records_reader._note_worker(*worker)
    draws.append(records_reader._worker_rng(np.random.default_rng(7)).random(4))
  records_reader._note_worker(0, 0)
  np.testing.assert_array_equal(draws[0], np.random.default_rng(7).random(4))   # in process: as is
  assert not np.allclose(draws[1], draws[2])


def test_read_ahead_hands_over_the_state_of_the_consumed_batch(tfrecord_dir):
  plain = samrs_examples.train_batches(tfrecord_dir, ("sota",), **KW)
  want = []
  for _ in range(4):
    want.append((next(plain)["sota"]["image"], plain.get_state()))
  ahead = samrs_examples.train_batches(tfrecord_dir, ("sota",), **KW)
  feed = DevicePrefetch(ahead, lambda raw: raw["sota"]["image"] + 1, depth=2)
  for image, state in want:
    fed = next(feed)
    np.testing.assert_array_equal(fed.raw["sota"]["image"], image)
    np.testing.assert_array_equal(fed.batch, image + 1)
    assert fed.data_state == state and fed.corrupt == {"sota": 0}
  assert feed.wait_seconds() >= 0 and feed.wait_seconds() == 0
  feed.close()
  plain.close(), ahead.close()


class _Failing:
  """A reader whose third batch is unreadable."""

  def __init__(self):
    self.n = 0

  def __next__(self):
    self.n += 1
    if self.n == 3:
      raise DataError("sota/train: too many corrupt records")
    return {"n": self.n}

  def get_state(self):
    return {"n": self.n}

  def corrupt_records(self):
    return {}


@pytest.mark.parametrize("depth", [0, 2])
def test_read_ahead_raises_the_readers_error_in_the_step_thread(depth):
  feed = DevicePrefetch(_Failing(), lambda raw: raw, depth=depth)
  assert [next(feed).data_state["n"] for _ in range(2)] == [1, 2]
  with pytest.raises(DataError, match="too many corrupt"):
    next(feed)
  feed.close()
