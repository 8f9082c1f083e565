"""Writes one split of a finetuning dataset: sharded TFRecords + dataset_info.json.

Layout (data_pipelines/records/'s, the SAMRS conversion's too, so one reader serves both): `<out>/<dataset>/<split>/
<dataset>-<split>.tfrecord-0000i-of-0000K` and `dataset_info.json` (class names, counts per
class, the shard list with record counts and sha256 checksums, the split's sample list, every
skipped sample with its reason, the conversion's settings). Shard i holds the usable samples of
the i-th K-th of the split list. Shards are written under a temporary name and renamed when
complete, the info file last: a folder with an info file is a finished conversion. Converting
again with the same settings verifies the checksums and does nothing; a folder holding anything
else is refused, never mixed.
"""

import json
import os

import numpy as np

from data_pipelines.downstream import schema
from data_pipelines.records.shards import INFO_FILE, sha256, shard_name
from data_pipelines.records.writer import write_json, write_shard
from mtp_jax.errors import DataError

SOURCES_FILE = "sources.json"


def write_split(out: str, dataset: str, split: str, items: list, read, class_names, *,
                settings: dict, num_shards: int = 1, strict: bool = False, log=print) -> dict:
  """Converts `items` ([(relative path, label)]) with read(path, label) -> DownstreamRecord, or
  a list of them (a sample cut into tiles), raising an exception whose message says why a
  sample is unusable; returns the info."""
  split_dir = os.path.join(out, dataset, split)
  signature = {"dataset": dataset, "split": split, "num_shards": num_shards, "strict": strict,
               **settings, "samples": [p for p, _ in items]}
  signature = json.loads(json.dumps(signature))   # as it reads back (tuples become lists)
  info_path = os.path.join(split_dir, INFO_FILE)
  if os.path.isfile(info_path):
    with open(info_path) as f:
      info = json.load(f)
    if info.get("signature") == signature and all(
        os.path.isfile(os.path.join(split_dir, s["file"]))
        and sha256(os.path.join(split_dir, s["file"])) == s["sha256"] for s in info["shards"]):
      log(f"{dataset}/{split}: already converted in {split_dir} (checksums verified), nothing to do")
      return info
  if os.path.isdir(split_dir) and os.listdir(split_dir):
    raise DataError(f"{split_dir} holds another conversion (or a damaged one); delete it or "
                    "choose another --out")
  if not items:
    raise DataError(f"{dataset}/{split}: the split lists no samples")
  os.makedirs(split_dir, exist_ok=True)
  num_shards = max(1, min(num_shards, len(items)))
  shards, skipped, labels = [], [], []
  object_labels, dropped, sources, most, has_objects = [], [], {}, 0, False
  for i, chunk in enumerate(np.array_split(np.arange(len(items)), num_shards)):
    records = []
    for j in chunk:
      path, label = items[j]
      try:
        record = read(path, label)
      except Exception as e:  # noqa: BLE001 (the reader's reason, named in the info)
        if strict:
          raise DataError(f"{dataset}/{split} sample {path!r}: {e}") from None
        skipped.append({"sample": path, "reason": str(e)})
        log(f"skipping {dataset}/{split} {path}: {e}")
        continue
      record = record if isinstance(record, list) else [record]   # a tiled sample: its tiles
      lost = [d for one in record for d in one.dropped]
      if lost and strict:
        raise DataError(f"{dataset}/{split} sample {path!r}: {lost[0][0]}: {lost[0][1]}")
      for where, reason in lost:
        dropped.append({"object": where, "reason": reason})
        log(f"dropping {dataset}/{split} {where}: {reason}")
      for one in record:
        records.append(schema.encode(one))
        labels.append(one.label)
        if one.object_labels is not None:
          has_objects = True
          object_labels.extend(np.asarray(one.object_labels).tolist())
          most = max(most, len(one.object_labels))
        if one.source_annotation is not None:
          sources[one.source_annotation["id"]] = one.source_annotation
    name = shard_name(dataset, split, i, num_shards)
    write_shard(os.path.join(split_dir, name), records)
    shards.append({"file": name, "num_examples": len(records),
                   "sha256": sha256(os.path.join(split_dir, name))})
  if not labels:
    raise DataError(f"no usable sample in {dataset}/{split} ({len(skipped)} skipped)")
  counts = np.bincount([l for l in labels if l >= 0], minlength=len(class_names))
  detection = {}
  if has_objects:
    detection = {"objects_per_class": {c: int(n) for c, n in zip(
                     class_names, np.bincount(object_labels, minlength=len(class_names)))},
                 "max_instances_per_image": most, "dropped_objects": dropped}
  if sources:
    detection["sources_file"] = SOURCES_FILE
    write_json(os.path.join(split_dir, SOURCES_FILE), sources)
  info = {"dataset": dataset, "split": split, "class_names": list(class_names),
          "num_examples": len(labels),
          "examples_per_class": {c: int(n) for c, n in zip(class_names, counts)},
          "shards": shards, "skipped": skipped, **detection, "signature": signature}
  write_json(info_path, info)
  return info
