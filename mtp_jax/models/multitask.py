"""The multi-task pretraining model: one shared encoder, shared task decoders, per-subset predictors.

One step runs the encoder ONCE over the images of all subsets (MTP_SPEC §3.2). The batch is laid
out (b, G) -> b*G, image i of subset g at row i*G + g, so that splitting by subset is a local
reshape on every device (each device holds whole (i, :) rows) and per-subset BatchNorm statistics
are a reduction over one axis.

Tasks: `HEADS` run now; `PENDING_HEADS` are named in the config and join when their heads land.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax.models.heads.upernet import SegPredictor, UperNetTrunk

# RGB mean / std of the original preprocessor (MTP_SPEC §3.4), on 0..255 pixel values.
IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)

HEADS = {"ss": "UperNet semantic segmentation"}
PENDING_HEADS = {"is": "Mask R-CNN instance segmentation", "rd": "Oriented R-CNN rotated detection"}


def normalize_images(images_uint8, dtype=jnp.float32):
  """(..., 3) uint8 RGB -> float (x - mean) / std."""
  x = images_uint8.astype(jnp.float32)
  return ((x - jnp.asarray(IMAGE_MEAN)) / jnp.asarray(IMAGE_STD)).astype(dtype)


class MultiTaskModel(nnx.Module):
  """encoder + {'ss': UperNet} decoders; `subsets` maps subset name -> class count (no background)."""

  def __init__(self, encoder, subsets: dict, *, tasks=("ss",), seg_channels: int = 256,
               seg_dropout: float = 0.1, seg_norm: str = "batch", rngs: nnx.Rngs, dtype=None):
    unknown = set(tasks) - set(HEADS)
    if unknown:
      raise ValueError(f"tasks {sorted(unknown)} have no head yet; available: {sorted(HEADS)}")
    self.subsets = tuple(subsets)
    self.tasks = tuple(tasks)
    self.encoder = encoder
    dims = [encoder.embed_dim] * 4
    self.semsegdecoder = UperNetTrunk(dims, seg_channels, dtype=dtype, norm=seg_norm, rngs=rngs)
    # +1: index 0 is background for semantic segmentation (MTP_SPEC §3.1).
    self.semseghead = nnx.Dict({s: SegPredictor(seg_channels, n + 1, dropout=seg_dropout,
                                                dtype=dtype, rngs=rngs)
                                for s, n in subsets.items()})

  def __call__(self, images, *, train: bool, key=None) -> dict:
    """images (b*G, S, S, 3) uint8, interleaved by subset. Returns {'ss': {subset: logits}}."""
    groups = len(self.subsets)
    if key is None:
      key = jax.random.key(0)
    k_enc, k_head = jax.random.split(key)
    x = normalize_images(images, self.encoder.dtype or jnp.float32)
    features = self.encoder(x, train=train, key=k_enc)
    out = {}
    if "ss" in self.tasks:
      seg = self.semsegdecoder(features, groups=groups, train=train)
      seg = seg.reshape(seg.shape[0] // groups, groups, *seg.shape[1:])
      keys = jax.random.split(k_head, groups)
      out["ss"] = {s: self.semseghead[s](seg[:, g], train=train, key=keys[g])
                   for g, s in enumerate(self.subsets)}
    return out
