"""The COCO json form of an evaluation (`to_coco`, which `coco_ap` scores) and its standard files:
ground truth and bbox / segm results per subset.

`write_coco_files(folder, subset, images, annotations, detections, class_names)` writes

  <subset>_gt.json    a COCO dataset: images {id, file_name, height, width}, annotations {id,
                      image_id, category_id, bbox [x, y, w, h], area, iscrowd, segmentation (RLE,
                      where the ground truth has masks)}, categories {id = label + 1, name};
  <subset>_bbox.json  results [{image_id, category_id, bbox [x, y, w, h], score}];
  <subset>_segm.json  the same with "segmentation" (RLE), where the detections have masks;

from `coco_ap`'s per-image dicts (`mtp_jax.metrics.coco`, masks as dense arrays or RLEs), with
`images` the images' own ids (file stems): COCO ids are 1..N in their sorted order, as `coco_ap`
numbers them. Floats are written unrounded (Python's shortest round-trip repr, as mmdet's
CocoMetric.results2json writes them), so `COCO(gt).loadRes(results)` + COCOeval on the files gives
exactly `coco_ap`'s numbers on the same records. pycocotools' loadRes refuses an empty results
list: with no detections the results file is `[]` and `coco_ap` reports AP 0.
"""

import json
import os

import numpy as np
from pycocotools import mask as mask_utils


def _rle(mask) -> dict:
  rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle


def as_rle(rle, height: int, width: int) -> dict:
  """Any RLE form (mtp_jax/metrics/coco.py docstring) -> {"size": [H, W], "counts": ascii str} (json-ready)."""
  if isinstance(rle, (str, bytes, np.bytes_, np.str_)):
    rle = {"size": [height, width], "counts": rle}
  size = [int(v) for v in rle.get("size", (height, width))]
  counts = rle["counts"]
  if isinstance(counts, (bytes, np.bytes_)):
    counts = bytes(counts).decode("ascii")
  elif isinstance(counts, np.str_):
    counts = str(counts)
  elif not isinstance(counts, str):   # uncompressed counts
    compressed = mask_utils.frPyObjects({"size": size, "counts": list(counts)}, *size)
    counts = compressed["counts"].decode("ascii")
  if size != [int(height), int(width)]:
    raise ValueError(f"RLE of size {size} in an image of size {[int(height), int(width)]}")
  return {"size": size, "counts": counts}


def _instance_rles(item, count: int, height: int, width: int, what: str):
  """The item's masks as json-ready RLEs (None without masks), one at a time from dense masks."""
  if "rles" in item:
    if len(item["rles"]) != count:
      raise ValueError(f"{what}: {len(item['rles'])} rles for {count} instances")
    return [as_rle(r, height, width) for r in item["rles"]]
  if "masks" in item:
    masks = item["masks"]
    if len(masks) != count:
      raise ValueError(f"{what}: {len(masks)} masks for {count} instances")
    return [_rle(m) for m in masks]
  return None


def _xywh(box) -> list:
  x1, y1, x2, y2 = (float(v) for v in box)
  return [x1, y1, x2 - x1, y2 - y1]


def coco_image_ids(annotations, image_ids=None) -> tuple:
  """(COCO integer id per image, file name per image): ids 1..N in sorted order of the images' own
  ids (`image_ids`, else every annotation's "image_id", else the list order; module docstring)."""
  if image_ids is None and annotations and all("image_id" in a for a in annotations):
    image_ids = [a["image_id"] for a in annotations]
  if image_ids is None:
    return list(range(1, len(annotations) + 1)), [str(i) for i in range(len(annotations))]
  image_ids = list(image_ids)
  if len(image_ids) != len(annotations):
    raise ValueError(f"{len(image_ids)} image ids for {len(annotations)} images")
  rank = {key: k + 1 for k, key in enumerate(sorted(set(image_ids)))}
  if len(rank) != len(image_ids):
    raise ValueError("image ids are not unique")
  return [rank[key] for key in image_ids], [str(key) for key in image_ids]


def to_coco(detections, annotations, num_classes: int, iou_type: str = "bbox", class_names=None,
            image_ids=None):
  """(ground-truth dataset dict, result list) in COCO json form (json-ready: plain Python types).

  image ids as `coco_image_ids`; the gt carries "segmentation" RLEs where the annotations have
  masks or rles; results carry them for iou_type "segm" (and always their box, as mmdet's
  CocoMetric writes them: COCO.loadRes then takes the box area as the detection's area).
  """
  if len(detections) != len(annotations):
    raise ValueError(f"coco: {len(detections)} images of detections but {len(annotations)} of annotations")
  ids, names = coco_image_ids(annotations, image_ids)
  images, gts, results = [], [], []
  for i, ann in enumerate(annotations):
    image_id, height, width = ids[i], int(ann["height"]), int(ann["width"])
    images.append({"id": image_id, "file_name": names[i], "height": height, "width": width})
    boxes = np.asarray(ann["hboxes"], np.float64).reshape(-1, 4)
    labels = np.asarray(ann["labels"]).reshape(-1)
    crowd = np.asarray(ann.get("iscrowd", np.zeros(len(boxes), bool)), bool).reshape(-1)
    rles = _instance_rles(ann, len(boxes), height, width, f"annotations[{i}]")
    if iou_type == "segm" and rles is None:
      raise ValueError(f"coco_ap(iou_type='segm'): annotations[{i}] has no masks")
    for k, (box, label) in enumerate(zip(boxes, labels)):
      g = {"id": len(gts) + 1, "image_id": image_id, "category_id": int(label) + 1,
           "bbox": _xywh(box), "iscrowd": int(crowd[k])}
      if rles is not None:
        g["segmentation"] = rles[k]
        g["area"] = float(mask_utils.area(rles[k]))
      else:
        g["area"] = float((box[2] - box[0]) * (box[3] - box[1]))
      gts.append(g)
  for i, det in enumerate(detections):
    boxes = np.asarray(det["hboxes"], np.float64).reshape(-1, 4)
    rles = None
    if iou_type == "segm":
      ann = annotations[i]
      rles = _instance_rles(det, len(boxes), int(ann["height"]), int(ann["width"]), f"detections[{i}]")
      if rles is None:
        raise ValueError(f"coco_ap(iou_type='segm'): detections[{i}] has no masks")
    for k, (box, score, label) in enumerate(zip(boxes, np.asarray(det["scores"]).reshape(-1),
                                                np.asarray(det["labels"]).reshape(-1))):
      r = {"image_id": ids[i], "category_id": int(label) + 1, "score": float(score), "bbox": _xywh(box)}
      if rles is not None:
        r["segmentation"] = rles[k]
      results.append(r)
  names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
  dataset = {"images": images, "annotations": gts,
             "categories": [{"id": c + 1, "name": str(names[c])} for c in range(num_classes)]}
  return dataset, results


def _has_masks(items) -> bool:
  return bool(items) and all("rles" in x or "masks" in x for x in items)


def write_coco_files(folder: str, subset: str, images, annotations, detections, class_names) -> dict:
  """The files above into `folder` (created); {"<subset>_gt" | "<subset>_bbox" | "<subset>_segm": path}.

  images: per image its own id (str stem or int), in the same order as annotations and detections.
  The segm file is written when every detection record has masks ("rles" or "masks").
  """
  os.makedirs(folder, exist_ok=True)
  with_segm = _has_masks(detections) and _has_masks(annotations)
  dataset, results = to_coco(detections, annotations, len(class_names), "segm" if with_segm else "bbox",
                             class_names, image_ids=images)
  out = {f"{subset}_gt": os.path.join(folder, f"{subset}_gt.json"),
         f"{subset}_bbox": os.path.join(folder, f"{subset}_bbox.json")}
  _dump(dataset, out[f"{subset}_gt"])
  _dump([{k: v for k, v in r.items() if k != "segmentation"} for r in results], out[f"{subset}_bbox"])
  if with_segm:
    out[f"{subset}_segm"] = os.path.join(folder, f"{subset}_segm.json")
    _dump(results, out[f"{subset}_segm"])
  return out


def _dump(obj, path: str):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)
