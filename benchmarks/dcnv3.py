"""DCNv3 core: gather vs matmul formulation at InternImage-XL shapes (figures, not a test).

    python benchmarks/dcnv3.py [--stages 1 2 3 4] [--out benchmarks/results/dcnv3.json]

Shapes: the four stages of InternImage-XL at 224 px, batch 2: 56x56 C=192 group 12, 28x28 C=384
group 24, 14x14 C=768 group 48, 7x7 C=1536 group 96 (group_channels 16, kernel 3, stride 1, pad 1),
offsets uniform in +-3 pixels. Times the jitted forward and forward+backward (gradients to x,
offset and mask) of `dcnv3_core` on the default backend, the median of 3-10 calls, and the
forward of the float64 numpy reference (tests/dcnv3_reference.py, a loop over groups and
points) once.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.ops.dcnv3 import dcnv3_core
from _report import write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from dcnv3_reference import reference  # noqa: E402

STAGES = {1: (56, 192, 12), 2: (28, 384, 24), 3: (14, 768, 48), 4: (7, 1536, 96)}


def timeit(fn, *args, min_seconds=1.0, max_repeats=10):
  """Median seconds per call after a warm-up call (the median: the 2-core box is often shared)."""
  jax.block_until_ready(fn(*args))
  times = []
  while len(times) < max_repeats and (len(times) < 3 or sum(times) < min_seconds):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def inputs(side, channels, group, batch=2, points=9):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, side, side, channels)).astype(np.float32)
  offset = rng.uniform(-3, 3, size=(batch, side, side, group * points * 2)).astype(np.float32)
  logits = rng.normal(size=(batch, side, side, group, points))
  mask = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(batch, side, side, -1)
  return x, offset, mask.astype(np.float32)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--stages", type=int, nargs="+", default=sorted(STAGES))
  p.add_argument("--out", default="benchmarks/results/dcnv3.json")
  args = p.parse_args()
  rows = []
  for stage in args.stages:
    side, channels, group = STAGES[stage]
    x, offset, mask = inputs(side, channels, group)
    t = time.perf_counter()
    reference(x, offset, mask, k=3, stride=1, pad=1, dilation=1, group=group, offset_scale=1.0)
    reference_ms = 1e3 * (time.perf_counter() - t)
    for method in ("gather", "matmul"):
      def core(a, o, m, method=method):
        return dcnv3_core(a, o, m, group=group, offset_scale=1.0, method=method)
      fwd = jax.jit(core)
      bwd = jax.jit(jax.grad(lambda a, o, m, f=core: jnp.sum(f(a, o, m) ** 2), argnums=(0, 1, 2)))
      rows.append({"stage": stage, "map": side, "channels": channels, "group": group, "method": method,
                   "forward_ms": round(1e3 * timeit(fwd, x, offset, mask), 2),
                   "forward_backward_ms": round(1e3 * timeit(bwd, x, offset, mask), 2),
                   "numpy_reference_forward_ms": round(reference_ms, 1)})
      print(rows[-1], flush=True)
  print(f"\n{'stage':>5} {'map':>4} {'C':>5} {'G':>3} {'method':>7} {'fwd ms':>9} {'fwd+bwd ms':>11} "
        f"{'numpy fwd ms':>13}")
  for r in rows:
    print(f"{r['stage']:>5} {r['map']:>4} {r['channels']:>5} {r['group']:>3} {r['method']:>7} "
          f"{r['forward_ms']:>9} {r['forward_backward_ms']:>11} {r['numpy_reference_forward_ms']:>13}")
  result = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "batch": 2, "kernel_size": 3, "rows": rows}
  write_result(result, args.out)


if __name__ == "__main__":
  main()
