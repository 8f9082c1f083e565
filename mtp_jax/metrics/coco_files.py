"""The standard COCO json files of an evaluation: ground truth and bbox / segm results per subset.

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

from mtp_jax.metrics.coco import to_coco


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
