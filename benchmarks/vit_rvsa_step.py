"""ViT-B+RVSA forward+backward: JAX (jitted) against the PyTorch twin on the same CPU, same run.

    python benchmarks/vit_rvsa_step.py [--size 224] [--batch 2] [--repeats 5] [--method gather]

Loss = sum of squares of the four output maps; both frameworks compute gradients of every
parameter. Prints and writes JSON: compile time, mean step times, the JAX/PyTorch ratio.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from mtp_jax.models import build_encoder
from mtp_jax.torch_twin.vit_rvsa import build_twin
from _report import write_result  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--method", default="gather", choices=["gather", "matmul"])
  p.add_argument("--out", default="benchmarks/results/vit_rvsa_step.json")
  args = p.parse_args()
  images = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)

  enc = build_encoder("vit_b_rvsa", args.size, rngs=nnx.Rngs(0), grid_sample_method=args.method)
  graphdef, params = nnx.split(enc, nnx.Param)

  def loss(params, x):
    return sum(jnp.sum(f ** 2) for f in nnx.merge(graphdef, params)(x))

  step = jax.jit(jax.value_and_grad(loss))
  t = time.perf_counter()
  compiled = step.lower(params, images).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(params, images))
  t = time.perf_counter()
  for _ in range(args.repeats):
    out = compiled(params, images)
  jax.block_until_ready(out)
  jax_s = (time.perf_counter() - t) / args.repeats

  twin = build_twin("vit_b_rvsa", args.size).train()
  x = torch.from_numpy(images.transpose(0, 3, 1, 2))

  def torch_step():
    twin.zero_grad(set_to_none=True)
    sum((f ** 2).sum() for f in twin(x)).backward()

  torch_step()
  t = time.perf_counter()
  for _ in range(args.repeats):
    torch_step()
  torch_s = (time.perf_counter() - t) / args.repeats
  result = {"model": "vit_b_rvsa", "image_px": args.size, "batch": args.batch,
            "grid_sample": args.method, "backend": jax.default_backend(),
            "torch_threads": torch.get_num_threads(), "jax_compile_s": round(compile_s, 1),
            "jax_step_s": round(jax_s, 3), "torch_step_s": round(torch_s, 3),
            "jax_over_torch": round(jax_s / torch_s, 3)}
  write_result(result, args.out)


if __name__ == "__main__":
  main()
