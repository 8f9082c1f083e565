"""Rotated-detection finetuning (MTP_SPEC §5.2): the DOTA and DIOR-R native readers, mmrotate's
split of large images into patches, the training / evaluation examples, patch detections merged
back onto their source images, the DOTA Task1 submission and the `:smoke` configs."""

import json
import math
import os
import zipfile

import numpy as np
import pytest
import shapely.geometry

from data_pipelines import convert as convert_cli
from data_pipelines.downstream import detection, detection_releases, dota_split, schema, synthetic
from data_pipelines.downstream.scene_folders import BadSample
from mtp_jax import config as config_lib
from mtp_jax.errors import DataError
from mtp_jax.metrics import patch_merge, submissions
from mtp_jax.ops import boxes as box_ops

from conftest import ROOT

DOTA_SS_128 = detection_releases.DOTA_V1.with_split("ss", size=128, gap=32)   # the sample's patches
BAD_LINES = ("20 20 40 20 40 30 20 30 not-a-class 0\n"       # unknown class
             "10 10 10 10 10 10 10 10 plane 0\n"             # one distinct corner
             "900 900 920 900 920 920 900 920 ship 0\n")     # wholly outside the 280 x 200 image


def read_records(split_dir):
  import grain
  info = json.load(open(os.path.join(split_dir, "dataset_info.json")))
  return [schema.decode(r) for s in info["shards"]
          for r in grain.experimental.TFRecordIterDataset(os.path.join(split_dir, s["file"]))]


@pytest.fixture(scope="module")
def dota_data(tmp_path_factory):
  """A DOTA-v1.0 release (6 train, 3 val, 2 test images of 280 x 200) with three bad objects in
  train/P0000, converted into 128-px patches every 96 px; (release folder, converted dir, log)."""
  raw = str(tmp_path_factory.mktemp("dota_raw"))
  out = str(tmp_path_factory.mktemp("dota_tfrecords"))
  top = synthetic.write_dota(raw, seed=3)
  with open(os.path.join(top, "train", "labelTxt", "P0000.txt"), "a") as f:
    f.write(BAD_LINES)
  log = []
  convert_cli.convert_release(DOTA_SS_128, top, out, log=log.append)
  return top, out, log


# ----------------------------------------------------------------------------------------------
# Native readers
# ----------------------------------------------------------------------------------------------
def test_dota_label_files_are_read_with_their_header_and_difficult_flags(tmp_path):
  path = tmp_path / "P0001.txt"
  path.write_text("imagesource:GoogleEarth\ngsd:0.146343590398\n"
                  "2753 2408 2861 2385 2888 2468 2805 2502 plane 0\n"
                  "\n"
                  "100.5 20 140 20 140 40 100.5 40 small-vehicle 1\n"
                  "1 2 3 2 3 4 1 4 harbor\n")   # the flag is optional (the test set's format)
  polys, names, difficult, header = detection_releases.parse_dota_labels(str(path))
  assert header == {"imagesource": "GoogleEarth", "gsd": 0.146343590398}
  assert names == ["plane", "small-vehicle", "harbor"] and difficult.tolist() == [0, 1, 0]
  np.testing.assert_array_equal(polys[1], [[100.5, 20], [140, 20], [140, 40], [100.5, 40]])
  path.write_text("imagesource:GaoFen2\ngsd:null\n")
  assert detection_releases.parse_dota_labels(str(path))[3] == {"imagesource": "GaoFen2", "gsd": None}
  path.write_text("gsd:0.5\n1 2 3 2 3 4 plane 0\n")
  with pytest.raises(BadSample, match=r"P0001.txt line 2: expected 8 coordinates"):
    detection_releases.parse_dota_labels(str(path))
  path.write_text("1 2 3 2 3 x 1 4 plane 0\n")
  with pytest.raises(BadSample, match="line 1: a coordinate or the difficult flag is not a number"):
    detection_releases.parse_dota_labels(str(path))


def test_dota_conversion_writes_patches_of_the_native_release(dota_data):
  top, out, log = dota_data
  train = json.load(open(os.path.join(out, "dota_v1", "train", "dataset_info.json")))
  valid_dir = os.path.join(out, "dota_v1", "valid")
  valid = json.load(open(os.path.join(valid_dir, "dataset_info.json")))
  assert train["class_names"] == list(detection_releases.DOTA_V1_CLASSES) and len(train["class_names"]) == 15
  # The three bad objects are named, dropped and listed; their image is kept.
  dropped = {d["object"].split(" ", 3)[-1]: d["reason"] for d in train["dropped_objects"]}
  assert len(dropped) == 3 and not train["skipped"]
  assert "'not-a-class' is not one of the 15 classes" in dropped["(not-a-class)"]
  assert "fewer than 3 distinct corners" in dropped["(plane)"] and "outside the 280x200 image" in dropped["(ship)"]
  assert sum("dropping dota_v1/train" in line for line in log) == 3
  # Every window of a valid image is a patch: 128-px windows every 96 px of 280 x 200 images.
  windows = dota_split.sliding_windows(280, 200, DOTA_SS_128.split)
  assert windows.tolist() == [[x, y, x + 128, y + 128] for x in (0, 96, 152) for y in (0, 72)]
  records = read_records(valid_dir)
  assert valid["num_examples"] == len(records) == 3 * len(windows)
  sources = json.load(open(os.path.join(valid_dir, "sources.json")))
  assert sorted(sources) == ["P0006", "P0007", "P0008"]
  from PIL import Image
  for r in records:
    source, size, x, y = dota_split.parse_patch_id(os.path.splitext(os.path.basename(r.filename))[0])
    assert (r.patch_source, r.patch_size, r.patch_x, r.patch_y) == (source, size, x, y) == (source, 128, x, y)
    image = np.asarray(Image.open(os.path.join(top, "val", "images", source + ".png")).convert("RGB"))
    np.testing.assert_array_equal(schema.decode_image(r), image[y:y + 128, x:x + 128])   # in the image: no padding
    a = sources[source]
    polys = np.asarray(a["polygons"]).reshape(-1, 4, 2)
    # The patch's objects are the source's, shifted by the window (none clipped).
    for poly, label in zip(r.polygons, r.object_labels):
      match = np.flatnonzero(np.all(np.abs(polys - (poly + [x, y])) < 1e-3, axis=(1, 2)))
      assert len(match) == 1 and a["labels"][match[0]] == label
    assert json.loads(r.meta)["imagesource"] == "GoogleEarth"
  # The source annotation is the label file's, every field.
  polys, names, difficult, header = detection_releases.parse_dota_labels(os.path.join(top, "val", "labelTxt", "P0007.txt"))
  np.testing.assert_allclose(np.asarray(sources["P0007"]["polygons"]).reshape(-1, 4, 2), polys)
  assert sources["P0007"]["labels"] == [detection_releases.DOTA_V1_CLASSES.index(n) for n in names]
  assert sources["P0007"]["difficult"] == difficult.tolist() and 1 in difficult
  assert sources["P0007"]["meta"] == header and (sources["P0007"]["width"], sources["P0007"]["height"]) == (280, 200)
  # Training patches without objects are not written (mmrotate's filter_empty_gt); test ones are.
  assert all(len(r.object_labels) for r in read_records(os.path.join(out, "dota_v1", "train")))
  test = read_records(os.path.join(out, "dota_v1", "test"))
  assert len(test) == 2 * len(windows) and all(len(r.object_labels) == 0 for r in test)
  assert valid["max_instances_per_image"] == max(len(r.object_labels) for r in records)


def test_dota_conversion_refuses_bad_objects_and_missing_labels_with_strict(dota_data, tmp_path):
  top, _, _ = dota_data
  with pytest.raises(DataError, match=r"P0000.png'.*not-a-class"):
    convert_cli.convert_release(DOTA_SS_128, top, str(tmp_path / "strict"), strict=True, log=lambda _: None)
  with pytest.raises(DataError, match="holds no dota_v1 release: expected train/images/"):
    convert_cli.convert_release(DOTA_SS_128, str(tmp_path), str(tmp_path / "none"), log=lambda _: None)
  with pytest.raises(BadSample, match=r"val/labelTxt/P0099.txt is missing"):
    os.symlink(os.path.join(top, "val", "images", "P0006.png"), os.path.join(top, "val", "images", "P0099.png"))
    try:
      DOTA_SS_128.read(top, "val/images/P0099.png")
    finally:
      os.remove(os.path.join(top, "val", "images", "P0099.png"))


def test_dior_r_xml_and_release_are_read_natively(tmp_path):
  top = synthetic.write_dior_r(str(tmp_path / "raw"), classes=20, seed=1)
  xml = tmp_path / "00001.xml"
  xml.write_text("<annotation><size><width>800</width><height>800</height></size>"
                 "<object><name>Expressway-Service-area</name><difficult>1</difficult><robndbox>"
                 "<x_left_top>10</x_left_top><y_left_top>20</y_left_top><x_right_top>60</x_right_top>"
                 "<y_right_top>20</y_right_top><x_right_bottom>60</x_right_bottom><y_right_bottom>50</y_right_bottom>"
                 "<x_left_bottom>10</x_left_bottom><y_left_bottom>50</y_left_bottom></robndbox><angle>0</angle></object>"
                 "<object><name>vehicle</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>5</xmax><ymax>9</ymax></bndbox></object>"
                 "</annotation>")
  polys, names, difficult, size = detection_releases.parse_dior_xml(str(xml))
  assert names == ["expressway-service-area", "vehicle"] and difficult.tolist() == [1, 0] and size == (800, 800)
  np.testing.assert_array_equal(polys, [[[10, 20], [60, 20], [60, 50], [10, 50]], [[1, 2], [5, 2], [5, 9], [1, 9]]])
  xml.write_text("<annotation><object><name>dam</name><robndbox><x_left_top>1</x_left_top></robndbox></object></annotation>")
  with pytest.raises(BadSample, match=r"object 1 \(dam\): a missing or non-numeric corner"):
    detection_releases.parse_dior_xml(str(xml))
  out = str(tmp_path / "converted")
  infos = convert_cli.convert_release(detection_releases.DIOR_R, top, out, log=lambda _: None)
  assert sorted(infos) == ["test", "train"] and infos["train"]["num_examples"] == 6 + 2   # train + val lists
  train = read_records(os.path.join(out, "dior_r", "train"))
  lists = [open(os.path.join(top, "ImageSets", "Main", f"{n}.txt")).read().split() for n in ("train", "val")]
  assert [os.path.splitext(os.path.basename(r.filename))[0] for r in train] == lists[0] + lists[1]
  r = train[0]
  polys, names, _, _ = detection_releases.parse_dior_xml(
      os.path.join(top, "Annotations", "Oriented Bounding Boxes", lists[0][0] + ".xml"))
  np.testing.assert_allclose(r.polygons, polys)
  assert r.object_labels.tolist() == [detection_releases.DIOR_CLASSES.index(n) for n in names]
  with open(os.path.join(top, "JPEGImages-trainval", lists[0][0] + ".jpg"), "rb") as f:
    assert f.read() == r.image_bytes and not r.patch_source   # whole images, the source bytes


@pytest.fixture(scope="module")
def dior_data(tmp_path_factory):
  """A DIOR / DIOR-R release (12 train, 2 val, 4 test images of 128 px, 4 classes), converted
  for horizontal detection; (release folder, converted dir)."""
  raw = str(tmp_path_factory.mktemp("dior_raw"))
  out = str(tmp_path_factory.mktemp("dior_tfrecords"))
  top = synthetic.write_dior_r(raw, classes=4, per_split=(("train", 12), ("val", 2), ("test", 4)), seed=5)
  convert_cli.convert_release(detection_releases.DIOR, top, out, log=lambda _: None)
  return top, out


def test_dior_horizontal_boxes_are_read_as_their_corners(dior_data):
  top, out = dior_data
  records = read_records(os.path.join(out, "dior", "test"))
  assert len(records) == 4 and all(r.dataset == "dior" for r in records)
  import xml.etree.ElementTree as ET
  for r in records:
    stem = os.path.splitext(os.path.basename(r.filename))[0]
    objects = ET.parse(os.path.join(top, "Annotations", "Horizontal Bounding Boxes", stem + ".xml")).getroot().iter("object")
    boxes = [[float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objects]
    np.testing.assert_array_equal(box_ops.poly_to_hbox(r.polygons.astype(np.float64)), boxes)
    ex = detection.to_example(schema.encode(r), image_size=64, max_instances=16)
    n = len(boxes)
    np.testing.assert_allclose(ex["hboxes"][:n], np.asarray(boxes) / 2, atol=1e-5)   # 128 -> 64 px
    assert ex["valid"][:n].all() and not ex["valid"][n:].any()


def test_dior_smoke_trains_faster_rcnn_and_reports_coco_ap50(dior_data, tmp_path):
  from mtp_jax.train import loop
  _, out = dior_data
  c = config_lib.apply_overrides(config_lib.load_config(f"{ROOT}/configs/finetune/dior.py:smoke"),
                                 [f"data.dir={out!r}", "mesh.num_devices=1"])
  assert c.tasks.hd.enabled and not c.tasks.rd.enabled and c.data.augment.flip_prob == 0.5
  results = loop.train_and_evaluate(c, str(tmp_path))
  losses = [h["loss"] for h in results["train"]["history"]]
  assert losses[-1] < 0.6 * losses[0], losses
  r = results["eval"]["dior"]["hd"]
  assert r["images"] == 4 and np.isfinite(r["AP50"]) and 0 <= r["AP50"] <= 1
  gt = json.load(open(tmp_path / "report" / "coco" / "dior_gt.json"))
  assert len(gt["images"]) == 4 and len(gt["annotations"]) == r["objects"] > 0
  report = open(tmp_path / "report.md").read()
  assert "COCO box AP50" in report and "evaluated on the test split" in report

  # Prediction on a 128-px test image (3 x 3 windows of 64 px, boxes merged by NMS): DOTA Task2
  # lines (id score xmin ymin xmax ymax), one file per class, as many as the summary counts.
  from mtp_jax.predict import Predictor, predict_scene
  image = sorted(os.listdir(os.path.join(dior_data[0], "JPEGImages-test")))[0]
  stem = os.path.splitext(image)[0]
  summary = predict_scene(Predictor.from_workdir(str(tmp_path)), os.path.join(dior_data[0], "JPEGImages-test", image),
                          str(tmp_path / "predicted"), progress=False)
  hd = summary["tasks"]["hd"]
  assert summary["tiles"] == 9 and hd["kind"] == "hboxes" and hd["detections"] <= hd["before_merge"]
  lines = []
  for name in hd["classes"]:
    lines += [line.split() for line in open(tmp_path / "predicted" / f"{stem}_hd_dota" / f"Task2_{name}.txt")]
  assert len(lines) == hd["detections"] and all(len(p) == 6 and p[0] == stem for p in lines)
  boxes = np.array([[float(v) for v in p[2:]] for p in lines]).reshape(-1, 4)
  assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()


def test_xview_smoke_trains_retinanet_and_reports_coco_ap50(xview_data, tmp_path):
  from mtp_jax.train import loop
  _, out, infos = xview_data
  full = config_lib.load_config(f"{ROOT}/configs/finetune/xview.py")
  assert (full.tasks.hd.detector, full.data.image_size, full.tasks.hd.octave_base_scale) == ("retinanet", 416, 4.0)
  c = config_lib.apply_overrides(config_lib.load_config(f"{ROOT}/configs/finetune/xview.py:smoke"),
                                 [f"data.dir={out!r}", "mesh.num_devices=1"])
  results = loop.train_and_evaluate(c, str(tmp_path))
  losses = [h["loss"] for h in results["train"]["history"]]
  assert losses[-1] < 0.8 * losses[0], losses   # focal + L1 from the 0.01 prior
  assert {k.split("/")[-1] for h in results["train"]["history"] for k in h if k.startswith("hd/")} >= {"cls", "bbox"}
  r = results["eval"]["xview"]["hd"]
  assert r["images"] == infos["valid"]["num_examples"] and np.isfinite(r["AP50"])
  assert "COCO box AP50" in open(tmp_path / "report.md").read()


def test_fair1m_xml_and_release_are_read_natively(tmp_path):
  top = synthetic.write_fair1m(str(tmp_path / "raw"), seed=2)
  polys, names, difficult, header = detection_releases.parse_fair1m_xml(
      os.path.join(top, "train", "part1", "labelXml", "0.xml"))
  assert header == {"filename": "0.tif", "origin": "GF2/GF3"} and len(names) == len(polys) == 10
  assert all(n in detection_releases.FAIR1M_CLASSES for n in names) and not difficult.any()
  assert len(detection_releases.FAIR1M_CLASSES) == 37 and "Small Car" in detection_releases.FAIR1M_CLASSES
  assert "other-airplane" in detection_releases.FAIR1M_CLASSES and "Small-Car" not in detection_releases.FAIR1M_CLASSES
  text = open(os.path.join(top, "train", "part1", "labelXml", "0.xml")).read()
  first = text.split("<point>")[1].split("</point>")[0]
  np.testing.assert_allclose(polys[0, 0], [float(v) for v in first.split(",")])   # the closing 5th point dropped
  bad = tmp_path / "bad.xml"
  bad.write_text("<annotation><objects><object><possibleresult><name>Bus</name></possibleresult>"
                 "<points><point>1,2</point><point>3,4</point></points></object></objects></annotation>")
  with pytest.raises(BadSample, match=r"object 1 \(Bus\): 2 points, expected 4"):
    detection_releases.parse_fair1m_xml(str(bad))
  release = detection_releases.FAIR1M.with_split(size=256, gap=64)
  out = str(tmp_path / "converted")
  infos = convert_cli.convert_release(release, top, out, log=lambda _: None)
  assert sorted(infos) == ["test", "train", "valid"]
  train = read_records(os.path.join(out, "fair1m", "train"))
  assert {r.filename.split("/")[1] for r in train} == {"part1", "part2"}   # both parts of train/
  assert {r.patch_size for r in train} == {256} and len({r.patch_source for r in train}) == 4
  assert infos["train"]["signature"]["patch_split"]["sizes"] == [256]


def mtp_xview_patches(img, boxes, size=416):
  """A transcription of MTP's scripts/prepare_xview_dataset.py `clip_xview_yolo` in pixels (its
  YOLO normalisation left out): [(x, y, [(box index, x1, y1, x2, y2) in patch pixels])]."""
  h0, w0 = img.shape[:2]
  img = np.pad(img, ((0, max(0, size - h0)), (0, max(0, size - w0)), (0, 0)), constant_values=128)
  h, w = img.shape[:2]
  y_end, x_end = h - size, w - size
  xs = np.linspace(0, x_end, int(np.ceil(x_end / size)) + 1, endpoint=True).astype("int")
  ys = np.linspace(0, y_end, int(np.ceil(y_end / size)) + 1, endpoint=True).astype("int")
  out = []
  for r in ys:
    for c in xs:
      kept = []
      for i, (x1, y1, x2, y2) in enumerate(boxes):
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        if not (c <= cx < c + size and r <= cy < r + size):
          continue
        x1, y1 = max(x1, c), max(y1, r)
        x2 = c + size - 1 if x2 >= c + size else x2
        y2 = r + size - 1 if y2 >= r + size else y2
        kept.append((i, x1 - c, y1 - r, x2 - c, y2 - r))
      if kept:
        out.append((int(c), int(r), kept))
  return out


@pytest.fixture(scope="module")
def xview_data(tmp_path_factory):
  """An xView release (6 images of 700 x 500, a type-75 object, malformed bounds, a listed but
  missing image), converted; (release folder, converted dir, infos)."""
  top = synthetic.write_xview(str(tmp_path_factory.mktemp("xview_raw")), seed=4)
  out = str(tmp_path_factory.mktemp("xview_tfrecords"))
  infos = convert_cli.convert_release(detection_releases.XVIEW, top, out, seed=0, log=lambda _: None)
  return top, out, infos


def test_xview_patches_are_mtps_and_the_release_is_read_natively(xview_data):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (500, 900, 3), dtype=np.uint8)
  boxes = np.concatenate([rng.uniform(0, 880, (40, 1)), rng.uniform(0, 480, (40, 1))], 1)
  boxes = np.concatenate([boxes, boxes + rng.uniform(4, 60, (40, 2))], 1).round()
  boxes[:, 2:] = np.minimum(boxes[:, 2:], [900, 500])
  ours = detection_releases.xview_patches(image, boxes)
  theirs = mtp_xview_patches(image, boxes)
  assert [(x, y) for x, y, *_ in ours] == [(x, y) for x, y, _ in theirs] and len(ours) == 6   # 3 x 2, spread
  for (x, y, pixels, inside, b), (_, _, kept) in zip(ours, theirs):
    assert inside.tolist() == [k[0] for k in kept]
    np.testing.assert_array_equal(b, [k[1:] for k in kept])
    np.testing.assert_array_equal(pixels, image[y:y + 416, x:x + 416])
  small = detection_releases.xview_patches(image[:300, :200], boxes[:1] * 0 + [10, 10, 30, 30])
  assert len(small) == 1 and small[0][2].shape == (416, 416, 3) and (small[0][2][300:] == 128).all()

  top, out, infos = xview_data
  assert len(detection_releases.XVIEW_CLASSES) == 60 and detection_releases.XVIEW_CLASSES[0] == "Fixed-wing Aircraft"
  train, valid = infos["train"], infos["valid"]
  sources = lambda split: sorted({r.patch_source for r in read_records(os.path.join(out, "xview", split))})
  assert len(sources("train")) == 5 and len(sources("valid")) == 1   # 700 / 846 of the 6 labelled images
  assert not set(sources("train")) & set(sources("valid"))
  reasons = [d["reason"] for d in train["dropped_objects"] + valid["dropped_objects"]]
  assert "type_id 75 is not one of xView's 60 classes" in reasons and any("do not hold 4 numbers" in r for r in reasons)
  assert ["train_images/1395.tif", "listed in xView_train.geojson but missing"] in train["signature"]["not_in_release"]
  geo = json.load(open(os.path.join(top, "xView_train.geojson")))["features"]
  types = {t: i for i, (t, _) in enumerate(detection_releases.XVIEW_TYPES)}
  for r in read_records(os.path.join(out, "xview", "train"))[:4]:
    mine = [f["properties"] for f in geo if f["properties"]["image_id"] == r.patch_source + ".tif"
            and f["properties"]["type_id"] in types]
    want = {(tuple(int(v) for v in p["bounds_imcoords"].split(",")), types[p["type_id"]]) for p in mine}
    for poly, label in zip(r.polygons, r.object_labels):
      x1, y1, x2, y2 = box_ops.poly_to_hbox(poly.astype(np.float64)) + [r.patch_x, r.patch_y] * 2
      assert any(label == l and x1 >= b[0] - 1e-6 and x2 <= b[2] + 1e-6 for b, l in want)   # clipped, never grown
  # The split is seeded: the same seed lists the same training images (written in the info).
  assert detection_releases.XVIEW.splits(top, seed=0)[0]["train"] == [(p, -1) for p in train["signature"]["samples"]]


# ----------------------------------------------------------------------------------------------
# The split (mmrotate img_split)
# ----------------------------------------------------------------------------------------------
def mmrotate_windows(width, height, sizes, gaps, img_rate_thr=0.6):
  """A transcription of mmrotate's tools/data/dota/split/img_split.py get_sliding_window."""
  windows = []
  for size, gap in zip(sizes, gaps):
    step = size - gap
    x_num = 1 if width <= size else math.ceil((width - size) / step + 1)
    x_start = [step * i for i in range(x_num)]
    if len(x_start) > 1 and x_start[-1] + size > width:
      x_start[-1] = width - size
    y_num = 1 if height <= size else math.ceil((height - size) / step + 1)
    y_start = [step * i for i in range(y_num)]
    if len(y_start) > 1 and y_start[-1] + size > height:
      y_start[-1] = height - size
    start = np.array([(x, y) for x in x_start for y in y_start], np.int64)
    windows.append(np.concatenate([start, start + size], axis=1))
  windows = np.concatenate(windows, axis=0)
  w = windows.copy()
  w[:, 0::2] = np.clip(w[:, 0::2], 0, width)
  w[:, 1::2] = np.clip(w[:, 1::2], 0, height)
  rates = (w[:, 2] - w[:, 0]) * (w[:, 3] - w[:, 1]) / ((windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1]))
  if not (rates > img_rate_thr).any():
    rates[abs(rates - rates.max()) < 0.01] = 1
  return windows[rates > img_rate_thr]


@pytest.mark.parametrize("width,height", [(2000, 1500), (1024, 1024), (800, 600), (4000, 700), (1100, 5000)])
def test_sliding_windows_are_mmrotates(width, height):
  for config in (dota_split.SPLIT_SS, dota_split.SPLIT_MS):
    sizes, gaps = zip(*config.windows_and_gaps())
    np.testing.assert_array_equal(dota_split.sliding_windows(width, height, config),
                                  mmrotate_windows(width, height, sizes, gaps))
  assert dota_split.SPLIT_MS.windows_and_gaps() == [(2048, 1000), (1024, 500), (682, 333)]
  starts = sorted({int(x) for x in dota_split.sliding_windows(2000, 1500, dota_split.SPLIT_SS)[:, 0]})
  assert starts == [0, 824, 976]   # the last window moved back to end at the edge


def test_split_keeps_an_object_whole_in_the_patch_that_contains_it():
  windows = np.array([[0, 0, 100, 100], [60, 0, 160, 100]])
  whole = box_ops.rbox_to_poly(np.array([30.0, 50, 30, 10, 0.4]))      # inside window 0 only
  cut = box_ops.rbox_to_poly(np.array([95.0, 50, 20, 8, 0.0]))         # 3/4 in window 0, all in 1
  mostly_out = box_ops.rbox_to_poly(np.array([155.0, 20, 40, 10, 0]))  # 25 of its 40 px in window 1
  polys = np.stack([whole, cut, mostly_out])
  iof = dota_split.polygon_window_iof(polys, windows)
  for n, p in enumerate(polys):   # shapely's IoF as the oracle
    for k, w in enumerate(windows):
      shape = shapely.geometry.Polygon(p)
      assert iof[n, k] == pytest.approx(shape.intersection(shapely.geometry.box(*w)).area / shape.area)
  assert iof[1].tolist() == pytest.approx([0.75, 1.0]) and iof[2].tolist() == pytest.approx([0, 0.625])
  (k0, p0, f0), (k1, p1, f1) = dota_split.split_objects(polys, [0, 1, 2], [1, 0, 0], windows)
  assert k0.tolist() == [0, 1] and f0.tolist() == [1, 2]   # whole: its own flag; cut (IoF 0.75): 2
  np.testing.assert_allclose(p0[0], whole)                  # whole, unclipped, unmoved
  assert k1.tolist() == [1] and f1.tolist() == [0]          # IoF 0.625 < 0.7: not in window 1
  np.testing.assert_allclose(p1[0], cut - [60, 0])
  padded = dota_split.crop_window(np.zeros((80, 120, 3), np.uint8), [60, 0, 160, 100])
  assert padded.shape == (100, 100, 3) and (padded[80:] == dota_split.PADDING_RGB).all()
  assert (padded[:, 60:] == dota_split.PADDING_RGB).all() and (padded[:80, :60] == 0).all()
  with pytest.raises(ValueError, match="not a patch id"):
    dota_split.parse_patch_id("P0001_1024_0_0")


# ----------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------
def test_detection_examples_keep_boxes_on_their_objects(dota_data):
  _, out, _ = dota_data
  import grain
  raws = list(grain.experimental.TFRecordIterDataset(
      os.path.join(out, "dota_v1", "valid", "dota_v1-valid.tfrecord-00000-of-00001")))
  raw = max(raws, key=lambda r: len(schema.decode(r).object_labels))   # the patch with most objects
  record = schema.decode(raw)
  ex = detection.to_example(raw, image_size=64, max_instances=40)
  n = len(record.object_labels)
  assert n >= 3
  assert ex["patch_scale"] == 0.5 and ex["patch_origin"].tolist() == [record.patch_x, record.patch_y]
  assert str(ex["source_id"]) == record.patch_source and str(ex["image_id"]).startswith(record.patch_source + "__128__")
  np.testing.assert_allclose(ex["rboxes"][:n], box_ops.quad_to_rbox_min_area(record.polygons) * [.5, .5, .5, .5, 1],
                             atol=1e-4)
  assert ex["labels"][:n].tolist() == record.object_labels.tolist() and ex["rbox_valid"].sum() == n
  assert ex["difficult"][:n].tolist() == (record.difficult != 0).tolist() and not ex["difficult"][n:].any()
  assert set(detection.example_shapes(64, 40)) == {k for k, v in ex.items() if not isinstance(v, np.str_)}
  # Training: resize, flips and RandomRotate move each object's box with its pixels.
  sample = detection.record_sample(record)
  for degrees in (90.0, -37.0, 180.0):
    turned = detection.rotate(sample, degrees)
    for i in np.flatnonzero(turned["rbox_valid"]):
      cx, cy = turned["rboxes"][i, :2]
      colour = turned["image"][int(cy), int(cx)].astype(int)
      assert np.abs(colour - sample["image"][int(sample["rboxes"][i, 1]), int(sample["rboxes"][i, 0])]).max() < 40
      np.testing.assert_allclose(turned["rboxes"][i, 2:4], sample["rboxes"][i, 2:4], rtol=1e-5)
  quarter = detection.rotate(sample, 90.0)   # clockwise on screen: (x, y) -> (H - y, x) for a square
  keep = quarter["rbox_valid"]
  np.testing.assert_allclose(quarter["rboxes"][keep, 0], 128 - sample["rboxes"][keep, 1], atol=1e-3)
  np.testing.assert_allclose(quarter["rboxes"][keep, 1], sample["rboxes"][keep, 0], atol=1e-3)
  rng = np.random.default_rng(0)
  ex = detection.to_example(raw, image_size=64, max_instances=40, rotate_prob=1.0, rect_classes=(9, 11), rng=rng)
  assert ex["image"].shape == (64, 64, 3) and ex["rbox_valid"].sum() <= n


def test_quadrilaterals_become_mmrotates_minimum_area_rectangles():
  import cv2
  from mtp_jax.ops.iou import box_iou_rotated
  rects = box_ops.rbox_to_poly(np.array([[50.0, 40, 30, 10, 0.3], [20, 20, 8, 8, 0.0], [5, 9, 4, 12, -1.2]]))
  got = box_ops.quad_to_rbox_min_area(rects)
  np.testing.assert_allclose(box_iou_rotated(got, box_ops.poly_to_rbox(rects), aligned=True), 1, atol=1e-5)
  assert (got[:, 2] >= got[:, 3]).all() and (np.abs(got[:, 4] + np.pi / 4) <= 3 * np.pi / 4).all()
  quad = np.array([[0.0, 0], [10, 1], [11, 6], [-1, 5]])   # DOTA quadrilaterals need not be rectangles
  r = box_ops.quad_to_rbox_min_area(quad[None])[0]
  (_, _), (w, h), _ = cv2.minAreaRect(quad.astype(np.float32))
  assert r[2] * r[3] == pytest.approx(w * h, rel=1e-5) and r[2] >= r[3] and -np.pi / 2 <= r[4] < np.pi / 2
  hull = shapely.geometry.Polygon(box_ops.rbox_to_poly(r)).buffer(1e-3)
  assert all(hull.contains(shapely.geometry.Point(p)) for p in quad)   # it encloses the quadrilateral


# ----------------------------------------------------------------------------------------------
# Merging and submission
# ----------------------------------------------------------------------------------------------
def test_merged_patch_detections_give_the_whole_image_detection():
  # A source image of 300 x 200 cut into windows [0, 200) and [100, 300) (x), one object at
  # x = 150, far from both windows' borders, detected in both (examples at half size).
  whole = np.array([150.0, 90, 40, 12, 0.3, 0.9])
  other = np.array([30.0, 40, 20, 10, -0.5, 0.6])            # in window 0 only
  scale = 0.5

  def seen_from(x0, det, score):
    d = det.copy()
    d[:2] -= [x0, 0]
    d[:4] *= scale
    d[5] = score
    return d

  patches = [("P1", [patch_merge.to_source(np.stack([seen_from(0, whole, 0.9), seen_from(0, other, 0.6)]), (0, 0), scale),
                     patch_merge.to_source(seen_from(0, whole, 0.4)[None], (0, 0), scale)]),   # class 1 there too
             ("P1", [patch_merge.to_source(seen_from(100, whole, 0.8)[None] + [0.2, -0.1, 0, 0, 0, 0], (100, 0), scale),
                     np.zeros((0, 6))])]
  merged = patch_merge.merge_patches(patches, num_classes=2)
  np.testing.assert_allclose(merged["P1"][0], np.stack([whole, other]), atol=1e-9)   # one each
  np.testing.assert_allclose(merged["P1"][1], [[*whole[:5], 0.4]], atol=1e-9)        # classes apart
  # Greedy: a box suppresses only the lower-scored ones it overlaps by IoU > 0.1.
  dets = np.array([[50, 50, 20, 10, 0, 0.5], [51, 50, 20, 10, 0, 0.9], [90, 50, 20, 10, 0, 0.7]])
  assert patch_merge.nms_rotated_host(dets).tolist() == [1, 2]


def test_dota_task1_submission_parses_back_to_the_merged_detections(dota_data, tmp_path):
  from mtp_jax.tasks import rotated_detection
  _, out, _ = dota_data
  c = config_lib.load_config(f"{ROOT}/configs/finetune/dota_v1.py:smoke")
  c = config_lib.apply_overrides(c, [f"data.dir={out!r}"])
  task = rotated_detection.RotatedDetection(c.tasks.rd, c.data, c.eval, {"dota_v1": list(detection_releases.DOTA_V1_CLASSES)})
  evaluation = task.evaluator()
  rng = np.random.default_rng(0)
  sent = {}
  for image in ("P0006", "P0007"):
    per_class = [np.zeros((0, 6)) for _ in range(15)]
    for c_ in (0, 4):
      d = np.concatenate([rng.uniform([20, 20, 10, 5, -1.5], [250, 180, 60, 20, 1.5], (3, 5)),
                          rng.uniform(0.06, 1, (3, 1))], 1)
      per_class[c_] = d
    sent[image] = per_class
    evaluation.evaluators["dota_v1"].add(image, per_class, {"rboxes": np.zeros((0, 5)), "labels": np.zeros(0, int)})
  folder = evaluation.write_submissions(str(tmp_path), fair1m=True)["dota_v1"]
  assert folder == str(tmp_path / "dota_task1" / "dota_v1")
  with zipfile.ZipFile(os.path.join(folder, "Task1.zip")) as z:
    assert sorted(z.namelist()) == sorted(f"Task1_{n}.txt" for n in detection_releases.DOTA_V1_CLASSES)
  os.remove(os.path.join(folder, "Task1_plane.txt"))   # read from the zip, the file the server takes
  back = submissions.read_dota_task1(folder, detection_releases.DOTA_V1_CLASSES)
  assert sorted(back) == ["P0006", "P0007"]
  xml_folder = tmp_path / "fair1m_xml" / "dota_v1"
  with zipfile.ZipFile(xml_folder / "test.zip") as z:
    assert sorted(z.namelist()) == ["P0006.xml", "P0007.xml"]
  for image, per_class in sent.items():
    xml = submissions.read_fair1m_xml(str(xml_folder / f"{image}.xml"), detection_releases.DOTA_V1_CLASSES)
    for c_, d in enumerate(per_class):
      order = np.argsort(-d[:, 5], kind="stable")
      for got, corner_tol in ((back[image][c_], 5e-3), (xml[c_], 5e-6)):
        np.testing.assert_allclose(got[:, 0], d[order, 5], atol=5e-7)
        np.testing.assert_allclose(got[:, 1:].reshape(-1, 4, 2), box_ops.rbox_to_poly(d[order, :5]), atol=corner_tol)
  assert open(xml_folder / "P0006.xml").read().count("<point>") == 5 * 6   # 4 corners + the first again


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def test_detection_configs_hold_the_papers_settings():
  dior = config_lib.load_config(f"{ROOT}/configs/finetune/dior_r.py")
  v1 = config_lib.load_config(f"{ROOT}/configs/finetune/dota_v1.py")
  v2 = config_lib.load_config(f"{ROOT}/configs/finetune/dota_v2.py")
  fair1m = config_lib.load_config(f"{ROOT}/configs/finetune/fair1m.py")
  assert (fair1m.data.image_size, fair1m.tasks.rd.submission, fair1m.data.rotate_prob) == (800, "fair1m", 0.5)
  assert v1.tasks.rd.submission == "dota"
  for name in ("dior_r", "dota_v2", "fair1m"):   # their smokes load and validate (dota_v1's trains below)
    smoke = config_lib.load_config(f"{ROOT}/configs/finetune/{name}.py:smoke")
    assert smoke.data.image_size == 64 and smoke.tasks.rd.neck_channels == 32
  assert (dior.data.image_size, v1.data.image_size, v2.data.image_size) == (800, 1024, 1024)
  assert (dior.optimizer.lr, dior.optimizer.warmup_steps, dior.optimizer.schedule) == (1e-4, 500, "step")
  assert tuple(dior.optimizer.decay_steps) == (8 * 2931, 11 * 2931) and dior.train.num_steps == 12 * 2931
  assert tuple(v2.optimizer.decay_steps) == (24 * 4389, 32 * 4389, 38 * 4389) and v2.train.num_steps == 40 * 4389
  assert (v1.data.rotate_prob, v2.data.rotate_prob, dior.data.rotate_prob) == (0.5, 0.0, 0.0)
  assert v1.tasks.rd.merge_patches and v2.tasks.rd.merge_patches and not dior.tasks.rd.merge_patches
  assert dior.eval.split == "test" and v1.data.batch_per_subset == 4 and v1.model.drop_path_rate == 0.3
  assert v1.tasks.rd.init == "mmdet" and config_lib.load_config(f"{ROOT}/configs/finetune/dior.py").tasks.hd.init == "mmdet"
  from mtp_jax.train.optimizer import learning_rate_schedule
  lr = learning_rate_schedule(dior)
  got = [float(lr(s)) for s in (0, 250, 500, 8 * 2931 - 1, 8 * 2931, 11 * 2931, dior.train.num_steps)]
  np.testing.assert_allclose(got, [0, 5e-5, 1e-4, 1e-4, 1e-5, 1e-6, 1e-6], rtol=1e-6)
  with pytest.raises(config_lib.ConfigError, match="data.rotate_prob = 0.5 rotates detection images"):
    config_lib.apply_overrides(config_lib.load_config(f"{ROOT}/configs/finetune/loveda.py"),
                               ["data.rotate_prob=0.5"])


def test_dota_smoke_trains_and_reports_the_merged_map(dota_data, tmp_path):
  from mtp_jax.train import loop
  _, out, _ = dota_data
  c = config_lib.apply_overrides(config_lib.load_config(f"{ROOT}/configs/finetune/dota_v1.py:smoke"),
                                 [f"data.dir={out!r}", "mesh.num_devices=1"])
  assert c.data.image_size == 64 and c.data.max_instances["dota_v1"] == 32 and c.tasks.rd.merge_patches
  results = loop.train_and_evaluate(c, str(tmp_path))
  losses = [h["loss"] for h in results["train"]["history"]]
  assert losses[-1] < 0.6 * losses[0], losses
  r = results["eval"]["dota_v1"]["rd"]
  assert r["images"] == 3 and np.isfinite(r["map"])   # the three merged source images, not 18 patches
  sources = json.load(open(os.path.join(out, "dota_v1", "valid", "sources.json")))
  assert sum(r["num_objects"].values()) == sum(d == 0 for s in sources.values() for d in s["difficult"])
  back = submissions.read_dota_task1(
      os.path.join(tmp_path, "report", "dota_task1", "dota_v1"), detection_releases.DOTA_V1_CLASSES)
  assert set(back) <= set(sources) and sum(len(d) for v in back.values() for d in v) == sum(r["num_detections"].values())
  metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert any("eval/dota_v1/rd/map" in m for m in metrics)
  assert "Rotated detection: DOTA mAP" in open(tmp_path / "report.md").read()
