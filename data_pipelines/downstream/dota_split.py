"""Large images cut into overlapping patches, as mmrotate's DOTA `img_split` does (MTP_SPEC §5.2).

    windows = sliding_windows(width, height, SPLIT_SS)          # (K, 4) x1 y1 x2 y2, source px
    patches = split_objects(polygons, labels, difficult, windows)

Windows (`get_sliding_window`): for each rate r, windows of int(size / r) px every
int(size / r) - int(gap / r) px from the top left; when more than one fits, the last one of a
row or column is moved back to end at the image's edge. A window whose part inside the image is
at most `img_rate_thr` (0.6) of its area is dropped, unless all are (then the largest are kept).
Patches are the windows' pixels, padded to the window's size with `padding_value` (mmrotate's
BGR 104, 116, 124 = RGB 124, 116, 104) where the window passes the image's edge; they keep the
window's size (1024 / r px: 2048 at rate 0.5, 682 at 1.5): the training pipeline's resize to
1024 scales them, as in mmrotate.
Objects (`get_window_obj`): a window holds the objects whose polygon lies inside it by IoF
(intersection area / polygon area, shapely) >= `iof_thr` (0.7), shifted to window pixels and
left unclipped; an object the window holds only in part (IoF < 1) gets difficult = 2 (mmrotate
writes '2' for such `trunc` objects), the others keep the release's flag. An object kept by no
window is in no patch (it is still scored on the merged image, `mtp_jax.metrics.patch_merge`).
Patch ids are mmrotate's: `<source>__<window size>__<x>___<y>`.
"""

import dataclasses
import itertools
import math

import numpy as np

PADDING_RGB = (124, 116, 104)


@dataclasses.dataclass(frozen=True)
class SplitConfig:
  """One mmrotate split config (sizes and gaps per rate)."""
  sizes: tuple = (1024,)
  gaps: tuple = (200,)
  rates: tuple = (1.0,)
  img_rate_thr: float = 0.6
  iof_thr: float = 0.7

  def windows_and_gaps(self):
    """[(window size, gap)] in source pixels, rate by rate (mmrotate's int(size / rate))."""
    return [(int(s / r), int(g / r)) for r in self.rates for s, g in zip(self.sizes, self.gaps)]


SPLIT_SS = SplitConfig()                                            # ss_{trainval,test}.json
SPLIT_MS = SplitConfig(gaps=(500,), rates=(0.5, 1.0, 1.5))          # ms_{trainval,test}.json


def sliding_windows(width: int, height: int, config: SplitConfig) -> np.ndarray:
  """(K, 4) int64 windows [x1, y1, x2, y2] of a width x height image (module docstring)."""
  windows = []
  for size, gap in config.windows_and_gaps():
    if size <= gap:
      raise ValueError(f"split window {size} px is not larger than its gap {gap} px")
    step = size - gap
    starts = []
    for length in (width, height):
      count = 1 if length <= size else math.ceil((length - size) / step + 1)
      s = [step * i for i in range(count)]
      if len(s) > 1 and s[-1] + size > length:
        s[-1] = length - size
      starts.append(s)
    start = np.array(list(itertools.product(*starts)), np.int64)   # x-major, as mmrotate
    windows.append(np.concatenate([start, start + size], axis=1))
  windows = np.concatenate(windows, axis=0)
  inside = windows.copy()
  inside[:, 0::2] = np.clip(inside[:, 0::2], 0, width)
  inside[:, 1::2] = np.clip(inside[:, 1::2], 0, height)
  rates = ((inside[:, 2] - inside[:, 0]) * (inside[:, 3] - inside[:, 1])
           / ((windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1])))
  if not (rates > config.img_rate_thr).any():
    rates[abs(rates - rates.max()) < 0.01] = 1
  return windows[rates > config.img_rate_thr]


def polygon_window_iof(polygons: np.ndarray, windows: np.ndarray) -> np.ndarray:
  """(N, K) area of polygon n inside window k over polygon n's area (shapely; 0 where the
  enclosing boxes do not overlap; a polygon of zero area gets 0). Ours: a polygon whose corners
  all lie in the window gets exactly 1; mmrotate divides the areas there too, and a ratio that
  rounding puts a hair below 1 marks a whole object as cut."""
  import shapely.geometry  # noqa: PLC0415 (only the converters need it)
  polygons = np.asarray(polygons, np.float64).reshape(-1, 4, 2)
  out = np.zeros((len(polygons), len(windows)))
  if not len(polygons) or not len(windows):
    return out
  lo, hi = polygons.min(1), polygons.max(1)
  overlap = ((np.minimum(hi[:, None, 0], windows[None, :, 2]) > np.maximum(lo[:, None, 0], windows[None, :, 0]))
             & (np.minimum(hi[:, None, 1], windows[None, :, 3]) > np.maximum(lo[:, None, 1], windows[None, :, 1])))
  shapes = [shapely.geometry.Polygon(p) for p in polygons]
  boxes = [shapely.geometry.box(*w) for w in windows.tolist()]
  inside = ((lo[:, None, 0] >= windows[None, :, 0]) & (lo[:, None, 1] >= windows[None, :, 1])
            & (hi[:, None, 0] <= windows[None, :, 2]) & (hi[:, None, 1] <= windows[None, :, 3]))
  for n, k in zip(*np.nonzero(overlap & ~inside)):
    area = shapes[n].area
    if area > 0:
      out[n, k] = shapes[n].intersection(boxes[k]).area / area
  out[inside & (np.array([p.area for p in shapes]) > 0)[:, None]] = 1.0
  return out


def patch_id(source: str, window) -> str:
  x1, y1, x2, _ = (int(v) for v in window)
  return f"{source}__{x2 - x1}__{x1}___{y1}"


def parse_patch_id(patch: str):
  """'P0001__1024__824___0' -> ('P0001', 1024, 824, 0): source id, window size, x, y."""
  head, sep, y = patch.rpartition("___")
  parts = head.rsplit("__", 2)
  if not sep or len(parts) != 3 or not all(v.isdigit() for v in (parts[1], parts[2], y)):
    raise ValueError(f"{patch!r} is not a patch id <source>__<size>__<x>___<y>")
  return parts[0], int(parts[1]), int(parts[2]), int(y)


def split_objects(polygons, labels, difficult, windows, iof_thr: float = SPLIT_SS.iof_thr) -> list:
  """Per window: (indices of the objects it holds, their polygons in window pixels, their
  difficult flags with 2 for the objects it holds in part)."""
  polygons = np.asarray(polygons, np.float64).reshape(-1, 4, 2)
  iof = polygon_window_iof(polygons, windows)
  out = []
  for k, window in enumerate(windows):
    keep = np.flatnonzero(iof[:, k] >= iof_thr)
    shifted = polygons[keep] - np.asarray(window[:2], np.float64)
    flags = np.where(iof[keep, k] < 1, 2, np.asarray(difficult, np.int64)[keep])
    out.append((keep, shifted, flags))
  return out


def crop_window(image: np.ndarray, window, padding=PADDING_RGB) -> np.ndarray:
  """The window's pixels, padded with `padding` past the image's right and bottom edges."""
  x1, y1, x2, y2 = (int(v) for v in window)
  patch = image[y1:y2, x1:x2]
  if patch.shape[:2] == (y2 - y1, x2 - x1):
    return patch
  out = np.empty((y2 - y1, x2 - x1, image.shape[2]), image.dtype)
  out[...] = np.asarray(padding, image.dtype)
  out[:patch.shape[0], :patch.shape[1]] = patch
  return out
