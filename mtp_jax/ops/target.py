"""The platform a traced program will run on, for ops whose best form differs by backend.

Tracing normally happens where the program runs, so the answer is `jax.default_backend()`. The
planner (`python -m mtp_jax.plan`) traces on this machine's CPU for a TPU slice: it sets the
platform it compiles for, so every op takes the form the TPU will run.

    if target.platform() == "cpu": ...          # inside an op, at trace time
    size = target.by_platform(cpu=1024, accelerator=None)   # a default that differs by backend
    with target.compiling_for("tpu"): jitted.lower(...)
"""

import contextlib
import contextvars

import jax

_PLATFORM = contextvars.ContextVar("mtp_jax_target_platform", default=None)


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': where the program being traced will run."""
  return _PLATFORM.get() or jax.default_backend()


def by_platform(*, cpu, accelerator):
  """`cpu` when the program being traced runs on the CPU, else `accelerator` (TPU, GPU): the
  one rule behind every default that follows the backend."""
  return cpu if platform() == "cpu" else accelerator


@contextlib.contextmanager
def compiling_for(name: str):
  """Trace for platform `name` ('cpu', 'gpu', 'tpu') inside the block."""
  if name not in ("cpu", "gpu", "tpu"):
    raise ValueError(f"unknown platform {name!r}: expected 'cpu', 'gpu' or 'tpu'")
  token = _PLATFORM.set(name)
  try:
    yield
  finally:
    _PLATFORM.reset(token)
