"""Shared by the benchmark scripts: print a result and write it as JSON."""

import json
import os


def write_result(result: dict, path: str):
  print(json.dumps(result, indent=1))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
