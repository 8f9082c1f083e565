"""Gather vs interpolation-matrix (matmul) grid sampling at RVSA shapes (figures, not a test).

    python benchmarks/grid_sample.py [--out benchmarks/results/grid_sample.json]

Shapes: k/v maps of ViT-B+RVSA, batch 2 x 12 heads, head_dim 64, on the padded token grid of
224 px (14x14), 448 px (28x28) and 512 px (35x35). Times jitted forward and forward+backward
(gradients to the map and the grid) on the default backend.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.ops.grid_sample import grid_sample
from _report import write_result  # noqa: E402


def timeit(fn, *args, repeats=10):
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / repeats


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="benchmarks/results/grid_sample.json")
  args = p.parse_args()
  rows = []
  for px, side in ((224, 14), (448, 28), (512, 35)):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(24, side, side, 64)), jnp.float32)
    grid = jnp.asarray(rng.uniform(-1.1, 1.1, size=(24, side, side, 2)), jnp.float32)
    for method in ("gather", "matmul"):
      fwd = jax.jit(lambda a, g, m=method: grid_sample(a, g, m))
      bwd = jax.jit(jax.grad(lambda a, g, m=method: jnp.sum(grid_sample(a, g, m) ** 2), argnums=(0, 1)))
      rows.append({"image_px": px, "grid": side, "method": method,
                   "forward_ms": round(1e3 * timeit(fwd, x, grid), 3),
                   "forward_backward_ms": round(1e3 * timeit(bwd, x, grid), 3)})
      print(rows[-1], flush=True)
  result = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "rows": rows}
  write_result(result, args.out)


if __name__ == "__main__":
  main()
