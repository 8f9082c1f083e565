"""Per-pixel outputs of a scene from its tiles' logits, averaged in the overlaps, strip by strip.

Each pixel's logits are the mean of the logits of every tile that covers it (mmseg's slide
inference, mtp_jax/models/slide.py, over a scene of any size). Tiles arrive one grid row at a
time (mtp_jax/predict/tiles.py); once row r is added, the scene rows above the next row's start
are covered by no later tile: they are final, written out and freed. Host memory: one strip of
min(window, height) x width x K float32 sums plus its counts, i.e. 4 * window * width * (K + 1)
bytes, whatever the scene's height.
"""

import numpy as np


class DenseMerger:
  """Averages tile logits over a height x width scene; `sink(y0, logits)` receives each finished
  strip of rows (y0 .. y0 + len - 1, (len, width, K) float32 averaged logits), top to bottom."""

  def __init__(self, grid, num_classes: int, sink):
    self.grid, self.sink = grid, sink
    self.ys = grid.ys
    rows = min(grid.window, grid.height)
    self.sum = np.zeros((rows, grid.width, num_classes), np.float32)
    self.count = np.zeros((rows, grid.width, 1), np.float32)
    self.base = 0      # scene row of self.sum[0]
    self.next_row = 0  # grid row expected next

  def add_row(self, tiles, logits):
    """tiles: the Tiles of grid row `next_row` (left to right); logits (len(tiles), S, S, K)."""
    r = self.next_row
    y = self.ys[r]
    if tiles and tiles[0].row != r:
      raise ValueError(f"grid row {tiles[0].row} added, row {r} expected")
    self._shift_to(y)
    h = min(self.grid.window, self.grid.height - y)
    for tile, patch in zip(tiles, logits):
      w = min(self.grid.window, self.grid.width - tile.x)
      self.sum[:h, tile.x:tile.x + w] += patch[:h, :w]
      self.count[:h, tile.x:tile.x + w] += 1.0
    self.next_row += 1
    end = self.ys[r + 1] if r + 1 < len(self.ys) else self.grid.height
    done = end - y
    self.sink(y, self.sum[:done] / np.maximum(self.count[:done], 1.0))

  def _shift_to(self, y: int):
    """Moves the strip's window so that self.sum[0] is scene row y (rows above are finished)."""
    d = y - self.base
    if d:
      self.sum[:-d] = self.sum[d:].copy()
      self.sum[-d:] = 0.0
      self.count[:-d] = self.count[d:].copy()
      self.count[-d:] = 0.0
      self.base = y
