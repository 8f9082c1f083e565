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


def normalize_images(images, dtype=jnp.float32, mean=IMAGE_MEAN, std=IMAGE_STD):
  """(..., C) pixel values -> float (x - mean) / std, mean/std per channel (C of them)."""
  x = images.astype(jnp.float32)
  return ((x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


class MultiTaskModel(nnx.Module):
  """encoder + `heads[task]`, each built by `tasks[task].build_head` on the encoder's 4 maps.

  Heads are built in task order after the encoder, so a model's initial parameters depend only
  on the seed and the enabled tasks. The encoder gives the tasks its fpn outputs (strides 4-32),
  or its raw stride-16 maps when the tasks ask for them (`Task.multi_scale` False: scene
  classification). mean / std: per-band pixel statistics of the dataset (the RGB ones of §3.4
  by default). freeze_encoder: the encoder runs in inference mode (no stochastic depth) and no
  gradient flows into it (linear probing / frozen-backbone finetuning; the optimizer also
  leaves its parameters untouched, mtp_jax/train/optimizer.py).
  """

  def __init__(self, encoder, tasks: dict, *, rngs: nnx.Rngs, dtype=None, mean=IMAGE_MEAN,
               std=IMAGE_STD, freeze_encoder: bool = False):
    self.encoder = encoder
    scales = {bool(task.multi_scale) for task in tasks.values()}
    if len(scales) > 1:
      raise ValueError(f"tasks {sorted(tasks)} need different encoder outputs (fpn maps and raw "
                       "stride-16 maps); run them in separate experiments")
    self.multi_scale = scales.pop() if scales else True
    self.mean, self.std = tuple(float(m) for m in mean), tuple(float(v) for v in std)
    self.freeze_encoder = freeze_encoder
    dims = list(encoder.out_channels)
    self.heads = nnx.Dict({name: task.build_head(dims, rngs=rngs, dtype=dtype)
                           for name, task in tasks.items()})

  def features(self, images, *, train: bool, key=None) -> list:
    """images (b*G, S, S, C) pixels, interleaved by subset -> the encoder's 4 NHWC maps.

    Multi-date examples (change detection) are (b*G, T, S, S, C): the encoder runs once over all
    b*G*T images, and the maps' rows are image r's date t at r*T + t."""
    if images.ndim == 5:
      images = images.reshape(-1, *images.shape[2:])
    x = normalize_images(images, self.encoder.dtype or jnp.float32, self.mean, self.std)
    key = key if key is not None else jax.random.key(0)
    with jax.named_scope("encoder"):   # names the compiled kernels (python -m mtp_jax.plan --top)
      features = self.encoder(x, train=train and not self.freeze_encoder, key=key,
                              multi_scale=self.multi_scale)
    if self.freeze_encoder:
      features = [jax.lax.stop_gradient(f) for f in features]
    return features


def task_keys(key, names) -> tuple:
  """(encoder key, {task: key}) from one step key: each task its own independent stream."""
  k_enc, k_heads = jax.random.split(key)
  return k_enc, {n: jax.random.fold_in(k_heads, i) for i, n in enumerate(names)}
