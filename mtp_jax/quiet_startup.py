"""Start-up messages of libraries off, for the command-line entry points and the notebook.

TensorFlow is only a file-format library here (TFRecord writing, tf.train.Example protos,
TensorBoard summaries through CLU); it runs none of the model's numerics. Left alone it prints
INFO lines on import (on CPUs with AVX-512 or AMX, "oneDNN custom operations are on" twice,
before absl's logging starts, so TF_CPP_MIN_LOG_LEVEL does not hide it), in front of the one-line
errors our commands give.

libtpu (the `tpu` extra: the TPU compiler that `python -m mtp_jax.plan` uses) makes JAX try the
TPU runtime at start-up; on a machine with no TPU chip it falls back to the CPU or GPU, after
printing that it could not find the TPU's accelerator type and worker hosts. Where no TPU chip
is attached, those two are named for it (`localhost`, and the accelerator type of a one-chip
v5e) so it stays silent; on a TPU machine nothing is changed.

Call before JAX or TensorFlow is imported; a value the user set wins.
"""

import os


def quiet_startup() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # only TF's own CPU kernels; not JAX's
  if _libtpu_without_chips():
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")


def _libtpu_without_chips() -> bool:
  """libtpu is installed and no TPU chip is attached to this machine."""
  import importlib.util  # noqa: PLC0415
  if importlib.util.find_spec("libtpu") is None:
    return False
  from jax._src import hardware_utils  # noqa: PLC0415 (imports no backend)
  chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  return chips == 0
