"""Writing a converted split's files atomically: a shard of serialised records, a JSON file.

Each is written under a temporary name and renamed when complete, so a folder never holds half a
shard or half an info file under its final name (the converters' resume logic relies on it).
"""

import json
import os


def write_shard(path: str, records: list[bytes]):
  """One TFRecord file (CRC-framed) of the serialised `records`, in order."""
  import tensorflow as tf  # lazy: only the writer needs it (CRC-framed TFRecord files)
  tmp = path + ".tmp"
  with tf.io.TFRecordWriter(tmp) as writer:
    for r in records:
      writer.write(r)
  os.replace(tmp, path)


def write_json(path: str, obj):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)
