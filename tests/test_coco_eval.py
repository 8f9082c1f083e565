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
