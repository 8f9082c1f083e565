"""Prediction on images of any size with a trained run (`python -m mtp_jax.predict`).

    predictor = Predictor.from_workdir(workdir)            # model.py
    summary = predict_scene(predictor, "scene.tif", "out")  # pipeline.py

tiles.py places the windows, scene.py reads scenes in strips (rasterio, or PIL / tifffile),
dense.py and detections.py merge the tiles' outputs, sinks.py holds one of those per task (by
kind of prediction) and what it writes, outputs.py writes PNG / COG class maps,
DOTA / GeoJSON / GeoPackage detections and the preview.
"""

__all__ = ["Predictor", "predict_scene"]


def __getattr__(name):
  """Predictor and predict_scene, imported when first used: `python -m mtp_jax.predict --help` imports no JAX."""
  if name == "Predictor":
    from mtp_jax.predict.model import Predictor  # noqa: PLC0415
    return Predictor
  if name == "predict_scene":
    from mtp_jax.predict.pipeline import predict_scene  # noqa: PLC0415
    return predict_scene
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
