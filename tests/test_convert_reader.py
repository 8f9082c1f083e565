"""Converter + reader: an exact round trip of the sample, clear errors, shard split, exact resume."""

import json
import os
import pickle
import shutil

import grain
import numpy as np
import pytest
from PIL import Image

from data_pipelines.records import shards
from data_pipelines.samrs import classes, convert, raw, schema
from data_pipelines.samrs import examples as samrs_examples
from mtp_jax.errors import DataError
from mtp_jax.ops import boxes

from conftest import SAMPLE_SIZE


def _source(sample_dir, name, stem):
  layout = classes.SUBSETS[name]
  base = os.path.join(sample_dir, layout.base)
  image = np.asarray(Image.open(os.path.join(base, layout.images, stem + layout.image_ext)).convert("RGB"))
  gray = np.asarray(Image.open(os.path.join(base, layout.segs, "gray", stem + ".png")))
  with open(os.path.join(base, layout.segs, "ins", stem + ".pkl"), "rb") as f:
    instances = pickle.load(f)
  return image, gray, instances


@pytest.mark.parametrize("name", ["sota", "sior", "fast"])
@pytest.mark.parametrize("split", ["train", "valid"])
def test_round_trip_is_exact(sample_dir, tfrecord_dir, name, split):
  info = shards.load_info(tfrecord_dir, name, split)
  stems = raw.read_split_list(os.path.join(sample_dir, classes.SUBSETS[name].base, f"{split}.txt"))
  assert info["num_examples"] == len(stems) and info["skipped"] == []
  assert info["class_names"] == list(classes.SUBSETS[name].classes)
  ds = samrs_examples.make_dataset(tfrecord_dir, name, split, image_size=SAMPLE_SIZE, max_instances=64,
                                   batch_size=1, train=False)
  records = [schema.decode(r) for f in shards.shard_files(tfrecord_dir, name, split)
             for r in grain.experimental.TFRecordIterDataset(f)]
  seen = 0
  for batch, record in zip(ds, records):
    stem = os.path.splitext(record.filename)[0]
    assert stem == stems[seen]
    image, gray, instances = _source(sample_dir, name, stem)
    np.testing.assert_array_equal(batch["image"][0], image)
    np.testing.assert_array_equal(batch["semantic"][0], (gray.astype(np.int32) + 1) % 256)
    n = len(instances)
    assert batch["num_instances"][0] == n and batch["valid"][0].sum() == n
    np.testing.assert_array_equal(batch["labels"][0, :n], [i["label"] for i in instances])
    hbox = [i["rhbox"] if "rhbox" in i else i["bbox"] for i in instances]
    np.testing.assert_array_equal(batch["hboxes"][0, :n], np.float32(hbox))
    assert record.mask_rles == [i["mask"]["counts"].encode() for i in instances]
    np.testing.assert_array_equal(record.areas, [i["size"] for i in instances])
    if name != "sior":
      polys = np.asarray([i["rbox"] for i in instances])
      np.testing.assert_array_equal(record.polygons, np.float32(polys))
      np.testing.assert_array_equal(batch["rboxes"][0, :n], np.float32(boxes.poly_to_rbox(polys)))
    seen += 1
  assert seen == len(stems) == len(records)


def test_resize_scales_boxes(tfrecord_dir):
  full = next(iter(samrs_examples.make_dataset(tfrecord_dir, "sota", "valid", image_size=SAMPLE_SIZE,
                                               max_instances=8, batch_size=1, train=False)))
  half = next(iter(samrs_examples.make_dataset(tfrecord_dir, "sota", "valid", image_size=SAMPLE_SIZE // 2,
                                               max_instances=8, batch_size=1, train=False)))
  assert half["image"].shape == (1, SAMPLE_SIZE // 2, SAMPLE_SIZE // 2, 3)
  np.testing.assert_allclose(half["rboxes"][..., :4], full["rboxes"][..., :4] / 2, rtol=1e-6)
  np.testing.assert_array_equal(half["rboxes"][..., 4], full["rboxes"][..., 4])


def test_instance_cap_pads_and_counts(tfrecord_dir):
  batch = next(iter(samrs_examples.make_dataset(tfrecord_dir, "fast", "train", image_size=SAMPLE_SIZE,
                                                max_instances=2, batch_size=4, train=False)))
  assert batch["labels"].shape == (4, 2)
  assert (batch["valid"].sum(1) == np.minimum(batch["num_instances"], 2)).all()
  assert (batch["num_instances"] > 2).any()  # the cap really truncated something


def test_bad_files_are_skipped_with_reasons_or_fail_in_strict_mode(sample_dir, tmp_path):
  root = str(tmp_path / "tree")
  shutil.copytree(sample_dir, root)
  base = os.path.join(root, classes.SUBSETS["sota"].base)
  stems = raw.read_split_list(os.path.join(base, "train.txt"))
  with open(os.path.join(base, "images", stems[0] + ".png"), "r+b") as f:
    f.truncate(100)  # truncated image
  with open(os.path.join(base, "rhbox_segs_init/ins", stems[1] + ".pkl"), "wb") as f:
    pickle.dump({"not": "a list"}, f)  # pickle of the wrong structure
  with open(os.path.join(base, "rhbox_segs_init/ins", stems[2] + ".pkl"), "rb") as f:
    instances = pickle.load(f)
  instances[0]["label"] = 99  # label outside the class list
  with open(os.path.join(base, "rhbox_segs_init/ins", stems[2] + ".pkl"), "wb") as f:
    pickle.dump(instances, f)
  info = convert.convert_split(root, "sota", "train", str(tmp_path / "out"), log=lambda *_: None)
  reasons = {s["image"]: s["reason"] for s in info["skipped"]}
  assert set(reasons) == set(stems[:3]) and info["num_examples"] == len(stems) - 3
  assert "cannot be decoded" in reasons[stems[0]]
  assert "expected a list of dicts" in reasons[stems[1]]
  assert "label 99 outside the 18 sota classes" in reasons[stems[2]]
  with open(os.path.join(str(tmp_path / "out"), "sota", "train", "dataset_info.json")) as f:
    assert json.load(f)["skipped"] == info["skipped"]
  with pytest.raises(DataError, match=stems[0]):
    convert.convert_split(root, "sota", "train", str(tmp_path / "strict"), strict=True)
  assert not os.path.exists(tmp_path / "strict" / "sota")  # nothing half-written


def test_not_a_samrs_tree_is_one_clear_error(tmp_path):
  with pytest.raises(DataError, match=r"not a SAMRS tree for subset 'sior': missing \S*/dior \(expected"):
    convert.convert_split(str(tmp_path), "sior", "train", str(tmp_path / "out"))
  with pytest.raises(DataError, match="not a converted SAMRS TFRecord folder"):
    shards.load_info(str(tmp_path), "sota", "train")


def test_cli_prints_one_line_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    convert.main(["--root", str(tmp_path), "--subset", "fast", "--split", "train", "--out", str(tmp_path / "o")])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_two_hosts_see_disjoint_shards_covering_the_split(tfrecord_dir):
  files = [shards.shard_files(tfrecord_dir, "sota", "train", i, 2) for i in range(2)]
  assert not set(files[0]) & set(files[1])
  assert sorted(files[0] + files[1]) == shards.shard_files(tfrecord_dir, "sota", "train")
  names = []
  for i in range(2):
    ds = samrs_examples.make_dataset(tfrecord_dir, "sota", "train", image_size=SAMPLE_SIZE, max_instances=4,
                                     batch_size=1, train=False, process_index=i, process_count=2)
    names.append({hash(b["image"].tobytes()) for b in ds})
  assert not names[0] & names[1] and len(names[0] | names[1]) == 12
  with pytest.raises(DataError, match="fewer than the 3 readers"):
    shards.shard_files(tfrecord_dir, "sota", "train", 2, 3)


def test_iterator_state_restores_the_exact_stream(tfrecord_dir):
  kw = dict(image_size=SAMPLE_SIZE, max_instances={"sota": 4, "sior": 4, "fast": 4}, batch_size=2,
            seed=3, shuffle_window=8)
  a = samrs_examples.train_batches(tfrecord_dir, ("sota", "sior", "fast"), **kw)
  for _ in range(7):  # past the end of an epoch (12 images / 2 per batch = 6 batches)
    next(a)
  state = json.loads(json.dumps(a.get_state()))  # it must survive JSON (the checkpoint item)
  expected = [next(a) for _ in range(8)]
  b = samrs_examples.train_batches(tfrecord_dir, ("sota", "sior", "fast"), **kw)
  b.set_state(state)
  for want in expected:
    got = next(b)
    for s in want:
      np.testing.assert_array_equal(got[s]["image"], want[s]["image"])
  first_epoch = [next(samrs_examples.train_batches(tfrecord_dir, ("sota",), **{**kw, "seed": 4}))["sota"]["image"]]
  assert not np.array_equal(first_epoch[0], expected[0]["sota"]["image"])
  a.close(), b.close()


def test_streams_make_the_global_batch_independent_of_the_process_count(tfrecord_dir):
  kw = dict(image_size=SAMPLE_SIZE, max_instances={"sota": 4}, seed=3, shuffle_window=8, num_streams=2)
  one = samrs_examples.train_batches(tfrecord_dir, ("sota",), batch_size=4, streams=(0, 1), **kw)
  hosts = [samrs_examples.train_batches(tfrecord_dir, ("sota",), batch_size=2, streams=(j,), **kw) for j in range(2)]
  for _ in range(3):
    got = next(one)["sota"]["image"]
    parts = [next(h)["sota"]["image"] for h in hosts]
    np.testing.assert_array_equal(got, np.concatenate(parts))   # process 0's rows, then process 1's
  # The streams read disjoint shards, and the merged state of two "hosts" restores the one reader.
  assert not set(shards.shard_files(tfrecord_dir, "sota", "train", 0, 2)) & set(shards.shard_files(tfrecord_dir, "sota", "train", 1, 2))
  merged = {"num_streams": 2, "streams": {**hosts[0].get_state()["streams"], **hosts[1].get_state()["streams"]}}
  again = samrs_examples.train_batches(tfrecord_dir, ("sota",), batch_size=4, streams=(0, 1), **kw)
  again.set_state(json.loads(json.dumps(merged)))
  np.testing.assert_array_equal(next(again)["sota"]["image"], next(one)["sota"]["image"])
  with pytest.raises(DataError, match="data.num_streams=2"):
    samrs_examples.train_batches(tfrecord_dir, ("sota",), batch_size=4, **{**kw, "num_streams": 1, "streams": (0,)}).set_state(merged)
  for r in [one, again, *hosts]:
    r.close()
