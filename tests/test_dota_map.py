"""dota_map: hand-built cases with known answers, and random cases against an independent
implementation of the DOTA devkit's voc_eval (polygons, shapely IoU) written here."""

import jax
import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon

from mtp_jax.metrics import dota_map
from mtp_jax.metrics.rotated_detection import DotaEvaluator
from mtp_jax.ops import iou as iou_ops
from mtp_jax.ops.boxes import rbox_to_poly


def _dets(*per_class):
  """Per-class lists of (cx, cy, w, h, angle, score) -> one image's detections."""
  return [np.asarray(c, np.float64).reshape(-1, 6) for c in per_class]


def _ann(rboxes, labels, difficult=None):
  out = {"rboxes": np.asarray(rboxes, np.float64).reshape(-1, 5), "labels": np.asarray(labels)}
  if difficult is not None:
    out["difficult"] = np.asarray(difficult, bool)
  return out


A, B, C = (20, 20, 16, 8, 0.3), (60, 40, 20, 10, -0.7), (30, 70, 12, 12, 0.0)


def test_perfect_detections_give_one():
  anns = [_ann([A, B], [0, 1]), _ann([C], [1])]
  dets = [_dets([(*A, 0.9)], [(*B, 0.8)]), _dets([], [(*C, 0.7)])]
  for use_07 in (True, False):
    r = dota_map(dets, anns, use_07_metric=use_07)
    assert r["map"] == 1.0 and list(r["ap"]) == [1.0, 1.0]


def test_one_missed_object_per_class_gives_the_exact_11_point_value():
  # class 0: 2 objects, 1 found -> recall 0.5 at precision 1: 11-point AP = 6/11 (t = 0 ... 0.5);
  # class 1: 4 objects, 3 found -> recall 0.75: AP = 8/11 (t = 0 ... 0.7).
  objects0 = [(10 + 30 * k, 10, 12, 6, 0.1) for k in range(2)]
  objects1 = [(10 + 30 * k, 60, 14, 7, -0.4) for k in range(4)]
  anns = [_ann(objects0 + objects1, [0, 0, 1, 1, 1, 1])]
  dets = [_dets([(*objects0[0], 0.9)], [(*o, 0.8 - 0.1 * k) for k, o in enumerate(objects1[:3])])]
  r = dota_map(dets, anns)
  np.testing.assert_allclose(r["ap"], [6 / 11, 8 / 11], rtol=1e-12)
  assert r["map"] == pytest.approx(7 / 11, rel=1e-12)
  r12 = dota_map(dets, anns, use_07_metric=False)   # VOC12 area: the recall reached, at precision 1
  np.testing.assert_allclose(r12["ap"], [0.5, 0.75], rtol=1e-12)


def test_duplicates_are_false_positives():
  # Objects A and B; A is detected twice. tp = [1, 0, 1], fp = [0, 1, 0]: recall (.5, .5, 1),
  # precision (1, .5, 2/3) -> 11-point AP = (6 * 1 + 5 * 2/3) / 11 = 28/33 (1.0 without the duplicate).
  anns = [_ann([A, B], [0, 0])]
  dup = (A[0] + 0.5, A[1], A[2], A[3], A[4], 0.8)
  r = dota_map([_dets([(*A, 0.9), dup, (*B, 0.7)])], anns)
  assert r["ap"][0] == pytest.approx(28 / 33, rel=1e-12)
  assert dota_map([_dets([(*A, 0.9), (*B, 0.7)])], anns)["ap"][0] == 1.0


def test_difficult_objects_are_ignored():
  anns = [_ann([A, B, C], [0, 0, 0], difficult=[False, True, False])]
  # B (difficult) missed: no penalty; found with the top score: neither TP nor FP.
  assert dota_map([_dets([(*A, 0.9), (*C, 0.8)])], anns)["ap"][0] == 1.0
  r = dota_map([_dets([(*B, 0.99), (*A, 0.9), (*C, 0.8)])], anns)
  assert r["ap"][0] == 1.0 and r["num_objects"][0] == 2
  # Not difficult, B missed: recall stops at 2/3 -> 11-point AP 7/11.
  assert dota_map([_dets([(*A, 0.9), (*C, 0.8)])], [_ann([A, B, C], [0, 0, 0])])["ap"][0] == pytest.approx(7 / 11)


def test_angle_matters_and_classes_without_objects_are_left_out():
  long_box = (50, 50, 40, 6, 0.0)
  turned = (50, 50, 40, 6, np.pi / 2 - 1e-9)   # same centre and size, crossing it: IoU ~ 0.08
  anns = [_ann([long_box], [0])]
  r = dota_map([_dets([(*turned, 0.9)], [])], anns)
  assert r["ap"][0] == 0.0 and np.isnan(r["ap"][1]) and r["map"] == 0.0
  assert dota_map([_dets([(*long_box, 0.9)], [(*A, 0.5)])], anns)["map"] == 1.0  # a class-1 FP: no GT, no AP


def test_bad_input_names_the_image_and_class():
  anns = [_ann([A], [0])]
  with pytest.raises(ValueError, match=r"detections\[0\]\[1\] must be \(N, 6\)"):
    dota_map([[np.zeros((0, 6)), np.zeros((2, 5))]], anns)
  with pytest.raises(ValueError, match=r"annotations\[0\] has label 3 outside \[0, 2\)"):
    dota_map([_dets([], [])], [_ann([A], [3])])
  with pytest.raises(ValueError, match="2 images of detections but 1"):
    dota_map([_dets([], []), _dets([], [])], anns)


def _shapely_iou(boxes1, boxes2):
  """Aligned IoU of (N, 5) float64 rboxes by shapely's polygon intersection; 0 for an empty union.

  The intersection is taken on a 1e-12 px precision grid: GEOS's plain floating overlay returns
  an empty intersection (a MULTIPOINT) for a quarter-turned copy whose corners differ from the
  original's in the last bits (IoU 0 instead of 1); the grid costs about 1e-12 in IoU.
  """
  p, q = shapely.polygons(rbox_to_poly(boxes1)), shapely.polygons(rbox_to_poly(boxes2))
  inter = shapely.area(shapely.intersection(p, q, grid_size=1e-12))
  union = shapely.area(p) + shapely.area(q) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _along(boxes, along_w, along_h):
  """Boxes moved by multiples of their own w- and h-axes (le90, y down)."""
  out = boxes.copy()
  c, s = np.cos(boxes[:, 4]), np.sin(boxes[:, 4])
  out[:, 0] += c * along_w * boxes[:, 2] - s * along_h * boxes[:, 3]
  out[:, 1] += s * along_w * boxes[:, 2] + c * along_h * boxes[:, 3]
  return out


def _iou_pairs(rng, n=300):
  """Named (boxes1, boxes2) float64 pairs: random ones near each other, then degenerate ones."""
  a = np.c_[rng.uniform(0, 30, (n, 2)), rng.uniform(1, 20, (n, 2)), rng.uniform(-1.6, 1.6, n)]
  b = np.c_[a[:, :2] + rng.normal(0, 5, (n, 2)), rng.uniform(1, 20, (n, 2)), rng.uniform(-1.6, 1.6, n)]
  quarter = a[:, [0, 1, 3, 2, 4]] + [0, 0, 0, 0, np.pi / 2]        # the same rectangle
  small = a * [1, 1, 0, 0, 1] + np.c_[np.zeros((n, 2)), a[:, 2:4].min(1, keepdims=True) * [0.3, 0.2],
                                      rng.uniform(-1.6, 1.6, n)]    # fits inside at any angle
  return {"random": (a, b), "identical": (a, a), "quarter_turned": (a, quarter),
          "contained": (a, small), "touching_edges": (a, _along(a, 1.0, rng.uniform(-0.9, 0.9, n))),
          "touching_corners": (a, _along(a, 1.0, 1.0)), "zero_area": (a * [1, 1, 1, 0, 1], b),
          "both_zero_area": (a * [1, 1, 1, 0, 1], a * [1, 1, 0, 1, 1])}


@pytest.mark.parametrize("name", sorted(_iou_pairs(np.random.default_rng(1))))
def test_numpy_box_iou_rotated_matches_shapely_and_the_jax_path(name, monkeypatch):
  boxes1, boxes2 = _iou_pairs(np.random.default_rng(1))[name]
  want = _shapely_iou(boxes1, boxes2)
  # float32 rounded inputs for the jax path; the numpy path gets the same values in float64.
  narrow1, narrow2 = boxes1.astype(np.float32), boxes2.astype(np.float32)
  on_jax = np.asarray(jax.jit(lambda x, y: iou_ops.box_iou_rotated(x, y, aligned=True))(narrow1, narrow2))
  pairwise_jax = np.asarray(jax.jit(iou_ops.box_iou_rotated)(narrow1[:40], narrow2[:30]))
  with monkeypatch.context() as patch:          # the numpy path makes no jax call at all
    patch.setattr(iou_ops, "jax", None)
    patch.setattr(iou_ops, "jnp", None)
    got = iou_ops.box_iou_rotated(boxes1, boxes2, aligned=True)
    pairwise = iou_ops.box_iou_rotated(boxes1, boxes2[:30], row_tile=64)
    on_host = iou_ops.box_iou_rotated(narrow1.astype(np.float64), narrow2.astype(np.float64), aligned=True)
    pairwise_host = iou_ops.box_iou_rotated(narrow1[:40].astype(np.float64), narrow2[:30].astype(np.float64))
  assert type(got) is np.ndarray and got.dtype == np.float64 and pairwise.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
  np.testing.assert_array_equal(pairwise[np.arange(30), np.arange(30)], got[:30])
  assert pairwise.shape == (len(boxes1), 30)   # 300 rows in 5 numpy tiles
  np.testing.assert_allclose(on_host, on_jax, rtol=0, atol=1e-5)
  np.testing.assert_allclose(pairwise_host, pairwise_jax, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Independent reference: DOTA_devkit dota_evaluation_task1.voc_eval, on 8-point polygons, with
# the devkit's horizontal-box pre-filter (+1 pixel) and shapely for the polygon IoU.
# ----------------------------------------------------------------------------------------------
def devkit_voc_ap(rec, prec, use_07_metric):
  if use_07_metric:
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
      p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
      ap = ap + p / 11.0
    return ap
  mrec = np.concatenate(([0.0], rec, [1.0]))
  mpre = np.concatenate(([0.0], prec, [0.0]))
  for i in range(mpre.size - 1, 0, -1):
    mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
  i = np.where(mrec[1:] != mrec[:-1])[0]
  return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def devkit_voc_eval(det_lines, recs, classname, ovthresh, use_07_metric):
  """det_lines: [(image name, score, 8 floats)] of one class; recs: {image: [objects]}."""
  class_recs, npos = {}, 0
  for name, objects in recs.items():
    R = [o for o in objects if o["name"] == classname]
    bbox = np.array([o["bbox"] for o in R]).reshape(-1, 8)
    difficult = np.array([o["difficult"] for o in R]).astype(bool)
    npos += sum(~difficult)
    class_recs[name] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(R)}
  image_ids = [x[0] for x in det_lines]
  confidence = np.array([x[1] for x in det_lines])
  BB = np.array([x[2] for x in det_lines]).reshape(-1, 8)
  sorted_ind = np.argsort(-confidence)
  BB = BB[sorted_ind, :]
  image_ids = [image_ids[x] for x in sorted_ind]
  nd = len(image_ids)
  tp, fp = np.zeros(nd), np.zeros(nd)
  for d in range(nd):
    R = class_recs[image_ids[d]]
    bb = BB[d, :].astype(float)
    ovmax = -np.inf
    BBGT = R["bbox"].astype(float)
    if BBGT.size > 0:
      gx0, gy0 = np.min(BBGT[:, 0::2], axis=1), np.min(BBGT[:, 1::2], axis=1)
      gx1, gy1 = np.max(BBGT[:, 0::2], axis=1), np.max(BBGT[:, 1::2], axis=1)
      bx0, by0, bx1, by1 = np.min(bb[0::2]), np.min(bb[1::2]), np.max(bb[0::2]), np.max(bb[1::2])
      iw = np.maximum(np.minimum(gx1, bx1) - np.maximum(gx0, bx0) + 1.0, 0.0)
      ih = np.maximum(np.minimum(gy1, by1) - np.maximum(gy0, by0) + 1.0, 0.0)
      inters = iw * ih
      uni = (bx1 - bx0 + 1.0) * (by1 - by0 + 1.0) + (gx1 - gx0 + 1.0) * (gy1 - gy0 + 1.0) - inters
      keep_index = np.where(inters / uni > 0)[0]
      if len(keep_index) > 0:
        det_poly = Polygon(bb.reshape(4, 2))
        overlaps = []
        for j in keep_index:
          gt_poly = Polygon(BBGT[j].reshape(4, 2))
          overlaps.append(det_poly.intersection(gt_poly).area / det_poly.union(gt_poly).area)
        ovmax = np.max(overlaps)
        jmax = keep_index[int(np.argmax(overlaps))]
    if ovmax > ovthresh:
      if not R["difficult"][jmax]:
        if not R["det"][jmax]:
          tp[d] = 1.0
          R["det"][jmax] = 1
        else:
          fp[d] = 1.0
    else:
      fp[d] = 1.0
  fp, tp = np.cumsum(fp), np.cumsum(tp)
  rec = tp / float(npos)
  prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
  return devkit_voc_ap(rec, prec, use_07_metric)


def random_dataset(rng, images=6, classes=3):
  detections, annotations = [], []
  for _ in range(images):
    m = int(rng.integers(0, 7))
    rboxes = np.c_[rng.uniform(10, 90, (m, 2)), rng.uniform(4, 30, (m, 2)), rng.uniform(-np.pi / 2, np.pi / 2, m)]
    labels = rng.integers(0, classes, m)
    difficult = rng.random(m) < 0.15
    annotations.append(_ann(rboxes, labels, difficult))
    per_class = []
    for c in range(classes):
      mine = rboxes[labels == c]
      found = mine[rng.random(len(mine)) < 0.8]
      jitter = found + np.c_[rng.normal(0, 1, (len(found), 2)), rng.normal(0, 1, (len(found), 2)), rng.normal(0, 0.05, len(found))]
      dup = jitter[rng.random(len(jitter)) < 0.3] + rng.normal(0, 0.5, 5)
      k = int(rng.integers(0, 3))
      noise = np.c_[rng.uniform(10, 90, (k, 2)), rng.uniform(4, 30, (k, 2)), rng.uniform(-1.5, 1.5, k)]
      boxes = np.concatenate([jitter, dup, noise])
      boxes[:, 2:4] = np.abs(boxes[:, 2:4]) + 1
      per_class.append(np.c_[boxes, rng.random(len(boxes))])
    detections.append(per_class)
  return detections, annotations


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("iou_thr, use_07", [(0.5, True), (0.5, False), (0.7, True)])
def test_random_cases_match_the_devkit(seed, iou_thr, use_07):
  rng = np.random.default_rng(seed)
  detections, annotations = random_dataset(rng)
  ours = dota_map(detections, annotations, iou_thr=iou_thr, use_07_metric=use_07)
  names = [f"img{i}" for i in range(len(annotations))]
  recs = {n: [{"name": str(int(lab)), "difficult": int(dif), "bbox": rbox_to_poly(rb).reshape(8)}
              for rb, lab, dif in zip(a["rboxes"], a["labels"], a["difficult"])] for n, a in zip(names, annotations)}
  for c in range(3):
    if ours["num_objects"][c] == 0:
      assert np.isnan(ours["ap"][c])
      continue
    lines = [(n, d[5], rbox_to_poly(d[:5]).reshape(8)) for n, dets in zip(names, detections) for d in dets[c]]
    assert ours["ap"][c] == pytest.approx(devkit_voc_eval(lines, recs, str(c), iou_thr, use_07), abs=1e-12)


def test_evaluation_split_over_two_hosts_equals_one():
  detections, annotations = random_dataset(np.random.default_rng(7), images=9)
  one = DotaEvaluator(3, ["a", "b", "c"])
  hosts = [DotaEvaluator(3, ["a", "b", "c"]) for _ in range(2)]
  for i, (d, a) in enumerate(zip(detections, annotations)):
    one.add(f"img{i}", d, a)
    hosts[i % 2].add(f"img{i}", d, a)       # interleaved, as process shards are
  merged = DotaEvaluator(3, ["a", "b", "c"])
  merged.merge([hosts[1].state(), hosts[0].state()])   # any order
  assert merged.result() == one.result()
  assert one.result()["map"] == pytest.approx(dota_map(detections, annotations)["map"])
  with pytest.raises(ValueError, match="evaluated twice"):
    merged.merge([hosts[0].state()])
