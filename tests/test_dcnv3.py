"""dcnv3_core against a float64 numpy reference of the definition and the torch twin's transcription
of the official dcnv3_core_pytorch (values and gradients); the DCNv3 module against the twin's
DCNv3_pytorch (`mtp_jax.torch_twin.intern_image`), weights copied over."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dcnv3_reference import reference
from mtp_jax.models.dcnv3 import DCNv3
from mtp_jax.ops import dcnv3_core
from mtp_jax.torch_twin.intern_image import DCNv3 as TorchDCNv3
from mtp_jax.torch_twin.intern_image import dcnv3_core_pytorch

METHODS = ["gather", "matmul"]


# ---- the torch twin of the official code ---------------------------------------------------------

def torch_dcnv3_core(x, offset, mask, *, k, **cfg):
  """The twin's dcnv3_core_pytorch with this file's (and the reference's) `k` for kernel_size."""
  return dcnv3_core_pytorch(x, offset, mask, kernel_size=k, **cfg)


def torch_state_dict(params):
  """Our nested params -> the official state dict (Linear weight = kernel.T, conv (k,k,1,C) -> (C,1,k,k))."""
  sd = {}
  for name in ("input_proj", "output_proj", "offset", "mask"):
    sd[f"{name}.weight"] = params[name]["kernel"].T
    sd[f"{name}.bias"] = params[name]["bias"]
  sd["dw_conv.0.weight"] = params["dw_conv"][0]["kernel"].transpose(3, 2, 0, 1)
  sd["dw_conv.0.bias"] = params["dw_conv"][0]["bias"]
  sd["dw_conv.1.1.weight"] = params["dw_conv"][1][1]["scale"]
  sd["dw_conv.1.1.bias"] = params["dw_conv"][1][1]["bias"]
  for name in ("center_feature_scale_proj_weight", "center_feature_scale_proj_bias"):
    if name in params:
      sd[name] = params[name]
  return {key: torch.tensor(np.array(value)) for key, value in sd.items()}


# ---- inputs ----------------------------------------------------------------------------------------

# (n, h, w, group, group_channels, k, stride, pad, dilation, offset_scale)
CASES = {
    "plain": (2, 7, 9, 1, 3, 3, 1, 1, 1, 1.0),
    "stride2_groups": (1, 8, 6, 2, 4, 3, 2, 1, 1, 0.5),
    "dilation2_pad2": (2, 9, 7, 3, 2, 3, 1, 2, 2, 1.0),
    "k5_stride2": (1, 6, 10, 2, 3, 5, 2, 2, 1, 2.0),
}


def _config(case):
  n, h, w, group, gc, k, stride, pad, dilation, offset_scale = case
  return dict(k=k, stride=stride, pad=pad, dilation=dilation, group=group, offset_scale=offset_scale)


def _inputs(case, seed, spread=4.0):
  n, h, w, group, gc, k, stride, pad, dilation, _ = case
  ho = (h + 2 * pad - (dilation * (k - 1) + 1)) // stride + 1
  wo = (w + 2 * pad - (dilation * (k - 1) + 1)) // stride + 1
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, h, w, group * gc))
  offset = rng.uniform(-spread, spread, size=(n, ho, wo, group * k * k * 2))
  logits = rng.normal(size=(n, ho, wo, group, k * k))
  mask = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(n, ho, wo, -1)
  return x, offset, mask


def _core(method, cfg):
  return jax.jit(lambda x, o, m: dcnv3_core(x, o, m, kernel_size=cfg["k"], stride=cfg["stride"],
                                            pad=cfg["pad"], dilation=cfg["dilation"], group=cfg["group"],
                                            offset_scale=cfg["offset_scale"], method=method))


def _f32(*arrays):
  return tuple(np.asarray(a, np.float32) for a in arrays)


# ---- values ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_values_match_reference_and_torch(case, method):
  cfg = _config(case)
  x, offset, mask = _inputs(case, seed=0)
  offset[0, 0, 0, :2] = [-50.0, 3.0]  # group 0's point 0 of output (0, 0) far outside: reads zero
  want = reference(x, offset, mask, **cfg)
  got = np.asarray(_core(method, cfg)(*_f32(x, offset, mask)))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with torch.no_grad():
    torch_out = torch_dcnv3_core(*(torch.tensor(a) for a in (x, offset, mask)), **cfg).numpy()
  np.testing.assert_allclose(torch_out, want, rtol=1e-10, atol=1e-10)  # the two oracles agree


def test_reference_reads_zero_outside_and_the_centre_at_zero_offset():
  """Anchors the reference itself: zero offsets and a one-hot mask on the centre point copy x;
  on point 1 = (ix 0, iy 1), x-major, i.e. tap (x -1, y 0), they shift x one pixel right; far
  outside is zero."""
  case = (1, 5, 6, 2, 2, 3, 1, 1, 1, 1.0)
  cfg = _config(case)
  x, offset, _ = _inputs(case, seed=1)
  offset[:] = 0.0
  centre = np.zeros((1, 5, 6, 2, 9))
  centre[..., 4] = 1.0
  np.testing.assert_allclose(reference(x, offset, centre.reshape(1, 5, 6, -1), **cfg), x, atol=1e-12)
  left = np.zeros((1, 5, 6, 2, 9))
  left[..., 1] = 1.0
  shifted = np.zeros_like(x)
  shifted[:, :, 1:] = x[:, :, :-1]
  np.testing.assert_allclose(reference(x, offset, left.reshape(1, 5, 6, -1), **cfg), shifted, atol=1e-12)
  offset[:] = 100.0
  assert np.all(reference(x, offset, centre.reshape(1, 5, 6, -1), **cfg) == 0.0)


# ---- gradients -------------------------------------------------------------------------------------

def _weighted_grads(method, cfg, x, offset, mask, weights):
  f = _core(method, cfg)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(*_f32(x, offset, mask))
  return [np.asarray(g, np.float64) for g in grads]


def _central_differences(fn, arrays, eps=1e-6):
  grads = []
  for i, a in enumerate(arrays):
    g = np.zeros_like(a)
    for j in np.ndindex(a.shape):
      plus, minus = [b.copy() for b in arrays], [b.copy() for b in arrays]
      plus[i][j] += eps
      minus[i][j] -= eps
      g[j] = (fn(*plus) - fn(*minus)) / (2 * eps)
    grads.append(g)
  return grads


@functools.cache
def _finite_difference_case():
  """A tiny case away from the bilinear kinks and its float64 central-difference gradients."""
  case = (1, 4, 5, 2, 2, 3, 1, 1, 1, 0.5)
  cfg = _config(case)
  x, offset, mask = _inputs(case, seed=2)
  # Pixel position = integer + taps * 0.5 + offset * 0.5: with offset = 2*int + u, u in [0.2, 0.8],
  # every fractional part lies in [0.1, 0.4] or [0.6, 0.9].
  rng = np.random.default_rng(3)
  offset = 2 * rng.integers(-3, 3, size=offset.shape) + rng.uniform(0.2, 0.8, size=offset.shape)
  x, offset, mask = (np.asarray(a, np.float32).astype(np.float64) for a in (x, offset, mask))
  weights = np.random.default_rng(4).normal(size=(1, 4, 5, 4))
  want = _central_differences(lambda *a: np.sum(reference(*a, **cfg) * weights), [x, offset, mask])
  return cfg, (x, offset, mask), weights, want


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_finite_differences(method):
  cfg, arrays, weights, want = _finite_difference_case()
  got = _weighted_grads(method, cfg, *arrays, weights)
  for name, g, w in zip(("x", "offset", "mask"), got, want):
    assert np.abs(w).max() > 0.1, name
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=name)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", [CASES["stride2_groups"], CASES["dilation2_pad2"]],
                         ids=["stride2_groups", "dilation2_pad2"])
def test_gradients_match_torch_autograd(case, method):
  cfg = _config(case)
  x, offset, mask = _inputs(case, seed=5)
  weights = np.random.default_rng(6).normal(size=reference(x, offset, mask, **cfg).shape)
  tensors = [torch.tensor(a, requires_grad=True) for a in (x, offset, mask)]
  (torch_dcnv3_core(*tensors, **cfg) * torch.tensor(weights)).sum().backward()
  got = _weighted_grads(method, cfg, x, offset, mask, weights)
  for name, g, t in zip(("x", "offset", "mask"), got, tensors):
    want = t.grad.numpy()
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=name)


def test_methods_agree_under_jit():
  case = (2, 12, 11, 4, 8, 3, 1, 1, 1, 1.0)
  cfg = _config(case)
  x, offset, mask = _inputs(case, seed=7, spread=6.0)
  weights = np.random.default_rng(8).normal(size=x.shape)
  outs = [np.asarray(_core(m, cfg)(*_f32(x, offset, mask))) for m in METHODS]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  grads = [_weighted_grads(m, cfg, x, offset, mask, weights) for m in METHODS]
  for name, a, b in zip(("x", "offset", "mask"), *grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=name)


def test_rejects_bad_shapes_and_methods():
  x, offset, mask = _f32(*_inputs(CASES["plain"], seed=0))
  with pytest.raises(ValueError, match="do not fit"):
    dcnv3_core(x, offset[:, :-1], mask, group=1, offset_scale=1.0)
  with pytest.raises(ValueError, match="unknown dcnv3 method"):
    dcnv3_core(x, offset, mask, group=1, offset_scale=1.0, method="cuda")


# ---- the module ------------------------------------------------------------------------------------

EXPECTED_PARAMS = {  # channels 12, group 3, k 3, dw_kernel_size 5
    "input_proj": {"kernel": (12, 12), "bias": (12,)}, "output_proj": {"kernel": (12, 12), "bias": (12,)},
    "offset": {"kernel": (12, 54), "bias": (54,)}, "mask": {"kernel": (12, 27), "bias": (27,)},
    "dw_conv": {0: {"kernel": (5, 5, 1, 12), "bias": (12,)}, 1: {1: {"scale": (12,), "bias": (12,)}}},
    "center_feature_scale_proj_weight": (3, 12), "center_feature_scale_proj_bias": (3,),
}


def _params(module):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def _avg_pool_3x3_zeros(x):
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  return sum(xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


@pytest.mark.parametrize("center_feature_scale", [False, True])
def test_module_init_shapes_and_zero_offset_output(center_feature_scale):
  """Zero-initialised offset and mask: every output is the mean of its 3x3 neighbourhood (zero
  padded) of input_proj(x); the zero centre-feature-scale weights blend it half and half."""
  module = DCNv3(12, 3, center_feature_scale=center_feature_scale, dw_kernel_size=5, rngs=nnx.Rngs(0))
  params = _params(module)
  expected = {k: v for k, v in EXPECTED_PARAMS.items()
              if center_feature_scale or not k.startswith("center_feature_scale")}
  assert jax.tree.map(np.shape, params) == expected
  for name in ("offset", "mask"):
    assert not np.any(params[name]["kernel"]) and not np.any(params[name]["bias"])
  bound = np.sqrt(6.0 / 24)  # xavier-uniform, fan_in + fan_out = 24
  assert 0.5 * bound < np.abs(params["input_proj"]["kernel"]).max() <= bound
  x = np.random.default_rng(0).normal(size=(2, 5, 6, 12)).astype(np.float32)
  out = np.asarray(module(x))
  assert out.shape == (2, 5, 6, 12)
  proj = x @ params["input_proj"]["kernel"] + params["input_proj"]["bias"]
  mixed = _avg_pool_3x3_zeros(proj)
  if center_feature_scale:
    mixed = 0.5 * mixed + 0.5 * proj
  want = mixed @ params["output_proj"]["kernel"] + params["output_proj"]["bias"]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("center_feature_scale", [False, True])
def test_module_with_random_params_matches_torch(center_feature_scale):
  module = DCNv3(12, 3, offset_scale=0.8, center_feature_scale=center_feature_scale,
                 dw_kernel_size=5, rngs=nnx.Rngs(1))
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(9)
  nnx.update(module, jax.tree.unflatten(
      treedef, [jnp.asarray(0.4 * rng.normal(size=np.shape(v)), jnp.float32) for v in leaves]))
  params = _params(module)
  twin = TorchDCNv3(12, group=3, offset_scale=0.8, center_feature_scale=center_feature_scale,
                    dw_kernel_size=5).double()
  twin.load_state_dict({k: v.double() for k, v in torch_state_dict(params).items()}, strict=True)
  x = np.random.default_rng(10).normal(size=(2, 7, 6, 12)).astype(np.float32)
  with torch.no_grad():
    want = twin(torch.tensor(x, dtype=torch.float64)).numpy()
    offsets = twin.offset(twin.dw_conv(torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2)))
  assert 1.0 < offsets.abs().max() < 20.0  # the offsets move samples by pixels, some off the map
  for method in METHODS:
    module.method = method
    got = np.asarray(nnx.jit(lambda m, a: m(a))(module, x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=method)
