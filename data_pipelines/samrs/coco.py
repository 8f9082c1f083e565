"""The COCO json of the original's `scripts/convert_pkl_json.py` (MTP_SPEC.md §4), both ways.

    python -m data_pipelines.samrs.coco --root SAMRS_DIR --subset sota --split train --out sota_train.json

`pkl_to_coco` writes what that script writes: images {file_name, height, width, id, segm_file},
annotations {iscrowd 0, category_id = 0-based label, bbox = the mask's tight box (x, y, w, h) from
`maskUtils.toBbox`, area = mask area, segmentation = the RLE, image_id, id}, categories
{id = index, name}. `instances_by_stem` reads such a file back into per-image instance dicts
that `raw.read_sample(..., coco_instances=...)` accepts, so the converter takes either source.
"""

import json
import os
import pickle

from data_pipelines.samrs import classes as samrs_classes
from data_pipelines.samrs import raw
from mtp_jax import cli
from mtp_jax.errors import DataError


def pkl_to_coco(root: str, subset: str, split: str) -> dict:
  from pycocotools import mask as mask_utils
  layout = samrs_classes.subset(subset)
  paths = raw.check_layout(root, layout, split)
  images, annotations = [], []
  for image_id, stem in enumerate(raw.read_split_list(paths["list"])):
    with open(os.path.join(paths["ins"], stem + ".pkl"), "rb") as f:
      instances = pickle.load(f)
    height, width = None, None
    for inst in instances:
      rle = {"size": inst["mask"]["size"], "counts": inst["mask"]["counts"].encode("ascii")}
      height, width = rle["size"]
      annotations.append({
          "iscrowd": 0, "category_id": int(inst["label"]),
          "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle)),
          "segmentation": inst["mask"], "image_id": image_id, "id": len(annotations)})
    images.append({"file_name": stem + layout.image_ext, "height": height, "width": width,
                   "id": image_id, "segm_file": stem + ".png"})
  categories = [{"id": i, "name": name} for i, name in enumerate(layout.classes)]
  return {"images": images, "annotations": annotations, "categories": categories}


def instances_by_stem(path: str) -> dict:
  """{image stem: [instance dicts with mask, bbox (x1, y1, x2, y2), label, size]} from a COCO json."""
  try:
    with open(path) as f:
      coco = json.load(f)
    stems = {im["id"]: os.path.splitext(im["file_name"])[0] for im in coco["images"]}
    out = {stem: [] for stem in stems.values()}
    for ann in coco["annotations"]:
      x, y, w, h = ann["bbox"]
      out[stems[ann["image_id"]]].append({
          "mask": ann["segmentation"], "bbox": [x, y, x + w, y + h],
          "label": int(ann["category_id"]), "size": int(round(ann["area"]))})
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path} is not a readable COCO instance json ({type(e).__name__}: {e})") from None
  return out


def main(argv=None):
  parser = cli.parser(__file__, __doc__)
  parser.add_argument("--root", required=True, help="SAMRS root holding the subset folders")
  parser.add_argument("--subset", required=True, choices=sorted(samrs_classes.SUBSETS), help="the subset")
  parser.add_argument("--split", required=True, choices=samrs_classes.SPLITS, help="the split")
  parser.add_argument("--out", required=True, help="the COCO json file to write")
  args = parser.parse_args(argv)
  with cli.reported(DataError, OSError, pickle.UnpicklingError):
    coco = pkl_to_coco(args.root, args.subset, args.split)
  with open(args.out, "w") as f:
    json.dump(coco, f)
  print(f"{args.out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations")


if __name__ == "__main__":
  main()
