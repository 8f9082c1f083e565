"""The tile grid over a scene: mmseg's slide windows (mtp_jax/models/slide.py), any scene size.

Along an axis of `size` pixels, windows of `window` pixels start every `stride` pixels, n =
max(size - window + stride - 1, 0) // stride + 1 of them, window i at
start_i = max(min(i * stride + window, size) - window, 0): the last one is pushed back inside
the scene, so every pixel is covered and no window leaves the scene, except that a scene smaller
than the window has one window at 0 that the reader pads with zeros (the padding of the
evaluation pipeline). Tiles are visited row by row (all windows of a row of starts, left to
right), the order in which the dense merger can finish rows and free them.
"""

import dataclasses


def starts(size: int, window: int, stride: int) -> list[int]:
  """Window starts along one axis (module docstring)."""
  if window <= 0 or stride <= 0:
    raise ValueError(f"window {window} and stride {stride} must be positive")
  if stride > window:
    raise ValueError(f"stride {stride} > window {window} would leave pixels no window covers")
  n = max(size - window + stride - 1, 0) // stride + 1
  return [max(min(i * stride + window, size) - window, 0) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Tile:
  """A window: top-left (y, x) in scene pixels; row/col in the grid."""
  row: int
  col: int
  y: int
  x: int


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """The windows over a height x width scene, row-major."""
  height: int
  width: int
  window: int
  stride: int

  @property
  def ys(self) -> list[int]:
    return starts(self.height, self.window, self.stride)

  @property
  def xs(self) -> list[int]:
    return starts(self.width, self.window, self.stride)

  def rows(self) -> list[list[Tile]]:
    """The tiles, one list per grid row, left to right."""
    xs = self.xs
    return [[Tile(r, c, y, x) for c, x in enumerate(xs)] for r, y in enumerate(self.ys)]

  def __len__(self) -> int:
    return len(self.ys) * len(self.xs)
