"""The image in a record: decoding its PNG/JPEG bytes, and the image id its filename gives."""

import io
import os

import cv2
import numpy as np
from PIL import Image


def decode_png_or_jpeg(data: bytes, mode: str) -> np.ndarray:
  """PNG/JPEG bytes -> (H, W, 3) uint8 RGB (mode "RGB") or (H, W) uint8 (mode "L").

  OpenCV decodes straight into numpy (PIL's conversion costs two extra copies); images OpenCV
  cannot read (rare modes) fall back to PIL. Raises ValueError for undecodable bytes.
  """
  flag = cv2.IMREAD_COLOR_RGB if mode == "RGB" else cv2.IMREAD_GRAYSCALE
  array = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
  if array is None:
    try:
      return np.asarray(Image.open(io.BytesIO(data)).convert(mode))
    except Exception as e:
      raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from None
  return array


def image_stem(filename: str) -> str:
  """'dir/P0001.png' -> 'P0001': the image id used by the evaluators and DOTA submissions."""
  return os.path.splitext(os.path.basename(filename))[0]
