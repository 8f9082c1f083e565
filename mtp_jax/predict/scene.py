"""Reading a scene (one input image) in row strips, with its georeferencing.

    scene = open_scene(path, bands=(3, 2, 1))   # bands: indices to keep, () = all
    rows = scene.read(y0, y1)                   # (y1 - y0, width, C) in the file's pixel type
    scene.crs, scene.transform                  # rasterio CRS / affine.Affine, or None

With the geo extra (`pip install -e '.[geo]'`: rasterio) every format GDAL reads is read in
windows (PNG, JPEG, TIFF, GeoTIFF ...): host memory holds the strip asked for, never the scene.
Without it, PNG / JPEG are decoded with PIL and TIFF with tifffile, whole (the bound is then the
scene), and there is no georeferencing. Bands count from 0 in the file's band order.
"""

import os
import warnings

import numpy as np

from mtp_jax.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def have_rasterio() -> bool:
  import importlib.util  # noqa: PLC0415
  return importlib.util.find_spec("rasterio") is not None


def need_rasterio(what: str):
  """The rasterio module, or a DataError naming the extra that brings it."""
  try:
    import rasterio  # noqa: PLC0415
  except ImportError:
    raise DataError(f"{what} needs the geo extra: pip install -e '.[geo]' (rasterio, pyogrio)") from None
  return rasterio


class Scene:
  """An opened image: height, width, count (bands in the file), dtype, crs, transform."""

  path = ""
  height = width = count = 0
  dtype = np.dtype("uint8")
  crs = None
  transform = None

  def __init__(self, bands=()):
    self.bands = tuple(int(b) for b in bands)

  @property
  def georeferenced(self) -> bool:
    return self.crs is not None and self.transform is not None

  @property
  def channels(self) -> int:
    return len(self.bands) if self.bands else self.count

  def _check_bands(self):
    if self.bands and (max(self.bands) >= self.count or min(self.bands) < 0):
      raise DataError(f"{self.path}: {self.count} band(s), but the model reads bands {self.bands} "
                      f"(data.bands of its config)")

  def read(self, y0: int, y1: int) -> np.ndarray:
    raise NotImplementedError

  def close(self):
    pass


class _RasterioScene(Scene):
  def __init__(self, path, bands):
    super().__init__(bands)
    rasterio = need_rasterio("reading with rasterio")
    self.path = path
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        self._ds = rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
      raise DataError(f"{path}: not an image rasterio can read ({e})") from None
    ds = self._ds
    self.height, self.width, self.count = ds.height, ds.width, ds.count
    self.dtype = np.dtype(ds.dtypes[0])
    if ds.crs is not None and not ds.transform.is_identity:
      self.crs, self.transform = ds.crs, ds.transform
    self._check_bands()

  def read(self, y0, y1):
    from rasterio.windows import Window  # noqa: PLC0415
    indexes = [b + 1 for b in self.bands] if self.bands else None
    try:
      data = self._ds.read(indexes, window=Window(0, y0, self.width, y1 - y0))
    except Exception as e:  # noqa: BLE001 (a truncated or corrupt file fails in the middle)
      raise DataError(f"{self.path}: rows {y0}-{y1} are unreadable ({type(e).__name__}: {e})") from None
    return np.moveaxis(data, 0, -1)

  def close(self):
    self._ds.close()


class _ArrayScene(Scene):
  """PIL (PNG, JPEG) or tifffile (TIFF), decoded whole."""

  def __init__(self, path, bands):
    super().__init__(bands)
    self.path = path
    try:
      if path.lower().endswith((".tif", ".tiff")):
        import tifffile  # noqa: PLC0415
        pixels = tifffile.imread(path)
        if pixels.ndim == 3 and pixels.shape[0] < min(pixels.shape[1:]) and pixels.shape[0] <= 32:
          pixels = np.moveaxis(pixels, 0, -1)   # band-first (C, H, W) TIFFs
      else:
        from PIL import Image  # noqa: PLC0415
        with Image.open(path) as image:
          if image.mode == "P":
            image = image.convert("RGB")
          pixels = np.asarray(image)
    except Exception as e:  # noqa: BLE001 (PIL and tifffile raise many types on bad files)
      raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    self._pixels = pixels if pixels.ndim == 3 else pixels[..., None]
    self.height, self.width, self.count = self._pixels.shape
    self.dtype = self._pixels.dtype
    self._check_bands()

  def read(self, y0, y1):
    rows = self._pixels[y0:y1]
    return rows[..., list(self.bands)] if self.bands else rows


def open_scene(path: str, bands=(), use_rasterio: bool | None = None) -> Scene:
  """The scene at `path`, read with rasterio when it is installed (or when use_rasterio=True)."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  if not path.lower().endswith(EXTENSIONS):
    raise DataError(f"{path}: not an image (expected one of {', '.join(EXTENSIONS)})")
  if use_rasterio is None:
    use_rasterio = have_rasterio()
  return _RasterioScene(path, bands) if use_rasterio else _ArrayScene(path, bands)


def list_inputs(path: str) -> list[str]:
  """The image files at `path`: the file itself, or a folder's images (sorted, not recursive)."""
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(EXTENSIONS))
    if not files:
      raise DataError(f"{path}: a folder with no images ({', '.join(EXTENSIONS)})")
    return files
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file or folder")
  return [path]
