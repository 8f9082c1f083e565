"""BatchNorm with per-subset statistics, for decoders shared across the SAMRS subsets.

The original runs each shared decoder once per dataset batch with SyncBN (MTP_SPEC §3.2), so the
training statistics of a subset's images never mix with another subset's. Here the decoder runs
once over the whole batch laid out (b, G) -> b*G (image i of subset g at row i*G + g), and this
layer computes the statistics of each group g over its b images (all devices: under jit the mean
over a sharded batch axis is global, i.e. SyncBN). Running statistics are updated once per group,
in subset order, with PyTorch's momentum (0.1) and unbiased variance, exactly as three sequential
SyncBN calls would.
"""

import jax.numpy as jnp
from flax import nnx

from mtp_jax.models.layers import axes


class SubsetBatchNorm(nnx.Module):
  """x: (b*G, H, W, C) with rows interleaved by group; `groups`=G. Eval uses running statistics."""

  def __init__(self, dim: int, *, eps: float = 1e-5, momentum: float = 0.1):
    self.scale = nnx.Param(jnp.ones((dim,)), **axes("conv_out"))
    self.bias = nnx.Param(jnp.zeros((dim,)), **axes("conv_out"))
    self.mean = nnx.BatchStat(jnp.zeros((dim,)))
    self.var = nnx.BatchStat(jnp.ones((dim,)))
    self.eps, self.momentum = eps, momentum

  def __call__(self, x, *, groups: int, train: bool):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if not train:
      y = (x - self.mean[...]) / jnp.sqrt(self.var[...] + self.eps)
      return (y * self.scale[...] + self.bias[...]).astype(dtype)
    n, h, w, c = x.shape
    if n % groups:
      raise ValueError(f"batch of {n} rows does not split into {groups} subset groups")
    xg = x.reshape(n // groups, groups, h, w, c)
    mean = xg.mean(axis=(0, 2, 3), keepdims=True)                    # (1, G, 1, 1, C)
    var = jnp.square(xg - mean).mean(axis=(0, 2, 3), keepdims=True)  # biased, for normalising
    y = ((xg - mean) / jnp.sqrt(var + self.eps)).reshape(n, h, w, c)
    count = (n // groups) * h * w
    unbiased = var.reshape(groups, c) * (count / max(count - 1, 1))
    running_mean, running_var = self.mean[...], self.var[...]
    for g in range(groups):
      running_mean = (1 - self.momentum) * running_mean + self.momentum * mean.reshape(groups, c)[g]
      running_var = (1 - self.momentum) * running_var + self.momentum * unbiased[g]
    self.mean[...] = running_mean
    self.var[...] = running_var
    return (y * self.scale[...] + self.bias[...]).astype(dtype)
