"""Predict with a trained run on images of any size: tiles with overlap, batched on the devices,
merged (logits averaged, detections by NMS across tiles), written as maps and vectors.

    python -m mtp_jax.predict --workdir workdirs/quickstart --input scene.tif --out predictions/
    python -m mtp_jax.predict --workdir DIR --input folder/ --out DIR [--checkpoint STEP] [--stride 384]
    python -m mtp_jax.predict --workdir DIR --input before.tif --input2 after.tif --out DIR   # change detection

Every task of the run that predicts is run: semantic segmentation and change detection give a
class map (<stem>_<task>.png, and a Cloud-Optimised GeoTIFF <stem>_<task>.tif with the input's
CRS and transform when it is georeferenced); rotated and horizontal detection and instance
segmentation give DOTA result files (<stem>_<task>_dota/), and when georeferenced an EPSG:4326
GeoJSON and a GeoPackage in the image's CRS (one layer per class; instance segmentation's
features are its mask polygons); scene
classification gives one label per window. <stem>.json sums it up; <stem>_preview.png shows it.
Geo formats need `pip install -e '.[geo]'`. Errors in the input print one line and exit with 2;
nothing partial is left in --out.
"""

import os

from mtp_jax import cli


def main(argv=None):
  parser = cli.parser(__file__, __doc__)
  parser.add_argument("--workdir", required=True, help="a training run's workdir (its checkpoints/)")
  parser.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--input", required=True, help="an image (PNG, JPEG, TIFF, GeoTIFF) or a folder of them")
  parser.add_argument("--input2", default=None, help="change detection: the second date (image or folder)")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--subset", default=None, help="pretraining models: whose classes answer (default: the first)")
  parser.add_argument("--tasks", default=None, help="comma-separated tasks to run (default: all that predict)")
  parser.add_argument("--stride", type=int, default=None, help="pixels between windows (default: 3/4 window)")
  parser.add_argument("--window", type=int, default=None,
                      help="scene classification: window size (default: the whole image); others: the model's size")
  parser.add_argument("--batch", type=int, default=0, help="tiles per device batch (default: one per device)")
  parser.add_argument("--formats", default=None,
                      help="comma-separated subset of png,geotiff,dota,geojson,gpkg,json,preview (default: all that apply)")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  from mtp_jax.quiet_startup import quiet_startup
  quiet_startup()
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  with cli.reported():
    from mtp_jax.predict.model import Predictor
    from mtp_jax.predict.pipeline import predict_scene
    from mtp_jax.predict.scene import list_inputs
    from mtp_jax.errors import DataError
    inputs = list_inputs(args.input)
    if args.input2:
      second = list_inputs(args.input2)
      if [os.path.basename(p) for p in second] != [os.path.basename(p) for p in inputs]:
        raise DataError(f"--input2 {args.input2}: its images must pair one to one, by name, with --input's")
    else:
      second = [None] * len(inputs)
    predictor = Predictor.from_workdir(args.workdir, args.checkpoint, subset=args.subset, batch=args.batch,
                                       tasks=tuple(args.tasks.split(",")) if args.tasks else None)
    formats = tuple(args.formats.split(",")) if args.formats else None
    for path, path2 in zip(inputs, second):
      summary = predict_scene(predictor, path, args.out, path2=path2, stride=args.stride, window=args.window,
                              formats=formats, progress=not args.quiet)
      print(f"{path}: {summary['width']} x {summary['height']} px, {summary['tiles']} tiles in {summary['seconds']:.1f} s "
            f"({summary['megapixels_per_s']:.3f} MP/s) -> {args.out}", flush=True)


if __name__ == "__main__":
  main()
