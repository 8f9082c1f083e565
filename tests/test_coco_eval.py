"""coco_ap equals pycocotools run directly (COCO json files on disk, COCO.loadRes, COCOeval) on the
same boxes and masks; per-class AP read as mmdet does; two simulated hosts equal one."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mtp_jax.metrics import coco_ap
from mtp_jax.metrics.coco import STAT_NAMES, CocoEvaluator

H, W, CLASSES = 48, 64, 3


def random_dataset(seed, images=5):
  """Ground truth with masks (rectangles and ellipses) and detections near them plus noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:H, :W]
  annotations, detections = [], []
  for _ in range(images):
    m = int(rng.integers(1, 6))
    boxes, masks = [], []
    for _ in range(m):
      x1, y1 = rng.uniform(0, W - 12), rng.uniform(0, H - 12)
      x2, y2 = x1 + rng.uniform(4, 30), y1 + rng.uniform(4, 30)
      x2, y2 = min(x2, W), min(y2, H)
      if rng.random() < 0.5:
        mask = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
      else:
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        mask = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1
      boxes.append([x1, y1, x2, y2])
      masks.append(mask)
    labels = rng.integers(0, CLASSES, m)
    annotations.append({"hboxes": np.asarray(boxes), "labels": labels, "masks": np.asarray(masks),
                        "iscrowd": rng.random(m) < 0.1, "height": H, "width": W})
    keep = rng.random(m) < 0.8
    d_boxes = np.asarray(boxes)[keep] + rng.normal(0, 1.5, (int(keep.sum()), 4))
    d_masks = [np.roll(mk, int(rng.integers(-2, 3)), axis=1) for mk in np.asarray(masks)[keep]]
    k = int(rng.integers(0, 3))
    for _ in range(k):   # false positives
      x1, y1 = rng.uniform(0, W - 10), rng.uniform(0, H - 10)
      d_boxes = np.r_[d_boxes, [[x1, y1, x1 + 8, y1 + 8]]]
      d_masks.append((xx >= x1) & (xx < x1 + 8) & (yy >= y1) & (yy < y1 + 8))
    d_labels = np.r_[labels[keep], rng.integers(0, CLASSES, k)]
    detections.append({"hboxes": d_boxes, "scores": rng.random(len(d_boxes)), "labels": d_labels,
                       "masks": np.asarray(d_masks).reshape(-1, H, W)})
  return detections, annotations


def pycocotools_directly(detections, annotations, iou_type, tmp_path):
  """The reference: COCO json written to disk by hand and scored by pycocotools alone."""
  images, anns, results = [], [], []
  for i, a in enumerate(annotations):
    images.append({"id": 100 + i, "width": W, "height": H, "file_name": f"{i}.png"})
    for k in range(len(a["labels"])):
      rle = mask_utils.encode(np.asfortranarray(a["masks"][k].astype(np.uint8)))
      x1, y1, x2, y2 = a["hboxes"][k]
      anns.append({"id": 1000 + len(anns), "image_id": 100 + i, "category_id": int(a["labels"][k]) + 1,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask_utils.area(rle)),
                   "iscrowd": int(a["iscrowd"][k]),
                   "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
  for i, d in enumerate(detections):
    for k in range(len(d["labels"])):
      x1, y1, x2, y2 = d["hboxes"][k]
      r = {"image_id": 100 + i, "category_id": int(d["labels"][k]) + 1, "score": float(d["scores"][k]),
           "bbox": [x1, y1, x2 - x1, y2 - y1]}
      if iou_type == "segm":
        rle = mask_utils.encode(np.asfortranarray(d["masks"][k].astype(np.uint8)))
        r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
      results.append(r)
  gt_file, dt_file = tmp_path / "gt.json", tmp_path / f"dt_{iou_type}.json"
  gt_file.write_text(json.dumps({"images": images, "annotations": anns,
                                 "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(CLASSES)]}))
  dt_file.write_text(json.dumps(results))
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(str(gt_file))
    ev = COCOeval(gt, gt.loadRes(str(dt_file)), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_coco_ap_equals_pycocotools_run_directly(iou_type, seed, tmp_path):
  detections, annotations = random_dataset(seed)
  ours = coco_ap(detections, annotations, CLASSES, iou_type=iou_type, class_names=["c0", "c1", "c2"])
  ref = pycocotools_directly(detections, annotations, iou_type, tmp_path)
  np.testing.assert_array_equal([ours[n] for n in STAT_NAMES], ref.stats)
  assert 0.05 < ours["AP"] < 0.95 and ours["AP50"] >= ours["AP75"]   # a case with something to rank
  for k, name in enumerate(["c0", "c1", "c2"]):   # per class as mmdet's classwise table
    p = ref.eval["precision"][:, :, k, 0, -1]
    assert ours["ap_per_class"][name] == pytest.approx(p[p > -1].mean())
    p50 = ref.eval["precision"][0, :, k, 0, -1]
    assert ours["ap50_per_class"][name] == pytest.approx(p50[p50 > -1].mean())


def test_no_detections_scores_zero_and_segm_needs_masks():
  _, annotations = random_dataset(2, images=2)
  empty = [{"hboxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}] * 2
  assert coco_ap(empty, annotations, CLASSES)["AP"] == 0.0
  no_masks = [{k: v for k, v in a.items() if k != "masks"} for a in annotations]
  with pytest.raises(ValueError, match=r"annotations\[0\] has no masks"):
    coco_ap(empty, no_masks, CLASSES, iou_type="segm")


def test_evaluation_split_over_two_hosts_equals_one():
  detections, annotations = random_dataset(3, images=6)
  one, hosts = CocoEvaluator(CLASSES, iou_type="segm"), [CocoEvaluator(CLASSES, iou_type="segm") for _ in range(2)]
  for i, (d, a) in enumerate(zip(detections, annotations)):
    one.add(i, d, a)
    hosts[i % 2].add(i, d, a)
  merged = CocoEvaluator(CLASSES, iou_type="segm")
  merged.merge([h.state() for h in reversed(hosts)])
  assert merged.result() == one.result()


# ---- masks as RLEs, images with their own ids, COCO files -----------------------------------------

STEMS = ["P0042_0_448", "a_7", "P0001_0_448", "zz", "P0042_448_0", "b"]


def with_rles(records, form):
  """The records with their masks as RLEs in one of the accepted forms (no dense masks left)."""
  out = []
  for k, r in enumerate(records):
    rles = [dict(mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))) for m in r["masks"]]
    if form == "counts":   # bare compressed counts, str and bytes
      rles = [x["counts"].decode() if j % 2 else x["counts"] for j, x in enumerate(rles)]
    elif form == "mixed":  # dicts with bytes, str and uncompressed counts
      rles = [x if j % 3 == 0 else {"size": x["size"], "counts": x["counts"].decode()} if j % 3 == 1
              else uncompressed(r["masks"][j]) for j, x in enumerate(rles)]
    out.append({**{key: v for key, v in r.items() if key != "masks"}, "rles": rles})
  return out


def uncompressed(mask):
  flat = mask.astype(np.uint8).reshape(-1, order="F")
  edges = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
  return {"size": list(mask.shape), "counts": np.diff(np.r_[0, edges]).tolist()}


@pytest.mark.parametrize("form", ["dicts", "counts", "mixed"])
def test_rles_give_the_same_ap_as_dense_masks(form):
  detections, annotations = random_dataset(4, images=6)
  for iou_type in ("bbox", "segm"):
    dense = coco_ap(detections, annotations, CLASSES, iou_type=iou_type)
    rle = coco_ap(with_rles(detections, form), with_rles(annotations, form), CLASSES, iou_type=iou_type)
    assert rle == dense
  assert 0.05 < dense["AP"] < 0.95


def test_image_ids_are_sorted_stems_whatever_the_order():
  detections, annotations = random_dataset(5, images=6)
  from mtp_jax.metrics.coco_files import to_coco
  tagged = [{**a, "image_id": s} for a, s in zip(annotations, STEMS)]
  dataset, results = to_coco(detections, tagged, CLASSES, "segm")
  rank = {s: k + 1 for k, s in enumerate(sorted(STEMS))}
  assert [(im["id"], im["file_name"]) for im in dataset["images"]] == [(rank[s], s) for s in STEMS]
  perm = [3, 0, 5, 1, 4, 2]
  dataset2, results2 = to_coco([detections[k] for k in perm], [tagged[k] for k in perm], CLASSES, "segm")
  key = lambda x: (x["image_id"], x["bbox"])
  strip = lambda anns: sorted(({k: v for k, v in a.items() if k != "id"} for a in anns), key=key)
  assert strip(dataset2["annotations"]) == strip(dataset["annotations"])   # every object on its image
  assert sorted(results2, key=key) == sorted(results, key=key)
  # the same through explicit ids (as CocoEvaluator passes its keys), and AP independent of order
  assert coco_ap(detections, annotations, CLASSES, "segm", image_ids=STEMS) == coco_ap(
      [detections[k] for k in perm], [annotations[k] for k in perm], CLASSES, "segm",
      image_ids=[STEMS[k] for k in perm])


def test_score_ties_between_images_follow_the_stem_order():
  """COCOeval breaks score ties by image id: the ids must come from the stems, not the list order."""
  box = np.array([[0.0, 0.0, 10.0, 10.0]])
  ann = {"hboxes": box, "labels": np.array([0]), "height": H, "width": W}
  hit = {"hboxes": box, "scores": np.array([0.5]), "labels": np.array([0])}
  miss = {"hboxes": box + 30, "scores": np.array([0.5]), "labels": np.array([0])}
  # "a" holds the true positive: ranked first it gives precision 1 at recall 0.5
  first = coco_ap([miss, hit], [ann, ann], 1, image_ids=["b", "a"])["AP"]
  second = coco_ap([miss, hit], [ann, ann], 1, image_ids=["a", "b"])["AP"]
  assert first != second
  assert first == coco_ap([hit, miss], [ann, ann], 1)["AP"]   # = list order [a, b]


def evaluators_over_hosts(detections, annotations, hosts=2):
  """One evaluator with every image, and `hosts` evaluators with a share each merged through pickle
  (as PerImageEvaluator.gather's allgather does), images keyed by stem and masks as RLEs."""
  import pickle
  dets, anns = with_rles(detections, "dicts"), with_rles(annotations, "dicts")
  for d in dets:
    d["rles"] = [{"size": r["size"], "counts": r["counts"].decode()} for r in d["rles"]]
  one = CocoEvaluator(CLASSES, ["c0", "c1", "c2"], iou_type="segm")
  parts = [CocoEvaluator(CLASSES, ["c0", "c1", "c2"], iou_type="segm") for _ in range(hosts)]
  for k in np.random.default_rng(0).permutation(len(STEMS)):
    one.add(STEMS[k], dets[k], anns[k])
    parts[k % hosts].add(STEMS[k], dets[k], anns[k])
  merged = CocoEvaluator(CLASSES, ["c0", "c1", "c2"], iou_type="segm")
  merged.merge([pickle.loads(pickle.dumps(p.state())) for p in reversed(parts)])
  return one, merged


def test_rle_evaluator_keyed_by_stem_split_over_two_hosts_equals_one(tmp_path):
  detections, annotations = random_dataset(6, images=len(STEMS))
  one, merged = evaluators_over_hosts(detections, annotations)
  assert merged.result() == one.result()
  assert one.result() == coco_ap(detections, annotations, CLASSES, "segm", class_names=["c0", "c1", "c2"],
                                 image_ids=STEMS)
  a, b = one.write_files(str(tmp_path / "one"), "sota"), merged.write_files(str(tmp_path / "merged"), "sota")
  assert sorted(a) == ["sota_bbox", "sota_gt", "sota_segm"]
  for name in a:
    assert open(a[name]).read() == open(b[name]).read()


@pytest.mark.parametrize("seed", [6, 7])
def test_coco_files_through_pycocotools_equal_coco_ap(seed, tmp_path):
  from mtp_jax.metrics.coco_files import write_coco_files
  detections, annotations = random_dataset(seed, images=len(STEMS))
  names = ["plane", "ship", "tank"]
  paths = write_coco_files(str(tmp_path), "sior", STEMS, with_rles(annotations, "mixed"),
                           with_rles(detections, "counts"), names)
  assert paths == {f"sior_{n}": str(tmp_path / f"sior_{n}.json") for n in ("gt", "bbox", "segm")}
  gt_json = json.loads(open(paths["sior_gt"]).read())
  rank = {s: k + 1 for k, s in enumerate(sorted(STEMS))}
  assert sorted((im["id"], im["file_name"], im["height"], im["width"]) for im in gt_json["images"]) == sorted(
      (rank[s], s, H, W) for s in STEMS)
  assert gt_json["categories"] == [{"id": 1, "name": "plane"}, {"id": 2, "name": "ship"}, {"id": 3, "name": "tank"}]
  a0 = gt_json["annotations"][0]
  assert set(a0) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"}
  assert a0["area"] == float(annotations[STEMS.index(sorted(STEMS)[a0["image_id"] - 1])]["masks"][0].sum())
  bbox_json = json.loads(open(paths["sior_bbox"]).read())
  assert set(bbox_json[0]) == {"image_id", "category_id", "bbox", "score"}
  for iou_type in ("bbox", "segm"):
    with contextlib.redirect_stdout(io.StringIO()):
      gt = COCO(paths["sior_gt"])
      ev = COCOeval(gt, gt.loadRes(paths[f"sior_{iou_type}"]), iou_type)
      ev.evaluate()
      ev.accumulate()
      ev.summarize()
    ours = coco_ap(detections, annotations, CLASSES, iou_type, class_names=names, image_ids=STEMS)
    np.testing.assert_array_equal([ours[n] for n in STAT_NAMES], ev.stats)
    for k, name in enumerate(names):
      p = ev.eval["precision"][:, :, k, 0, -1]
      assert ours["ap_per_class"][name] == p[p > -1].mean()
    assert 0.05 < ours["AP"] < 0.95
