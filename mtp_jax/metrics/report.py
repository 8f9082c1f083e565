"""The end-of-run report: `<workdir>/report/metrics.json` and `predictions.png`.

predictions.png holds one row per shown image: the image, its ground truth and the prediction,
side by side, colour-coded with one fixed palette (0 = background in black, 255 = ignore in grey).
"""

import colorsys
import json
import os

import numpy as np
from PIL import Image, ImageDraw


def palette(num_colours: int = 256) -> np.ndarray:
  """(256, 3) uint8 colours: 0 black (background), 255 grey (ignore), others spread in hue."""
  pal = np.zeros((256, 3), np.uint8)
  for i in range(1, 255):
    r, g, b = colorsys.hsv_to_rgb(((i - 1) * 0.61803398875) % 1.0, 0.75, 1.0 if i % 2 else 0.75)
    pal[i] = (int(r * 255), int(g * 255), int(b * 255))
  pal[255] = (128, 128, 128)
  return pal


def colourize(label_map) -> np.ndarray:
  return palette()[np.asarray(label_map, np.uint8)]


def prediction_grid(rows, scale: int = 2) -> Image.Image:
  """rows: list of (title, image (H, W, 3) uint8, gt (H, W), pred (H, W)) -> one PIL image."""
  tiles = []
  for title, image, gt, pred in rows:
    row = np.concatenate([image, colourize(gt), colourize(pred)], axis=1)
    tile = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
    canvas = Image.new("RGB", (tile.width, tile.height + 14), "white")
    canvas.paste(tile, (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), f"{title}: image | ground truth | prediction", fill="black")
    tiles.append(canvas)
  grid = Image.new("RGB", (max(t.width for t in tiles), sum(t.height for t in tiles)), "white")
  y = 0
  for t in tiles:
    grid.paste(t, (0, y))
    y += t.height
  return grid


def write_report(workdir: str, metrics: dict, rows) -> dict:
  """Writes metrics.json and predictions.png under `<workdir>/report`; returns their paths."""
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  paths = {"metrics": os.path.join(out, "metrics.json"), "predictions": os.path.join(out, "predictions.png")}
  with open(paths["metrics"], "w") as f:
    json.dump(metrics, f, indent=1, allow_nan=True)
  if rows:
    prediction_grid(rows).save(paths["predictions"])
  return paths
