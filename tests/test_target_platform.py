"""Ops take the form of the platform a program is compiled for, which the planner sets."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtp_jax import experiment
from mtp_jax.ops import conv, rois, target


def test_platform_defaults_to_the_backend_and_follows_compiling_for():
  assert target.platform() == jax.default_backend()
  with target.compiling_for("tpu"):
    assert target.platform() == "tpu"
    with target.compiling_for("gpu"):
      assert target.platform() == "gpu"
    assert target.platform() == "tpu"
    assert target.by_platform(cpu=1, accelerator=2) == 2
  assert target.platform() == jax.default_backend() == "cpu"
  assert target.by_platform(cpu=1, accelerator=2) == 1
  with pytest.raises(ValueError, match="unknown platform 'tpuv5'"):
    with target.compiling_for("tpuv5"):
      pass


def test_auto_compute_dtype_is_bfloat16_on_accelerators_and_float32_on_the_cpu():
  config = ml_collections.ConfigDict({"model": {"compute_dtype": "auto"}})
  with target.compiling_for("cpu"):
    assert experiment.compute_dtype_name(config) == "float32" and experiment.compute_dtype(config) is None
  for platform in ("tpu", "gpu"):
    with target.compiling_for(platform):
      assert experiment.compute_dtype(config) == jnp.bfloat16
  config.model.compute_dtype = "bfloat16"
  with target.compiling_for("cpu"):
    assert experiment.compute_dtype_name(config) == "bfloat16"


def _jaxpr(fn, *args, platform):
  # A new function object per trace: jax caches traces by function, not by target platform.
  with target.compiling_for(platform):
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def test_conv_kernel_gradient_form_follows_the_target():
  x, k = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
  grad = jax.grad(lambda k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn).sum())
  assert "dot_general" in _jaxpr(grad, k, platform="cpu")       # per-tap matmuls
  assert "dot_general" not in _jaxpr(grad, k, platform="tpu")   # XLA's own gradient


def test_roi_chunks_on_the_cpu_only():
  feats = np.zeros((1, 16, 16, 4), np.float32)
  boxes = np.tile(np.array([[2.0, 2.0, 30.0, 40.0]], np.float32), (300, 1))
  fn = lambda f: rois.roi_align(f, boxes, np.zeros(300, np.int32), 7, 0.25, dense=False)
  assert "scan" in _jaxpr(fn, feats, platform="cpu")       # 128 boxes at a time
  assert "scan" not in _jaxpr(fn, feats, platform="tpu")   # all at once


def test_dcnv3_auto_takes_matmul_on_tpu_for_small_maps_and_gather_elsewhere():
  """The TPU compiler's figures (benchmarks/dcnv3_tpu.py) chose matmul for maps of up to 56 x 56
  positions on TPU and gather above and on the other platforms; the traced program says which."""
  from mtp_jax.ops import dcnv3
  assert dcnv3.resolve_method("auto", 56, 56) == "gather" and dcnv3.resolve_method("matmul", 8, 8) == "matmul"
  with target.compiling_for("tpu"):
    assert dcnv3.resolve_method("auto", 56, 56) == "matmul" and dcnv3.resolve_method("auto", 57, 56) == "gather"
    assert dcnv3.resolve_method("gather", 8, 8) == "gather"
  with target.compiling_for("gpu"):
    assert dcnv3.resolve_method("auto", 8, 8) == "gather"
  with pytest.raises(ValueError, match="unknown dcnv3 method 'fast'"):
    dcnv3.resolve_method("fast", 8, 8)
  x, offset, mask = jnp.zeros((1, 8, 8, 16)), jnp.zeros((1, 8, 8, 18)), jnp.full((1, 8, 8, 9), 1 / 9)
  def program(platform):
    with target.compiling_for(platform):   # a fresh function each time: jax caches traces per function
      return jax.jit(lambda a, o, m: dcnv3.dcnv3_core(a, o, m, group=1, offset_scale=1.0)).lower(x, offset, mask).as_text()
  assert "gather" in program("cpu") and "dot_general" in program("tpu") and "gather" not in program("tpu")
