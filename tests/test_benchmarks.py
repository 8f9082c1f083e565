"""Smoke test of the MFU harness (benchmarks/mfu.py) at its tiniest settings: it runs end to end
in a fresh process (one CPU device, as a user runs it) and every figure it writes is finite and
positive. Its figures themselves are never asserted (benchmarks are not timed tests), so it
compiles as the tests do (TEST_XLA_FLAGS: LLVM level 0), on one device."""

import json
import math
import os
import subprocess
import sys

from conftest import ROOT, TEST_XLA_FLAGS


def test_mfu_harness_writes_finite_positive_figures(tmp_path):
  out = tmp_path / "mfu.json"
  env = {**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "mfu.py"), "--tiny",
                         "--parts", "encoder", "ss", "--steps", "1", "--out", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert [r["part"] for r in result["rows"]] == ["encoder", "ss"]
  assert result["peak_tflops"] > 0 and result["peak_source"]
  for row in result["rows"]:
    for key in ("compile_s", "step_s", "images_per_s", "gflops_per_step_per_device", "mfu",
                "memory_gib_per_device"):
      assert math.isfinite(row[key]) and row[key] > 0, (row["part"], key, row[key])
