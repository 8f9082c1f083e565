"""`import mtp_jax` and the model/step modules must not pull in TensorFlow or torch (DESIGN.md §4)."""

import subprocess
import sys


def test_core_imports_stay_light():
  code = ("import sys, mtp_jax, mtp_jax.models, mtp_jax.ops, mtp_jax.train.step, mtp_jax.parallel.sharding\n"
          "heavy = sorted(m for m in ('tensorflow', 'torch') if m in sys.modules)\n"
          "assert not heavy, heavy\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
