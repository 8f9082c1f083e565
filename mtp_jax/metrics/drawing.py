"""Pictures for reports, from plain arrays: any head's output can be drawn.

Images are (H, W, 3) uint8 RGB; label maps (H, W) ints (0 = background, 255 = ignore); rotated
boxes (N, 5) le90 (cx, cy, w, h, angle) in pixels and radians, y down (DESIGN.md §4). Every
function returns a new uint8 RGB array (inputs are not modified); `save_png` writes one.
Charts use matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

import colorsys

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from mtp_jax.ops.boxes import rbox_to_poly


def palette() -> np.ndarray:
  """(256, 3) uint8 colours: 0 black (background), 255 grey (ignore), others spread in hue."""
  pal = np.zeros((256, 3), np.uint8)
  for i in range(1, 255):
    r, g, b = colorsys.hsv_to_rgb(((i - 1) * 0.61803398875) % 1.0, 0.75, 1.0 if i % 2 else 0.75)
    pal[i] = (int(r * 255), int(g * 255), int(b * 255))
  pal[255] = (128, 128, 128)
  return pal


def display_rgb(image, rgb_bands=()) -> np.ndarray:
  """(H, W, 3) uint8 to draw on from an (H, W, C) image of any type: uint8 RGB as it is;
  otherwise bands `rgb_bands` (default the first three; one band: grey), each stretched from
  its 2nd to its 98th percentile onto 0-255 (multispectral digital numbers)."""
  image = np.asarray(image)
  if image.dtype == np.uint8 and image.shape[-1] == 3:
    return image
  bands = list(rgb_bands) if len(rgb_bands) == 3 else ([0, 1, 2] if image.shape[-1] >= 3 else [0, 0, 0])
  x = image[..., bands].astype(np.float32)
  low = np.percentile(x, 2, axis=(0, 1))
  high = np.maximum(np.percentile(x, 98, axis=(0, 1)), low + 1e-6)
  return np.clip(np.round((x - low) / (high - low) * 255), 0, 255).astype(np.uint8)


def colourize(label_map) -> np.ndarray:
  """(H, W) class map -> (H, W, 3) palette colours."""
  return palette()[np.asarray(label_map).astype(np.uint8)]


def draw_rboxes(image, rboxes, labels=None, colour=None, thickness: int = 1) -> np.ndarray:
  """Outlines of rotated boxes on a copy of `image`; colour per box from `labels` (palette of
  label + 1, as the semantic maps colour class k as k + 1) unless one RGB `colour` is given."""
  out = np.ascontiguousarray(np.asarray(image, np.uint8).copy())
  rboxes = np.asarray(rboxes, np.float64).reshape(-1, 5)
  labels = np.zeros(len(rboxes), np.int64) if labels is None else np.asarray(labels).reshape(-1)
  pal = palette()
  for poly, label in zip(rbox_to_poly(rboxes), labels):
    c = colour if colour is not None else pal[(int(label) + 1) % 255]
    cv2.polylines(out, [np.round(poly).astype(np.int32)], True, tuple(int(v) for v in c), thickness)
  return out


def draw_instances(image, hboxes, masks=None, labels=None, colour=None, thickness: int = 1) -> np.ndarray:
  """Instance masks (outlines of their regions) and horizontal boxes (x1, y1, x2, y2) on a copy of
  `image`; colours as `draw_rboxes`. masks: (N, H, W) bool at the image's size, or None."""
  out = np.ascontiguousarray(np.asarray(image, np.uint8).copy())
  hboxes = np.asarray(hboxes, np.float64).reshape(-1, 4)
  labels = np.zeros(len(hboxes), np.int64) if labels is None else np.asarray(labels).reshape(-1)
  pal = palette()
  for k, (box, label) in enumerate(zip(hboxes, labels)):
    c = tuple(int(v) for v in (colour if colour is not None else pal[(int(label) + 1) % 255]))
    if masks is not None and k < len(masks) and masks[k].any():
      contours, _ = cv2.findContours(np.asarray(masks[k], np.uint8), cv2.RETR_EXTERNAL,
                                     cv2.CHAIN_APPROX_SIMPLE)
      cv2.drawContours(out, contours, -1, c, thickness)
    x1, y1, x2, y2 = np.round(box).astype(np.int32)
    cv2.rectangle(out, (int(x1), int(y1)), (int(x2) - 1, int(y2) - 1), c, thickness,
                  lineType=cv2.LINE_4)
  return out


def _label(tile: np.ndarray, text: str) -> Image.Image:
  canvas = Image.new("RGB", (tile.shape[1], tile.shape[0] + 14), "white")
  canvas.paste(Image.fromarray(tile), (0, 14))
  ImageDraw.Draw(canvas).text((2, 1), text, fill="black")
  return canvas


def stack(rows, gap: int = 4) -> np.ndarray:
  """Images (any widths) one below the other on white."""
  width = max(r.shape[1] for r in rows)
  out = np.full((sum(r.shape[0] for r in rows) + gap * (len(rows) - 1), width, 3), 255, np.uint8)
  y = 0
  for r in rows:
    out[y:y + r.shape[0], :r.shape[1]] = r
    y += r.shape[0] + gap
  return out


def comparison_row(title: str, image, gt_panel, pred_panel, scale: int = 2) -> np.ndarray:
  """One report row: image | ground truth | prediction. A panel is an (H, W, 3) picture (the
  tasks paint theirs: maps, rotated boxes) or an (H, W) class map, coloured here."""
  gt = colourize(gt_panel) if np.ndim(gt_panel) == 2 else np.asarray(gt_panel, np.uint8)
  pred = colourize(pred_panel) if np.ndim(pred_panel) == 2 else np.asarray(pred_panel, np.uint8)
  row = np.concatenate([np.asarray(image, np.uint8), gt, pred], axis=1)
  row = np.repeat(np.repeat(row, scale, axis=0), scale, axis=1)
  return np.asarray(_label(row, f"{title}: image | ground truth | prediction"))


def _figure(width: float, height: float):
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot(1, 1, 1)


def _to_array(fig) -> np.ndarray:
  fig.tight_layout()
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def bar_chart(values: dict, title: str, ylabel: str) -> np.ndarray:
  """One bar per entry of {name: value} (per-class AP or IoU, in [0, 1]); NaN drawn as 'n/a'."""
  names = list(values)
  heights = np.asarray([np.nan if v is None else v for v in values.values()], np.float64)
  fig, ax = _figure(max(4.0, 0.32 * len(names) + 1.5), 3.6)
  ax.bar(range(len(names)), np.nan_to_num(heights), color="#4c72b0")
  for k in np.flatnonzero(np.isnan(heights)):
    ax.text(k, 0.01, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
  ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
  ax.set_ylim(0, 1)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  return _to_array(fig)


def confusion_chart(conf, names, title: str) -> np.ndarray:
  """Row-normalised confusion matrix (rows = ground truth) as a heat map, counts per row in the
  labels; rows without any ground truth stay blank."""
  conf = np.asarray(conf, np.float64)
  rows = conf.sum(1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    share = np.where(rows > 0, conf / np.where(rows > 0, rows, 1), np.nan)
  n = len(names)
  fig, ax = _figure(max(4.0, 0.28 * n + 2.5), max(3.5, 0.28 * n + 1.8))
  im = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
  ax.set_xticks(range(n), names, rotation=90, fontsize=6)
  ax.set_yticks(range(n), [f"{name} ({int(r)})" for name, r in zip(names, rows[:, 0])], fontsize=6)
  ax.set_xlabel("prediction")
  ax.set_ylabel("ground truth (count)")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  return _to_array(fig)


def curves_chart(series: dict, title: str, xlabel: str = "step") -> np.ndarray:
  """Line per entry of {name: (steps, values)} (loss curves, eval numbers over training)."""
  fig, ax = _figure(6.0, 3.4)
  for name, (steps, values) in series.items():
    ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
  ax.set_xlabel(xlabel)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  if series:
    ax.legend(fontsize=7)
  return _to_array(fig)


def save_png(array, path: str):
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


def caption(panel, text: str, colour=(255, 255, 255)) -> np.ndarray:
  """The panel with `text` written on a dark strip across its top (class names of a scene)."""
  image = Image.fromarray(np.ascontiguousarray(np.asarray(panel, np.uint8)))
  draw = ImageDraw.Draw(image)
  draw.rectangle((0, 0, image.width, 12), fill=(0, 0, 0))
  draw.text((2, 1), text, fill=tuple(colour))
  return np.asarray(image)
