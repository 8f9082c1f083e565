"""Converter: resume and refusal, checksums, workers, the COCO json source, every bad input;
reader: corrupt records skipped and bounded."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipelines.records import shards
from data_pipelines.samrs import classes, coco, convert, raw, schema
from data_pipelines.samrs import examples as samrs_examples
from mtp_jax.errors import DataError

from conftest import SAMPLE_SIZE

quiet = dict(log=lambda *_: None)


def _info(out, subset="sota", split="train"):
  with open(os.path.join(out, subset, split, "dataset_info.json")) as f:
    return json.load(f)


def test_interrupted_conversion_resumes_and_damaged_shards_are_redone(sample_dir, tmp_path):
  out = str(tmp_path / "out")
  first = convert.convert_split(sample_dir, "sota", "train", out, num_shards=3, **quiet)
  split_dir = os.path.join(out, "sota", "train")
  assert all(len(s["sha256"]) == 64 for s in first["shards"])
  # Simulate an interruption after shard 0: shards 1 and 2 gone, no dataset_info yet.
  with open(os.path.join(split_dir, convert.PROGRESS_FILE)) as f:
    progress = json.load(f)
  progress["complete"] = False
  for name in list(progress["shards"])[1:]:
    del progress["shards"][name]
    os.remove(os.path.join(split_dir, name))
  with open(os.path.join(split_dir, convert.PROGRESS_FILE), "w") as f:
    json.dump(progress, f)
  os.remove(os.path.join(split_dir, "dataset_info.json"))
  shard0 = os.path.join(split_dir, first["shards"][0]["file"])
  mtime = os.stat(shard0).st_mtime_ns
  again = convert.convert_split(sample_dir, "sota", "train", out, num_shards=3, **quiet)
  assert again == first and os.stat(shard0).st_mtime_ns == mtime   # shard 0 was not rewritten
  # A damaged shard (bytes flipped) fails its checksum and is converted again.
  with open(shard0, "r+b") as f:
    f.seek(20)
    f.write(b"\xff\xff")
  assert convert.convert_split(sample_dir, "sota", "train", out, num_shards=3, **quiet) == first
  assert shards.sha256(shard0) == first["shards"][0]["sha256"]
  assert not [f for f in os.listdir(split_dir) if f.endswith(".tmp")]


def test_a_leftover_temporary_shard_or_lost_info_file_does_not_block_a_rerun(sample_dir, tmp_path):
  out = tmp_path / "out"
  split_dir = out / "sota" / "train"
  split_dir.mkdir(parents=True)
  (split_dir / (shards.shard_name("sota", "train", 0, 2) + ".tmp")).write_bytes(b"half a shard")
  info = convert.convert_split(sample_dir, "sota", "train", str(out), num_shards=2, **quiet)
  assert sorted(os.listdir(split_dir)) == sorted(
      [s["file"] for s in info["shards"]] + ["dataset_info.json", convert.PROGRESS_FILE])
  os.remove(split_dir / "dataset_info.json")            # complete, but the info file was lost
  assert convert.convert_split(sample_dir, "sota", "train", str(out), num_shards=2, **quiet) == info


def test_other_conversions_are_refused(sample_dir, tmp_path):
  out = str(tmp_path / "out")
  convert.convert_split(sample_dir, "sota", "train", out, num_shards=2, **quiet)
  with pytest.raises(DataError, match="different settings \\(num_shards\\)"):
    convert.convert_split(sample_dir, "sota", "train", out, num_shards=3, **quiet)
  os.remove(os.path.join(out, "sota", "train", convert.PROGRESS_FILE))
  with pytest.raises(DataError, match="another conversion"):
    convert.convert_split(sample_dir, "sota", "train", out, num_shards=2, **quiet)


def test_workers_write_identical_shards_and_info_statistics(sample_dir, tfrecord_dir, tmp_path):
  info = convert.convert_split(sample_dir, "fast", "train", str(tmp_path / "w2"), num_shards=2,
                               workers=2, **quiet)
  single = _info(tfrecord_dir, "fast", "train")
  assert [s["sha256"] for s in info["shards"]] == [s["sha256"] for s in single["shards"]]
  hist = {int(k): v for k, v in info["instances_per_image_histogram"].items()}
  assert sum(hist.values()) == info["num_examples"]
  assert sum(n * c for n, c in hist.items()) == info["num_instances"]
  per_image = [n for n, c in hist.items() for _ in range(c)]
  cap = info["max_instances_999"]
  assert np.minimum(per_image, cap).sum() >= 0.999 * sum(per_image)
  assert cap == 1 or np.minimum(per_image, cap - 1).sum() < 0.999 * sum(per_image)
  assert convert.smallest_cap([10] + [1] * 99, keep=0.9) == 1   # cap 1 keeps 100 of 109 >= 98.1
  assert convert.smallest_cap([100, 1, 1], keep=0.999) == 100


def test_coco_json_source_gives_the_same_dataset(sample_dir, tfrecord_dir, tmp_path):
  from pycocotools import mask as mask_utils
  json_path = str(tmp_path / "sota_train.json")
  with open(json_path, "w") as f:
    json.dump(coco.pkl_to_coco(sample_dir, "sota", "train"), f)
  info = convert.convert_split(sample_dir, "sota", "train", str(tmp_path / "out"), num_shards=2,
                               coco_json=json_path, **quiet)
  assert info["num_examples"] == _info(tfrecord_dir)["num_examples"] and info["skipped"] == []
  import grain
  read = lambda d: [schema.decode(r) for f in shards.shard_files(d, "sota", "train")
                    for r in grain.experimental.TFRecordIterDataset(f)]
  for a, b in zip(read(str(tmp_path / "out")), read(tfrecord_dir)):
    assert a.filename == b.filename and a.mask_rles == b.mask_rles
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.rboxes, b.rboxes, atol=1e-4)   # from rbbtxts instead of the pkl
    # The json's bbox is the mask's tight box (maskUtils.toBbox), as the original trains with.
    tight = [mask_utils.toBbox({"size": [a.height, a.width], "counts": c}) for c in a.mask_rles]
    np.testing.assert_allclose(a.hboxes, [[x, y, x + w, y + h] for x, y, w, h in tight], atol=1e-4)


def _edit_instances(base, stem, edit):
  path = os.path.join(base, "rhbox_segs_init/ins", stem + ".pkl")
  with open(path, "rb") as f:
    instances = pickle.load(f)
  with open(path, "wb") as f:
    pickle.dump(edit(instances), f)


def test_every_kind_of_bad_input_is_named_skipped_and_counted(sample_dir, tmp_path):
  root = str(tmp_path / "tree")
  shutil.copytree(sample_dir, root)
  base = os.path.join(root, classes.SUBSETS["sota"].base)
  stems = raw.read_split_list(os.path.join(base, "train.txt"))

  def set_poly(value):
    def edit(instances):
      instances[0]["rbox"] = value
      return instances
    return edit

  os.remove(os.path.join(base, "rhbox_segs_init/ins", stems[0] + ".pkl"))              # missing
  _edit_instances(base, stems[1], set_poly([[0, 0], [np.nan, 1], [2, 2], [0, 2]]))   # NaN
  _edit_instances(base, stems[2], set_poly([[1, 1], [1, 1], [5, 5], [1, 1]]))        # 2 points
  def flat_box(instances):
    instances[0]["rhbox"] = [5.0, 5.0, 5.0, 9.0]
    return instances
  _edit_instances(base, stems[3], flat_box)                                          # zero area
  _edit_instances(base, stems[4], set_poly([[0, 0], [2, 2], [4, 4], [6, 6]]))        # collinear
  gray = os.path.join(base, "rhbox_segs_init/gray", stems[5] + ".png")
  Image.fromarray(np.zeros((SAMPLE_SIZE // 2, SAMPLE_SIZE), np.uint8)).save(gray)     # size
  _edit_instances(base, stems[6], lambda instances: [])                              # empty
  info = convert.convert_split(root, "sota", "train", str(tmp_path / "out"), **quiet)
  reasons = {s["image"]: s["reason"] for s in info["skipped"]}
  assert sorted(reasons) == sorted(stems[:7]) and info["num_examples"] == len(stems) - 7
  assert "cannot read" in reasons[stems[0]]
  assert "NaN or inf" in reasons[stems[1]]
  assert "fewer than 3 distinct points" in reasons[stems[2]]
  assert "empty or not finite" in reasons[stems[3]]
  assert "zero area" in reasons[stems[4]]
  assert f"is {SAMPLE_SIZE}x{SAMPLE_SIZE // 2} but the image is" in reasons[stems[5]]
  assert "no instances" in reasons[stems[6]]


def test_reader_skips_corrupt_records_and_stops_past_the_bound(tfrecord_dir, tmp_path):
  import tensorflow as tf
  files = shards.shard_files(tfrecord_dir, "sior", "valid")
  import grain
  good = [r for f in files for r in grain.experimental.TFRecordIterDataset(f)]
  split_dir = tmp_path / "sior" / "valid"
  split_dir.mkdir(parents=True)
  with tf.io.TFRecordWriter(str(split_dir / "sior-valid.tfrecord-00000-of-00001")) as w:
    for i, r in enumerate(good):
      w.write(r)
      if i == 1:
        w.write(b"not an Example")           # framing intact, content garbage
        w.write(r[: len(r) // 2])            # a truncated record
  info = dict(_info(tfrecord_dir, "sior", "valid"))
  info["shards"] = [{"file": "sior-valid.tfrecord-00000-of-00001", "num_examples": len(good) + 2}]
  (split_dir / "dataset_info.json").write_text(json.dumps(info))
  counters = []
  ds = samrs_examples.make_dataset(str(tmp_path), "sior", "valid", image_size=SAMPLE_SIZE, max_instances=8,
                                   batch_size=1, train=False, max_corrupt_fraction=0.5, skip_counter=counters)
  assert sum(int(b["is_real"][0]) for b in ds) == len(good)
  assert counters[0].skipped == 2 and counters[0].seen == len(good) + 2
  strict = samrs_examples.make_dataset(str(tmp_path), "sior", "valid", image_size=SAMPLE_SIZE,
                                       max_instances=8, batch_size=1, train=False, max_corrupt_fraction=0.0,
                                       corrupt_min_seen=1)
  with pytest.raises(DataError, match=r"sior/valid: 1 of 3 records are corrupt"):
    for _ in strict:
      pass


def test_raw_image_format_reads_back_the_same_pixels(sample_dir, tfrecord_dir, tmp_path):
  out = str(tmp_path / "raw")
  info = convert.convert_split(sample_dir, "sior", "train", out, num_shards=2, image_format="raw",
                               **quiet)
  assert info["image_format"] == "raw"
  kw = dict(image_size=SAMPLE_SIZE, max_instances=8, batch_size=4, train=False)
  for a, b in zip(samrs_examples.make_dataset(out, "sior", "train", **kw),
                  samrs_examples.make_dataset(tfrecord_dir, "sior", "train", **kw)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  with pytest.raises(DataError, match="different settings \\(image_format\\)"):
    convert.convert_split(sample_dir, "sior", "train", out, num_shards=2, **quiet)
