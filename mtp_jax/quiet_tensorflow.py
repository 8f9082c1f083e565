"""TensorFlow's start-up messages off, for the command-line entry points.

TensorFlow is only a file-format library here (TFRecord writing, tf.train.Example protos,
TensorBoard summaries through CLU); it runs none of the model's numerics. Left alone it prints
INFO lines on import (on CPUs with AVX-512 or AMX, "oneDNN custom operations are on" twice,
before absl's logging starts, so TF_CPP_MIN_LOG_LEVEL does not hide it), in front of the one-line
errors our commands give. Call before anything imports TensorFlow; a value the user set wins.
"""

import os


def quiet_tensorflow() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # only TF's own CPU kernels; not JAX's
