"""Per-pixel outputs of a scene from its tiles' logits, averaged in the overlaps, strip by strip.

Each pixel's logits are the mean of the logits of every tile that covers it (mmseg's slide
inference, mtp_jax/models/slide.py, over a scene of any size). Tiles arrive one at a time in
row-major order (mtp_jax/predict/tiles.py) and are summed into a strip as high as the window at
once. When the first tile of grid row r + 1 arrives, the scene rows above its start are covered
by no later tile: they are final, handed to the sink and freed, and the strip moves down.
Host memory: the strip's min(window, height) x width x K float32 sums plus its counts, i.e.
4 * window * width * (K + 1) bytes, whatever the scene's height.
"""

import numpy as np


class DenseMerger:
  """Averages tile logits over a height x width scene; `sink(y0, logits)` receives each finished
  strip of rows (y0 .. y0 + len - 1, (len, width, K) float32 averaged logits), top to bottom,
  each row once; `finish()` hands over the last ones."""

  def __init__(self, grid, num_classes: int, sink):
    self.grid, self.sink = grid, sink
    self.ys = grid.ys
    rows = min(grid.window, grid.height)
    self.sum = np.zeros((rows, grid.width, num_classes), np.float32)
    self.count = np.zeros((rows, grid.width, 1), np.float32)
    self.row = 0   # grid row of the tiles being summed; self.sum[0] is scene row ys[row]

  def add(self, tile, logits):
    """One tile's (S, S, K) logits; tiles in row-major order."""
    if tile.row < self.row or tile.row > self.row + 1:
      raise ValueError(f"a tile of grid row {tile.row} after row {self.row}: tiles come row by row")
    if tile.row == self.row + 1:
      self._emit(self.ys[tile.row])
      self._shift(self.ys[tile.row] - self.ys[self.row])
      self.row = tile.row
    y = self.ys[self.row]
    h, w = min(self.grid.window, self.grid.height - y), min(self.grid.window, self.grid.width - tile.x)
    self.sum[:h, tile.x:tile.x + w] += logits[:h, :w]
    self.count[:h, tile.x:tile.x + w] += 1.0

  def add_row(self, tiles, logits):
    """The tiles of one grid row and their (n, S, S, K) logits."""
    for tile, patch in zip(tiles, logits):
      self.add(tile, patch)

  def finish(self):
    """Hands over the rows from the last grid row's start to the bottom of the scene."""
    self._emit(self.grid.height)

  def _emit(self, end: int):
    """Scene rows ys[row] .. end - 1 are final: to the sink."""
    done = end - self.ys[self.row]
    self.sink(self.ys[self.row], self.sum[:done] / np.maximum(self.count[:done], 1.0))

  def _shift(self, d: int):
    """Moves the strip down by d rows (the rows above are finished), d rows at a time."""
    for a in (self.sum, self.count):
      for i in range(0, len(a) - d, d):
        n = min(d, len(a) - d - i)
        a[i:i + n] = a[i + d:i + d + n]
      a[max(len(a) - d, 0):] = 0.0
