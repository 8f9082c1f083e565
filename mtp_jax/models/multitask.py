"""The multi-task pretraining model: one shared encoder and one head per enabled task.

One step runs the encoder ONCE over the images of all subsets (MTP_SPEC §3.2). The batch is laid
out (b, G) -> b*G, image i of subset g at row i*G + g, so that splitting by subset is a local
reshape on every device (each device holds whole (i, :) rows) and per-subset BatchNorm statistics
are a reduction over one axis. Each head (built by its task, mtp_jax/tasks/) holds the task's
shared decoder and its per-subset predictors; the model names no task.
"""

import jax
import jax.numpy as jnp
from flax import nnx

# RGB mean / std of the original preprocessor (MTP_SPEC §3.4), on 0..255 pixel values.
IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)


def normalize_images(images_uint8, dtype=jnp.float32):
  """(..., 3) uint8 RGB -> float (x - mean) / std."""
  x = images_uint8.astype(jnp.float32)
  return ((x - jnp.asarray(IMAGE_MEAN)) / jnp.asarray(IMAGE_STD)).astype(dtype)


class MultiTaskModel(nnx.Module):
  """encoder + `heads[task]`, each built by `tasks[task].build_head` on the encoder's 4 maps.

  Heads are built in task order after the encoder, so a model's initial parameters depend only
  on the seed and the enabled tasks.
  """

  def __init__(self, encoder, tasks: dict, *, rngs: nnx.Rngs, dtype=None):
    self.encoder = encoder
    dims = [encoder.embed_dim] * 4
    self.heads = nnx.Dict({name: task.build_head(dims, rngs=rngs, dtype=dtype)
                           for name, task in tasks.items()})

  def features(self, images, *, train: bool, key=None) -> list:
    """images (b*G, S, S, 3) uint8, interleaved by subset -> the encoder's 4 NHWC maps."""
    x = normalize_images(images, self.encoder.dtype or jnp.float32)
    return self.encoder(x, train=train, key=key if key is not None else jax.random.key(0))


def task_keys(key, names) -> tuple:
  """(encoder key, {task: key}) from one step key: each task its own independent stream."""
  k_enc, k_heads = jax.random.split(key)
  return k_enc, {n: jax.random.fold_in(k_heads, i) for i, n in enumerate(names)}
