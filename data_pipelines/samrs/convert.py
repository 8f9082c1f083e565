"""SAMRS release tree -> sharded TFRecords (schema.py) plus `dataset_info.json`.

    python -m data_pipelines.samrs.convert --root data/samrs_sample --subset all --split all \
        --out data/samrs_tfrecords [--num-shards 2] [--strict]

Output per subset and split: `<out>/<subset>/<split>/<subset>-<split>.tfrecord-0000i-of-0000K` and
`<out>/<subset>/<split>/dataset_info.json` (class names, counts, instances per class, the largest
instance count per image, the shard list with record counts, and every skipped image with its
reason). An image whose files are unusable is skipped and counted; with `--strict` the converter
stops at the first one. Shards are written under a temporary name and renamed when complete.
"""

import argparse
import json
import os
import sys

import numpy as np

from data_pipelines.samrs import classes as samrs_classes
from data_pipelines.samrs import raw, schema
from mtp_jax.errors import DataError

INFO_FILE = "dataset_info.json"


def shard_name(subset: str, split: str, index: int, count: int) -> str:
  return f"{subset}-{split}.tfrecord-{index:05d}-of-{count:05d}"


def _write_shard(path: str, records: list[bytes]):
  import tensorflow as tf  # lazy: only the writer needs it (CRC-framed TFRecord files)
  tmp = path + ".tmp"
  with tf.io.TFRecordWriter(tmp) as writer:
    for r in records:
      writer.write(r)
  os.replace(tmp, path)


def convert_split(root: str, subset: str, split: str, out: str, num_shards: int = 1,
                  strict: bool = False, log=print) -> dict:
  """Converts one subset/split; returns the dataset_info dict that it also writes."""
  layout = samrs_classes.subset(subset)
  paths = raw.check_layout(root, layout, split)
  stems = raw.read_split_list(paths["list"])
  if not stems:
    raise DataError(f"{paths['list']} lists no images")
  serialized, skipped = [], []
  per_class = np.zeros(layout.num_classes, np.int64)
  per_image = []
  for stem in stems:
    try:
      record = raw.read_sample(root, layout, stem)
    except raw.BadSample as e:
      if strict:
        raise DataError(f"{subset}/{split} image {stem!r}: {e}") from None
      skipped.append({"image": stem, "reason": str(e)})
      log(f"skipping {subset}/{split} {stem}: {e}")
      continue
    serialized.append(schema.encode(record))
    np.add.at(per_class, record.labels, 1)
    per_image.append(record.num_instances)
  if not serialized:
    raise DataError(f"no usable image in {subset}/{split} under {root!r} ({len(skipped)} skipped)")

  split_dir = os.path.join(out, subset, split)
  os.makedirs(split_dir, exist_ok=True)
  num_shards = max(1, min(num_shards, len(serialized)))
  shards = []
  for i, chunk in enumerate(np.array_split(np.arange(len(serialized)), num_shards)):
    name = shard_name(subset, split, i, num_shards)
    _write_shard(os.path.join(split_dir, name), [serialized[j] for j in chunk])
    shards.append({"file": name, "num_examples": int(len(chunk))})
  info = {
      "subset": subset,
      "split": split,
      "source_root": os.path.abspath(root),
      "class_names": list(layout.classes),
      "num_examples": len(serialized),
      "num_instances": int(per_class.sum()),
      "instances_per_class": {c: int(n) for c, n in zip(layout.classes, per_class)},
      "max_instances_per_image": int(max(per_image)),
      "shards": shards,
      "skipped": skipped,
  }
  with open(os.path.join(split_dir, INFO_FILE + ".tmp"), "w") as f:
    json.dump(info, f, indent=1)
  os.replace(os.path.join(split_dir, INFO_FILE + ".tmp"), os.path.join(split_dir, INFO_FILE))
  return info


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, help="SAMRS root holding the subset folders")
  parser.add_argument("--subset", default="all", choices=[*samrs_classes.SUBSETS, "all"])
  parser.add_argument("--split", default="all", choices=[*samrs_classes.SPLITS, "all"])
  parser.add_argument("--out", required=True, help="output folder for the TFRecords")
  parser.add_argument("--num-shards", type=int, default=1)
  parser.add_argument("--strict", action="store_true", help="stop at the first unusable image")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  subsets = sorted(samrs_classes.SUBSETS) if args.subset == "all" else [args.subset]
  splits = samrs_classes.SPLITS if args.split == "all" else [args.split]
  try:
    for subset in subsets:
      for split in splits:
        info = convert_split(args.root, subset, split, args.out, args.num_shards, args.strict)
        print(f"{subset}/{split}: {info['num_examples']} images, {info['num_instances']} instances, "
              f"{len(info['shards'])} shard(s), {len(info['skipped'])} skipped -> "
              f"{os.path.join(args.out, subset, split)}")
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
