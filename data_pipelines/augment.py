"""Training augmentations of MTP (MTP_SPEC.md §3.4), numpy, host side, one image at a time.

A sample is a dict of numpy arrays (H x W image, N instances):
  image (H, W, 3) uint8 RGB; semantic (H, W) uint8 (0 background, k + 1 class k, 255 ignore);
  masks (N, H, W) bool or absent; hboxes (N, 4) float32 (x1, y1, x2, y2); rboxes (N, 5) float32
  le90; labels (N,) int32; box_valid (N,) bool (the instance's horizontal box / mask is usable);
  rbox_valid (N,) bool (its rotated box is usable).
Coordinates are continuous pixels with (0, 0) the top-left corner of the top-left pixel, y down,
so a pixel's centre is at (x + 0.5, y + 0.5) and every geometric transform maps pixels, masks
and boxes the same way. Each transform returns a new sample; none modifies its input.

`train_augment` is the §3.4 sequence: random flip (p = 0.75, horizontal / vertical / diagonal
alike), optional random quarter turns, random resize to S x U(0.5, 2.0) (longer side, aspect
kept), random S x S crop (boxes clipped, or recomputed from masks when present; rotated boxes
kept when their centre stays inside; a crop that empties an image with instances is redrawn),
photometric distortion (brightness +-32, contrast 0.5-1.5, saturation 0.5-1.5, hue +-18 degrees,
each with p = 0.5, as mmcv's `PhotoMetricDistortion` without its channel swap), and padding to
S x S (image 0, semantic 255 = ignore, masks 0). The flip and turns are applied after the crop
(same distribution, fewer pixels moved; see `train_augment`).
"""

import dataclasses

import cv2
import numpy as np

from mtp_jax.ops import boxes as box_ops

# Parallelism comes from the input pipeline's worker processes, not from OpenCV's own threads.
cv2.setNumThreads(1)

FLIPS = ("horizontal", "vertical", "diagonal")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Knobs of `train_augment`; the defaults are MTP's (§3.4)."""
  flip_prob: float = 0.75
  rot90: bool = False                 # random quarter turns (not in MTP; aerial images allow it)
  resize_range: tuple = (0.5, 2.0)
  photometric: bool = True
  max_crop_redraws: int = 10


def flip(sample: dict, direction: str) -> dict:
  """Mirror: horizontal (x -> W - x), vertical (y -> H - y) or diagonal (both, a half turn)."""
  if direction not in FLIPS:
    raise ValueError(f"flip direction {direction!r} is not one of {FLIPS}")
  height, width = sample["image"].shape[:2]
  out = dict(sample)
  axes = {"horizontal": (1,), "vertical": (0,), "diagonal": (0, 1)}[direction]
  out["image"] = np.flip(sample["image"], axes).copy()
  out["semantic"] = np.flip(sample["semantic"], axes).copy()
  if "masks" in sample:
    out["masks"] = np.flip(sample["masks"], tuple(a + 1 for a in axes)).copy()
  hb = sample["hboxes"].copy()
  rb = sample["rboxes"].copy()
  if direction in ("horizontal", "diagonal"):
    hb[:, [0, 2]] = width - sample["hboxes"][:, [2, 0]]
    rb[:, 0] = width - rb[:, 0]
  if direction in ("vertical", "diagonal"):
    hb[:, [1, 3]] = height - sample["hboxes"][:, [3, 1]]
    rb[:, 1] = height - rb[:, 1]
  if direction != "diagonal":   # a mirror negates the angle; a half turn keeps it
    rb[:, 4] = box_ops.norm_angle_le90(-rb[:, 4])
  out["hboxes"], out["rboxes"] = hb, rb.astype(np.float32)
  return out


def rot90(sample: dict, quarter_turns: int) -> dict:
  """Turns the image by `quarter_turns` x 90 degrees counter-clockwise on screen: (x, y) -> (y, W - x)."""
  out = dict(sample)
  for _ in range(quarter_turns % 4):
    width = out["image"].shape[1]
    out["image"] = np.rot90(out["image"], 1, axes=(0, 1)).copy()
    out["semantic"] = np.rot90(out["semantic"], 1, axes=(0, 1)).copy()
    if "masks" in out:
      out["masks"] = np.rot90(out["masks"], 1, axes=(1, 2)).copy()
    hb = out["hboxes"]
    out["hboxes"] = np.stack([hb[:, 1], width - hb[:, 2], hb[:, 3], width - hb[:, 0]], -1)
    rb = out["rboxes"]
    out["rboxes"] = np.stack([rb[:, 1], width - rb[:, 0], rb[:, 2], rb[:, 3],
                              box_ops.norm_angle_le90(rb[:, 4] - np.pi / 2)], -1).astype(np.float32)
  return out


def resize(sample: dict, scale: float) -> dict:
  """Scales by `scale` (sizes rounded): image bilinear (cv2, as mmcv), semantic and masks nearest.

  Nearest uses pixel centres (cv2.INTER_NEAREST_EXACT), the convention of the boxes; mmcv's
  INTER_NEAREST samples corners instead, a half-pixel shift we do not copy.

  Boxes follow the exact per-axis factors new_size / old_size; rotated boxes through their
  corners (le90 afterwards).
  """
  height, width = sample["image"].shape[:2]
  new_w, new_h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
  sx, sy = new_w / width, new_h / height
  out = dict(sample)
  out["image"] = cv2.resize(sample["image"], (new_w, new_h), interpolation=cv2.INTER_LINEAR)
  nearest = lambda a: cv2.resize(a, (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT)
  out["semantic"] = nearest(sample["semantic"])
  if "masks" in sample:
    masks = sample["masks"]
    # cv2 resizes up to 512 channels at once: masks as channels of one image, in chunks.
    chunks = [nearest(np.ascontiguousarray(masks[i:i + 256].transpose(1, 2, 0).astype(np.uint8)))
              for i in range(0, len(masks), 256)]
    out["masks"] = (np.concatenate([c.reshape(new_h, new_w, -1).transpose(2, 0, 1) for c in chunks])
                    .astype(bool) if len(masks) else np.zeros((0, new_h, new_w), bool))
  out["hboxes"] = (sample["hboxes"] * np.array([sx, sy, sx, sy], np.float32)).astype(np.float32)
  if sx == sy:   # a similarity: scale centre and sides, keep the angle (and which side is w)
    out["rboxes"] = (sample["rboxes"] * np.array([sx, sx, sx, sx, 1], np.float32)).astype(np.float32)
  else:          # per-axis factors differ by rounding: map the corners
    polys = box_ops.rbox_to_poly(sample["rboxes"].astype(np.float64)) * np.array([sx, sy])
    out["rboxes"] = box_ops.poly_to_rbox(polys).astype(np.float32).reshape(-1, 5)
  return out


def crop(sample: dict, top: int, left: int, height: int, width: int) -> dict:
  """Cuts the window [left, left + width) x [top, top + height).

  Horizontal boxes: recomputed as the masks' tight boxes when masks are present (mmdet's
  `recompute_bbox`), else shifted and clipped; usable while non-empty. Rotated boxes: shifted,
  usable while their centre lies strictly inside the window (mmrotate's `is_inside`).
  """
  out = dict(sample)
  out["image"] = sample["image"][top:top + height, left:left + width].copy()
  out["semantic"] = sample["semantic"][top:top + height, left:left + width].copy()
  shift = np.array([left, top, left, top], np.float32)
  if "masks" in sample:
    out["masks"] = sample["masks"][:, top:top + height, left:left + width].copy()
    hb = mask_boxes(out["masks"])   # all zeros for a mask the window emptied
  else:
    hb = np.clip(sample["hboxes"] - shift, 0, [width, height, width, height]).astype(np.float32)
  out["hboxes"] = hb
  out["box_valid"] = sample["box_valid"] & (hb[:, 2] > hb[:, 0]) & (hb[:, 3] > hb[:, 1])
  rb = sample["rboxes"].copy()
  rb[:, :2] -= [left, top]
  out["rboxes"] = rb
  inside = (rb[:, 0] > 0) & (rb[:, 0] < width) & (rb[:, 1] > 0) & (rb[:, 1] < height)
  out["rbox_valid"] = sample["rbox_valid"] & inside
  return out


def mask_boxes(masks: np.ndarray) -> np.ndarray:
  """(N, H, W) bool -> (N, 4) tight boxes in pixel-edge coordinates (zeros for empty masks)."""
  out = np.zeros((len(masks), 4), np.float32)
  for i, m in enumerate(masks):
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    if len(rows):
      out[i] = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
  return out


def photometric(image: np.ndarray, rng: np.random.Generator, brightness: float = 32,
                contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue_delta: float = 18) -> np.ndarray:
  """mmcv `PhotoMetricDistortion` (its default ranges unless given), RGB uint8 in and out
  (rounded, clipped). Float32 throughout, HSV by cv2 as mmcv (H in degrees [0, 360), S in
  [0, 1], V as the input).
  """
  img = image.astype(np.float32)
  if rng.integers(2):
    img += rng.uniform(-brightness, brightness)
  contrast_first = bool(rng.integers(2))
  if contrast_first and rng.integers(2):
    img *= rng.uniform(*contrast)
  saturate, shift_hue = bool(rng.integers(2)), bool(rng.integers(2))
  saturation, hue = rng.uniform(*saturation), rng.uniform(-hue_delta, hue_delta)
  if saturate or shift_hue:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    if saturate:
      hsv[..., 1] *= saturation
    if shift_hue:
      hsv[..., 0] = np.mod(hsv[..., 0] + hue, 360.0)
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if not contrast_first and rng.integers(2):
    img *= rng.uniform(*contrast)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def pad_to(sample: dict, size: int) -> dict:
  """Pads bottom/right to size x size: image 0, semantic 255 (ignored), masks 0."""
  height, width = sample["image"].shape[:2]
  if height > size or width > size:
    raise ValueError(f"cannot pad a {height}x{width} image to {size}x{size}")
  out = dict(sample)
  out["image"] = np.zeros((size, size, 3), np.uint8)
  out["image"][:height, :width] = sample["image"]
  out["semantic"] = np.full((size, size), 255, np.uint8)
  out["semantic"][:height, :width] = sample["semantic"]
  if "masks" in sample:
    masks = np.zeros((len(sample["masks"]), size, size), bool)
    masks[:, :height, :width] = sample["masks"]
    out["masks"] = masks
  return out


def train_augment(sample: dict, rng: np.random.Generator, size: int,
                  config: AugmentConfig = AugmentConfig()) -> dict:
  """The §3.4 training sequence (module docstring), ending padded to size x size.

  Flips and quarter turns are drawn first but applied after the crop: the crop offset is uniform,
  so the distribution is the one of flipping first, and the flip then touches the crop's pixels
  instead of the full image's (about 5x fewer for 1024 px sources).
  """
  direction = FLIPS[rng.integers(3)] if rng.uniform() < config.flip_prob else None
  turns = int(rng.integers(4)) if config.rot90 else 0
  height, width = sample["image"].shape[:2]
  scale = size * rng.uniform(*config.resize_range) / max(height, width)
  sample = resize(sample, scale)
  height, width = sample["image"].shape[:2]
  crop_h, crop_w = min(size, height), min(size, width)
  had_instances = bool((sample["box_valid"] | sample["rbox_valid"]).any())
  for _ in range(config.max_crop_redraws + 1):
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    cropped = crop(sample, top, left, crop_h, crop_w)
    if not had_instances or (cropped["box_valid"] | cropped["rbox_valid"]).any():
      break   # otherwise redraw; after max_crop_redraws the last (empty) crop is kept
  sample = cropped
  if direction is not None:
    sample = flip(sample, direction)
  if turns:
    sample = rot90(sample, turns)
  if config.photometric:
    sample = dict(sample, image=photometric(sample["image"], rng))
  return pad_to(sample, size)
