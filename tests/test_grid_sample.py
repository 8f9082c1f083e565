"""grid_sample agrees with torch.nn.functional.grid_sample(align_corners=True, padding='zeros')."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mtp_jax.ops.grid_sample import grid_sample


def _inputs(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, 9, 7, 4)).astype(np.float32)
  grid = rng.uniform(-1.4, 1.4, size=(3, 5, 6, 2)).astype(np.float32)  # some points outside
  grid[0, 0, 0] = [-1.0, 1.0]   # exact corners
  grid[0, 0, 1] = [1.0, -1.0]
  grid[0, 0, 2] = [3.0, 0.0]    # far outside: zero
  return x, grid


def _torch(x, grid):
  xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  gt = torch.tensor(grid, requires_grad=True)
  out = torch.nn.functional.grid_sample(xt, gt, mode="bilinear", padding_mode="zeros", align_corners=True)
  weights = torch.tensor(np.random.default_rng(9).normal(size=out.shape).astype(np.float32))
  (out * weights).sum().backward()
  return (out.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
          gt.grad.numpy(), weights.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("method", ["gather", "matmul"])
def test_values_and_gradients_match_torch(method):
  x, grid = _inputs(0)
  want, want_dx, want_dgrid, weights = _torch(x, grid)
  f = jax.jit(lambda a, g: grid_sample(a, g, method))
  np.testing.assert_allclose(np.asarray(f(x, grid)), want, rtol=1e-5, atol=1e-5)
  assert np.asarray(f(x, grid))[0, 0, 2].tolist() == [0.0] * 4
  dx, dgrid = jax.grad(lambda a, g: jnp.sum(f(a, g) * weights), argnums=(0, 1))(x, grid)
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-4, atol=1e-5)
  # Away from pixel-aligned kinks the grid gradient is unique; the random points are not aligned.
  np.testing.assert_allclose(np.asarray(dgrid)[1:], want_dgrid[1:], rtol=1e-4, atol=1e-4)
