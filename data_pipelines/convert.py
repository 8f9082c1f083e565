"""Convert a dataset from its native release layout into TFRecords, one command per dataset.

    python -m data_pipelines.convert eurosat  --root RAW --out DIR [--num-shards K] [--seed 0] [--strict]
    python -m data_pipelines.convert eurosat_ms --root RAW --out DIR   (the 13-band release)
    python -m data_pipelines.convert resisc45 --root RAW --out DIR
    python -m data_pipelines.convert spacenet1 --root RAW/AOI_1_Rio --out DIR
    python -m data_pipelines.convert loveda   --root RAW/LoveDA --out DIR
    python -m data_pipelines.convert levir_cd --root RAW/LEVIR-CD --out DIR   (also whu_cd, cdd)
    python -m data_pipelines.convert oscd     --root RAW/OSCD --out DIR   (the Onera folders' parent)
    python -m data_pipelines.convert dota_v1  --root RAW/DOTA --out DIR [--dota-split ss|ms]   (also dota_v2)
    python -m data_pipelines.convert dior_r   --root RAW/DIOR --out DIR   (rotated boxes; dior: horizontal)
    python -m data_pipelines.convert fair1m   --root RAW/FAIR1M2.0 --out DIR   (800-px patches)
    python -m data_pipelines.convert xview    --root RAW/xView --out DIR   (MTP's 416-px patches)
    python -m data_pipelines.convert samrs    --root SAMRS --out DIR [SAMRS converter options]

Each writes `<DIR>/<dataset>/<split>/` (data_pipelines/downstream/writer.py); a config's
`data.dir` is DIR. Samples that cannot be used (an unreadable file, a folder that is not a class
of the list, a file not named as the release names them) are named and skipped, and listed in
dataset_info.json with the reason; `--strict` stops at the first instead.
"""

import dataclasses
import os
import sys

from data_pipelines.downstream import change_releases, detection_releases, scene_folders, segmentation_releases
from mtp_jax import cli
from mtp_jax.errors import DataError

RELEASES = {"eurosat": scene_folders.EUROSAT, "eurosat_ms": scene_folders.EUROSAT_MS, "resisc45": scene_folders.RESISC45,
            "spacenet1": segmentation_releases.SPACENET1, "loveda": segmentation_releases.LOVEDA,
            "levir_cd": change_releases.LEVIR_CD, "whu_cd": change_releases.WHU_CD, "cdd": change_releases.CDD,
            "oscd": change_releases.OSCD, "dota_v1": detection_releases.DOTA_V1,
            "dota_v2": detection_releases.DOTA_V2, "dior_r": detection_releases.DIOR_R,
            "fair1m": detection_releases.FAIR1M, "dior": detection_releases.DIOR,
            "xview": detection_releases.XVIEW}
DATASETS = ("samrs", *RELEASES)


def convert_release(release, root: str, out: str, *, num_shards: int = 1, seed: int = 0,
                    strict: bool = False, log=print) -> dict:
  """Converts a release (RELEASES) into its splits; {split: info}."""
  from data_pipelines.downstream.writer import write_split  # noqa: PLC0415 (pulls in TensorFlow)
  try:
    splits, foreign = release.splits(root, seed)
  except scene_folders.BadSample as e:
    raise DataError(str(e)) from None
  for path, reason in foreign:
    if strict:
      raise DataError(f"{release.name} {path!r}: {reason}")
    log(f"skipping {release.name} {path}: {reason}")
  settings = {"source_root": os.path.abspath(root), "seed": seed,
              "train_fraction": getattr(release, "train_fraction", None),
              "valid_fraction": getattr(release, "valid_fraction", None), "not_in_release": foreign}
  if getattr(release, "split", None) is not None:
    settings["patch_split"] = dataclasses.asdict(release.split)
  return {split: write_split(out, release.name, split, items,
                             lambda p, label: release.read(root, p, label), release.classes,
                             settings=settings, num_shards=num_shards, strict=strict, log=log)
          for split, items in splits.items()}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["samrs"]:
    from data_pipelines.samrs import convert as samrs_convert  # noqa: PLC0415
    return samrs_convert.main(argv[1:], prog=f"{cli.program(__file__)} samrs")
  parser = cli.parser(__file__, __doc__)
  parser.add_argument("dataset", choices=DATASETS, metavar="DATASET", help=f"the release: {', '.join(DATASETS)}")
  parser.add_argument("--root", required=True, help="the dataset's release folder (or its parent)")
  parser.add_argument("--out", required=True, help="output folder (a config's data.dir)")
  parser.add_argument("--num-shards", type=int, default=1, help="shards per split (>= the reader processes)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the train/valid split of releases without one (EuroSAT, RESISC-45, SpaceNet, xView)")
  parser.add_argument("--strict", action="store_true", help="stop at the first unusable sample")
  parser.add_argument("--dota-split", choices=("ss", "ms"), default=None,
                      help="DOTA: mmrotate's single-scale (gap 200) or multi-scale (rates 0.5/1/1.5, gap 500) "
                           "1024-px patches (default: v1.0 ms, v2.0 ss, as MTP)")
  parser.add_argument("--patch-size", type=int, default=0, help="DOTA, FAIR1M: patch side in px (default 1024, 800)")
  parser.add_argument("--patch-gap", type=int, default=0,
                      help="DOTA, FAIR1M: patch overlap in px at rate 1 (default 200; DOTA ms 500)")
  args = parser.parse_args(argv)
  release = RELEASES[args.dataset]
  if args.dota_split or args.patch_size or args.patch_gap:
    if getattr(release, "split", None) is None:
      parser.error(f"--dota-split, --patch-size and --patch-gap apply to releases cut into patches "
                   f"(dota_v1, dota_v2, fair1m), not {args.dataset}")
    release = release.with_split(args.dota_split, size=args.patch_size, gap=args.patch_gap)
  from mtp_jax.quiet_startup import quiet_startup
  quiet_startup()
  with cli.reported(DataError):
    infos = convert_release(release, args.root, args.out,
                           num_shards=args.num_shards, seed=args.seed, strict=args.strict)
  for split, info in infos.items():
    print(f"{args.dataset}/{split}: {info['num_examples']} samples, {len(info['shards'])} shard(s), "
          f"{len(info['skipped'])} skipped -> {os.path.join(args.out, args.dataset, split)}")


if __name__ == "__main__":
  main()
