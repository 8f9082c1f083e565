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

import dataclasses
import json
import os

import numpy as np

from data_pipelines.downstream import schema
from data_pipelines.records.shards import INFO_FILE, sha256, shard_name
from data_pipelines.records.writer import write_json, write_shard
from mtp_jax.errors import DataError

SOURCES_FILE = "sources.json"


@dataclasses.dataclass
class _Tally:
  """What a split's info counts besides its shards, gathered while the shards are written."""
  labels: list = dataclasses.field(default_factory=list)          # one per record, -1: none
  skipped: list = dataclasses.field(default_factory=list)         # [{"sample", "reason"}]
  dropped: list = dataclasses.field(default_factory=list)         # [{"object", "reason"}]
  object_labels: list = dataclasses.field(default_factory=list)   # every object's class
  sources: dict = dataclasses.field(default_factory=dict)         # source annotations by id
  most: int = 0                # the most objects in one record
  has_objects: bool = False    # whether any record has an object list (a detection dataset)


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
  info = _finished_info(split_dir, signature)
  if info is not None:
    log(f"{dataset}/{split}: already converted in {split_dir} (checksums verified), nothing to do")
    return info
  if os.path.isdir(split_dir) and os.listdir(split_dir):
    raise DataError(f"{split_dir} holds another conversion (or a damaged one); delete it or "
                    "choose another --out")
  if not items:
    raise DataError(f"{dataset}/{split}: the split lists no samples")
  os.makedirs(split_dir, exist_ok=True)
  num_shards = max(1, min(num_shards, len(items)))
  shards, tally = [], _Tally()
  for i, chunk in enumerate(np.array_split(np.arange(len(items)), num_shards)):
    records = []
    for j in chunk:
      path, label = items[j]
      for one in _read_item(read, path, label, f"{dataset}/{split}", tally, strict, log):
        records.append(_encode_and_count(one, tally))
    name = shard_name(dataset, split, i, num_shards)
    write_shard(os.path.join(split_dir, name), records)
    shards.append({"file": name, "num_examples": len(records),
                   "sha256": sha256(os.path.join(split_dir, name))})
  if not tally.labels:
    raise DataError(f"no usable sample in {dataset}/{split} ({len(tally.skipped)} skipped)")
  counts = np.bincount([l for l in tally.labels if l >= 0], minlength=len(class_names))
  detection = _detection_info(tally, class_names, split_dir)
  info = {"dataset": dataset, "split": split, "class_names": list(class_names),
          "num_examples": len(tally.labels),
          "examples_per_class": {c: int(n) for c, n in zip(class_names, counts)},
          "shards": shards, "skipped": tally.skipped, **detection, "signature": signature}
  write_json(info_path, info)
  return info


def _finished_info(split_dir: str, signature: dict) -> dict | None:
  """The info of the conversion in `split_dir` if it has `signature` and intact shards, else None."""
  info_path = os.path.join(split_dir, INFO_FILE)
  if not os.path.isfile(info_path):
    return None
  with open(info_path) as f:
    info = json.load(f)
  if info.get("signature") == signature and all(
      os.path.isfile(os.path.join(split_dir, s["file"]))
      and sha256(os.path.join(split_dir, s["file"])) == s["sha256"] for s in info["shards"]):
    return info
  return None


def _read_item(read, path: str, label, split_name: str, tally: _Tally, strict: bool, log) -> list:
  """read(path, label) as a list of records, [] if skipped; skips and drops go to `tally` (or raise)."""
  try:
    record = read(path, label)
  except Exception as e:  # noqa: BLE001 (the reader's reason, named in the info)
    if strict:
      raise DataError(f"{split_name} sample {path!r}: {e}") from None
    tally.skipped.append({"sample": path, "reason": str(e)})
    log(f"skipping {split_name} {path}: {e}")
    return []
  record = record if isinstance(record, list) else [record]   # a tiled sample: its tiles
  lost = [d for one in record for d in one.dropped]
  if lost and strict:
    raise DataError(f"{split_name} sample {path!r}: {lost[0][0]}: {lost[0][1]}")
  for where, reason in lost:
    tally.dropped.append({"object": where, "reason": reason})
    log(f"dropping {split_name} {where}: {reason}")
  return record


def _encode_and_count(one, tally: _Tally) -> bytes:
  """Counts one record's label, objects and source annotation in `tally`; returns it encoded."""
  encoded = schema.encode(one)
  tally.labels.append(one.label)
  if one.object_labels is not None:
    tally.has_objects = True
    tally.object_labels.extend(np.asarray(one.object_labels).tolist())
    tally.most = max(tally.most, len(one.object_labels))
  if one.source_annotation is not None:
    tally.sources[one.source_annotation["id"]] = one.source_annotation
  return encoded


def _detection_info(tally: _Tally, class_names, split_dir: str) -> dict:
  """The info's object counts and dropped objects, if any; writes SOURCES_FILE if sources were kept."""
  detection = {}
  if tally.has_objects:
    detection = {"objects_per_class": {c: int(n) for c, n in zip(
                     class_names, np.bincount(tally.object_labels, minlength=len(class_names)))},
                 "max_instances_per_image": tally.most, "dropped_objects": tally.dropped}
  if tally.sources:
    detection["sources_file"] = SOURCES_FILE
    write_json(os.path.join(split_dir, SOURCES_FILE), tally.sources)
  return detection
