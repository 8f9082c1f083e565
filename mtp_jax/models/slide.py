"""mmseg's slide inference with static shapes: windows over each image, logits averaged.

mmseg (`EncoderDecoder.slide_inference`) covers an H x W image with
n_y = max(H - win + stride - 1, 0) // stride + 1 rows of windows (columns alike); window i
spans [y1, y1 + win) with y1 = max(min(i * stride + win, H) - win, 0), so the last row is pushed
back inside the image. Each window's logits (upsampled to the window) are summed into the
image's canvas and divided by the number of windows covering each pixel.

Here the batch is padded to a static canvas E x E and each image carries its true (H, W): the
window grid is the largest any image of the canvas needs, n = max(E - win + stride - 1, 0) //
stride + 1 per axis, windows are placed per image from its own (H, W) as above, and the windows
an image does not need (index >= its n_y or n_x) get weight 0. Every window of every image runs
through the model in one batch. For H, W >= win this is mmseg's result exactly; an image smaller
than the window (mmseg would feed the smaller image) is seen inside its zero-padded window here,
as the encoder's position table fixes the input size.
"""

import jax
import jax.numpy as jnp


def window_count(size, window: int, stride: int):
  """Windows along an axis of `size` pixels (mmseg's h_grids): size a Python int or an int array."""
  if isinstance(size, int):
    return max(size - window + stride - 1, 0) // stride + 1
  return jnp.maximum(size - window + stride - 1, 0) // stride + 1


def slide_logits(predict, images, image_hw, window: int, stride: int, subsets: tuple) -> dict:
  """Stitched logits of `predict` over windows.

  predict: (n * B, win, win, C_in) windows -> {task: {subset: (n * b, win, win, K) logits}}, where
    each subset's rows are its rows of the window batch in order (the batch interleaves the
    G = len(subsets) subsets row by row, mtp_jax/models/interleave.py, and so does every block of
    B window rows).
  images (B, E, E, C_in); image_hw (B, 2) int32 true sizes, rows as the images.
  Returns {task: {subset: (b, E, E, K)}} averaged logits, b = B / G (0 where no window covers a
  pixel, i.e. outside the image).
  """
  groups, canvas = len(subsets), images.shape[1]
  n = window_count(int(canvas), window, stride)
  h, w = image_hw[:, 0], image_hw[:, 1]
  ny, nx = window_count(h, window, stride), window_count(w, window, stride)
  crop = jax.vmap(lambda img, y, x: jax.lax.dynamic_slice(img, (y, x, 0), (window, window, img.shape[-1])))
  offsets, crops = [], []
  for iy in range(n):
    for ix in range(n):
      y1 = jnp.maximum(jnp.minimum(iy * stride + window, h) - window, 0)
      x1 = jnp.maximum(jnp.minimum(ix * stride + window, w) - window, 0)
      used = ((iy < ny) & (ix < nx)).astype(jnp.float32)
      offsets.append((y1, x1, used))
      crops.append(crop(images, y1, x1))
  logits = predict(jnp.concatenate(crops))   # window-major: window j is rows j*B .. (j+1)*B - 1

  def add(acc, patch, y, x):
    current = jax.lax.dynamic_slice(acc, (y, x, 0), (window, window, acc.shape[-1]))
    return jax.lax.dynamic_update_slice(acc, current + patch, (y, x, 0))
  add = jax.vmap(add)

  def stitch(g: int, per_window):
    rows, k = images.shape[0] // groups, per_window.shape[-1]
    per_window = per_window.reshape(n * n, rows, window, window, k).astype(jnp.float32)
    total = jnp.zeros((rows, canvas, canvas, k), jnp.float32)
    count = jnp.zeros((rows, canvas, canvas, 1), jnp.float32)
    for j, (y1, x1, used) in enumerate(offsets):
      y, x, u = y1[g::groups], x1[g::groups], used[g::groups][:, None, None, None]
      total = add(total, per_window[j] * u, y, x)
      count = add(count, jnp.broadcast_to(u, (rows, window, window, 1)), y, x)
    return total / jnp.maximum(count, 1.0)

  return {task: {s: stitch(subsets.index(s), v) for s, v in per_subset.items()}
          for task, per_subset in logits.items()}
