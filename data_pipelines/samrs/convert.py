"""SAMRS release tree -> sharded TFRecords (schema.py) plus `dataset_info.json`.

    python -m data_pipelines.samrs.convert --root data/samrs_sample --subset all --split all \
        --out data/samrs_tfrecords [--num-shards 2] [--workers 4] [--strict] [--coco-json FILE] \
        [--image-format source|raw]

Output per subset and split: `<out>/<subset>/<split>/<subset>-<split>.tfrecord-0000i-of-0000K` and
`<out>/<subset>/<split>/dataset_info.json`: class names, counts, instances per class, a histogram
of instances per image, `max_instances_999` (the smallest per-image cap that keeps 99.9% of all
instances), the shard list with record counts and sha256 checksums, and every skipped image with
its reason. Shard i holds the usable images among the i-th K-th of the split list (the folder
layout and the atomic writes are data_pipelines/records/'s).

Bad input never stops a conversion (unless `--strict`, which stops at the first): an image whose
files are unusable is skipped, named and counted. Shards are written under a temporary name and
renamed when complete, and each completed shard is recorded (with its checksum) in
`.convert_progress.json`, so an interrupted conversion rerun with the same arguments resumes at
the first missing shard; a folder holding a different conversion is refused, never mixed.
`--coco-json` reads the instances from the original's COCO json instead of `ins/*.pkl`.
"""

import functools
import hashlib
import json
import multiprocessing
import os

import numpy as np

from data_pipelines.records.shards import INFO_FILE, sha256, shard_name
from data_pipelines.records.writer import write_json, write_shard
from data_pipelines.samrs import classes as samrs_classes
from data_pipelines.samrs import coco as samrs_coco
from data_pipelines.samrs import raw, schema
from mtp_jax import cli
from mtp_jax.errors import DataError

PROGRESS_FILE = ".convert_progress.json"
KEEP_FRACTION = 0.999


def _read_one(stem, root, subset, coco_index, image_format="source"):
  """Worker: one image -> ("ok", record bytes, labels) or ("bad", reason)."""
  layout = samrs_classes.subset(subset)
  try:
    instances = None if coco_index is None else coco_index.get(stem, [])
    record = raw.read_sample(root, layout, stem, coco_instances=instances,
                             image_format=image_format)
  except raw.BadSample as e:
    return stem, "bad", str(e), None
  return stem, "ok", schema.encode(record), record.labels.tolist()


def smallest_cap(per_image: list[int], keep: float = KEEP_FRACTION) -> int:
  """Smallest m with sum(min(n_i, m)) >= keep * sum(n_i): the cap that keeps `keep` of instances."""
  counts = np.asarray(per_image, np.int64)
  total = counts.sum()
  # m = max(counts) keeps everything, so the search always ends inside the range.
  return next((m for m in range(int(counts.max()) + 1) if np.minimum(counts, m).sum() >= keep * total))


def convert_split(root: str, subset: str, split: str, out: str, num_shards: int = 1,
                  strict: bool = False, log=print, workers: int = 1,
                  coco_json: str | None = None, image_format: str = "source") -> dict:
  """Converts (or resumes converting) one subset/split; returns the dataset_info it writes."""
  layout = samrs_classes.subset(subset)
  paths = raw.check_layout(root, layout, split)
  stems = raw.read_split_list(paths["list"])
  if not stems:
    raise DataError(f"{paths['list']} lists no images")
  if image_format not in ("source", "raw"):
    raise DataError(f"image format {image_format!r} is not 'source' or 'raw'")
  coco_index = samrs_coco.instances_by_stem(coco_json) if coco_json else None
  num_shards = max(1, min(num_shards, len(stems)))
  signature = {"source_root": os.path.abspath(root), "subset": subset, "split": split,
               "num_shards": num_shards, "strict": strict, "image_format": image_format,
               "coco_json": os.path.abspath(coco_json) if coco_json else None,
               "image_list_sha256": hashlib.sha256("\n".join(stems).encode()).hexdigest()}
  split_dir = os.path.join(out, subset, split)
  progress = _load_progress(split_dir, signature)
  if progress.get("complete") and os.path.isfile(os.path.join(split_dir, INFO_FILE)):
    log(f"{subset}/{split}: already converted in {split_dir} (checksums verified), nothing to do")
    with open(os.path.join(split_dir, INFO_FILE)) as f:
      return json.load(f)

  read = functools.partial(_read_one, root=root, subset=subset, coco_index=coco_index,
                           image_format=image_format)
  _write_missing_shards(read, stems, split_dir, progress, signature, workers, log)
  shards = [progress["shards"][shard_name(subset, split, i, num_shards)] for i in range(num_shards)]
  info = _dataset_info(shards, layout, signature, root)
  write_json(os.path.join(split_dir, INFO_FILE), info)
  progress["complete"] = True
  write_json(os.path.join(split_dir, PROGRESS_FILE), progress)
  return info


def _write_missing_shards(read, stems: list[str], split_dir: str, progress: dict, signature: dict,
                          workers: int, log) -> None:
  """Writes the shards `progress` lacks with `read` (a bound `_read_one`), recording each when done."""
  subset, split, num_shards = signature["subset"], signature["split"], signature["num_shards"]
  chunks = np.array_split(np.arange(len(stems)), num_shards)
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
  try:
    for i, chunk in enumerate(chunks):
      name = shard_name(subset, split, i, num_shards)
      if name in progress["shards"]:
        continue   # completed by an earlier run, checksum verified by _load_progress
      results = (pool.imap(read, [stems[j] for j in chunk], chunksize=8) if pool
                 else map(read, [stems[j] for j in chunk]))
      records, labels, skipped = _sort_results(results, f"{subset}/{split}", signature["strict"], log)
      os.makedirs(split_dir, exist_ok=True)
      write_shard(os.path.join(split_dir, name), records)
      progress["shards"][name] = {"file": name, "num_examples": len(records),
                                  "sha256": sha256(os.path.join(split_dir, name)),
                                  "labels": labels, "skipped": skipped}
      write_json(os.path.join(split_dir, PROGRESS_FILE), progress)
  finally:
    if pool:
      pool.close()
      pool.join()


def _sort_results(results, where: str, strict: bool, log) -> tuple[list, list, list]:
  """`_read_one` results -> (record bytes, label lists, skipped images); `strict`: a bad one raises."""
  records, labels, skipped = [], [], []
  for stem, status, payload, lab in results:
    if status == "bad":
      if strict:
        raise DataError(f"{where} image {stem!r}: {payload}")
      skipped.append({"image": stem, "reason": payload})
      log(f"skipping {where} {stem}: {payload}")
      continue
    records.append(payload)
    labels.append(lab)
  return records, labels, skipped


def _dataset_info(shards: list[dict], layout, signature: dict, root: str) -> dict:
  """The split's dataset_info from its shards' progress records; raises if no image was usable."""
  per_image = [len(lab) for s in shards for lab in s["labels"]]
  if not per_image:
    raise DataError(f"no usable image in {signature['subset']}/{signature['split']} under {root!r} "
                    f"({sum(len(s['skipped']) for s in shards)} skipped)")
  per_class = np.bincount([c for s in shards for lab in s["labels"] for c in lab],
                          minlength=layout.num_classes)
  histogram = np.bincount(per_image)
  return {
      **{k: signature[k] for k in ("subset", "split", "source_root", "coco_json", "image_format")},
      "class_names": list(layout.classes),
      "num_examples": len(per_image),
      "num_instances": int(per_class.sum()),
      "instances_per_class": {c: int(n) for c, n in zip(layout.classes, per_class)},
      "instances_per_image_histogram": {str(n): int(c) for n, c in enumerate(histogram) if c},
      "max_instances_per_image": int(max(per_image)),
      "max_instances_999": smallest_cap(per_image),
      "shards": [{k: s[k] for k in ("file", "num_examples", "sha256")} for s in shards],
      "skipped": [x for s in shards for x in s["skipped"]],
  }


def _load_progress(split_dir: str, signature: dict) -> dict:
  """This split's progress record: empty for a new folder; refuses another conversion's folder.

  Shards recorded as complete are kept only if their file still has the recorded checksum.
  """
  path = os.path.join(split_dir, PROGRESS_FILE)
  if not os.path.exists(path):
    # Leftover `.tmp` files are an interrupted first shard of ours: ignored and overwritten.
    if os.path.isdir(split_dir) and any((".tfrecord" in f and not f.endswith(".tmp"))
                                        or f == INFO_FILE for f in os.listdir(split_dir)):
      raise DataError(f"{split_dir} holds TFRecords from another conversion (no "
                      f"{PROGRESS_FILE}); delete the folder or choose another --out")
    return {"signature": signature, "shards": {}}
  try:
    with open(path) as f:
      progress = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path} is unreadable ({e}); delete {split_dir} to convert again") from None
  if progress.get("signature") != signature:
    old = progress.get("signature", {})
    diff = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
    raise DataError(f"{split_dir} holds a conversion made with different settings ({', '.join(diff)}"
                    f"); delete it or choose another --out")
  for name, shard in list(progress["shards"].items()):
    file = os.path.join(split_dir, name)
    if not os.path.isfile(file) or sha256(file) != shard["sha256"]:
      del progress["shards"][name]       # damaged or missing: convert that shard again
      progress["complete"] = False
  return progress


def main(argv=None, prog=None):
  parser = cli.parser(__file__, __doc__, prog=prog)
  parser.add_argument("--root", required=True, help="SAMRS root holding the subset folders")
  parser.add_argument("--subset", default="all", choices=[*samrs_classes.SUBSETS, "all"], help="the subset (default: all)")
  parser.add_argument("--split", default="all", choices=[*samrs_classes.SPLITS, "all"], help="the split (default: all)")
  parser.add_argument("--out", required=True, help="output folder for the TFRecords")
  parser.add_argument("--num-shards", type=int, default=1, help="shards per subset and split (default 1)")
  parser.add_argument("--strict", action="store_true", help="stop at the first unusable image")
  parser.add_argument("--workers", type=int, default=1, help="processes reading the images")
  parser.add_argument("--image-format", default="source", choices=["source", "raw"],
                      help="store the source PNG/JPEG bytes (default) or raw RGB pixels: no "
                           "decoding when training, about 1.5x the size of aerial PNGs")
  parser.add_argument("--coco-json", default=None,
                      help="read instances from this COCO json (convert_pkl_json.py's) instead of "
                           "ins/*.pkl; needs --subset and --split")
  args = parser.parse_args(argv)
  from mtp_jax.quiet_startup import quiet_startup
  quiet_startup()
  subsets = sorted(samrs_classes.SUBSETS) if args.subset == "all" else [args.subset]
  splits = samrs_classes.SPLITS if args.split == "all" else [args.split]
  if args.coco_json and (len(subsets) > 1 or len(splits) > 1):
    parser.error("--coco-json holds one subset and split: pass --subset and --split")
  with cli.reported(DataError):
    for subset in subsets:
      for split in splits:
        info = convert_split(args.root, subset, split, args.out, args.num_shards, args.strict,
                             workers=args.workers, coco_json=args.coco_json,
                             image_format=args.image_format)
        print(f"{subset}/{split}: {info['num_examples']} images, {info['num_instances']} instances, "
              f"{len(info['shards'])} shard(s), {len(info['skipped'])} skipped -> "
              f"{os.path.join(args.out, subset, split)}")


if __name__ == "__main__":
  main()
