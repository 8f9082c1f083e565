"""A converted split's folder: shard names, checksums, `dataset_info.json`, and which shards a
process reads.

`<data_dir>/<subset>/<split>/` holds the shards `<subset>-<split>.tfrecord-0000i-of-0000K` and
`dataset_info.json`, whose "shards" list names them in order ({"file", "num_examples",
"sha256"}) and whose "max_instances_per_image" (detection datasets) sizes evaluation examples.
Shards are dealt to readers round robin: reader i of n reads shards i::n.
"""

import hashlib
import json
import os

from mtp_jax.errors import DataError

INFO_FILE = "dataset_info.json"


def shard_name(subset: str, split: str, index: int, count: int) -> str:
  return f"{subset}-{split}.tfrecord-{index:05d}-of-{count:05d}"


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def load_info(data_dir: str, subset: str, split: str) -> dict:
  """Reads `<data_dir>/<subset>/<split>/dataset_info.json`, or raises DataError with a hint."""
  path = os.path.join(data_dir, subset, split, INFO_FILE)
  if not os.path.isfile(path):
    raise DataError(
        f"{data_dir!r} is not a converted SAMRS TFRecord folder: {path} does not exist. Convert a "
        f"SAMRS tree first: python -m data_pipelines.samrs.convert --root SAMRS_DIR --out {data_dir}")
  try:
    with open(path) as f:
      info = json.load(f)
    missing = [s["file"] for s in info["shards"]
               if not os.path.isfile(os.path.join(data_dir, subset, split, s["file"]))]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path} is unreadable or malformed ({type(e).__name__}: {e})") from None
  if missing:
    raise DataError(f"{path} lists shards that do not exist: {missing}")
  return info


def eval_max_instances(data_dir: str, subset: str, split: str = "valid") -> int:
  """Instances to pack per evaluation image: the most any image of the split has (from
  dataset_info.json), so that evaluation scores against the full ground truth, never a cap."""
  info = load_info(data_dir, subset, split)
  if "max_instances_per_image" not in info:
    raise DataError(f"{data_dir}/{subset}/{split}/{INFO_FILE} lacks max_instances_per_image; "
                    "reconvert it with python -m data_pipelines.samrs.convert")
  return max(int(info["max_instances_per_image"]), 1)


def shard_files(data_dir: str, subset: str, split: str, process_index: int = 0,
                process_count: int = 1) -> list[str]:
  """This process's shard paths of one subset/split."""
  info = load_info(data_dir, subset, split)
  files = [os.path.join(data_dir, subset, split, s["file"]) for s in info["shards"]]
  mine = files[process_index::process_count]
  if not mine:
    raise DataError(f"{subset}/{split} has {len(files)} shard(s), fewer than the {process_count} "
                    f"readers (processes or data.num_streams); reconvert with --num-shards >= {process_count}")
  return mine


def check_shard_counts(data_dir: str, subsets, split: str, readers: int):
  """Raises DataError unless every subset's split has a shard for each of `readers` readers.

  Every process calls this before any work, so a job that cannot feed all its processes stops
  everywhere with the same message instead of one process failing while the others wait.
  """
  for subset in subsets:
    shard_files(data_dir, subset, split, readers - 1, readers)
