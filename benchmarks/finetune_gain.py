"""The gain of an MTP-pretrained start over a random one, as the notebook shows it (figures).

    python benchmarks/finetune_gain.py --pretrain workdirs/quickstart [--seeds 0 1 2] \
        [--modes finetune frozen] [--steps 42] [--out benchmarks/results/finetune_gain.json]

`--pretrain` is a pretraining workdir (`make quickstart` makes the notebook's: 280 steps at
128 px). For each fixture seed it writes the LoveDA-layout fixture with the SAMRS sample's
objects (`write_loveda(style="objects")`, 6 images per domain, the pretraining's image size),
converts it, and finetunes `configs/finetune/loveda.py:smoke` at that size with the pretraining's
encoder twice: from a random encoder and from the workdir (`model.encoder_init`). Modes:
`finetune` trains everything at lr 3e-4 (the notebook's setting); `finetune-smoke-lr` at the
smoke's lr 1e-3; `frozen` trains only the UperNet head (`model.freeze_encoder`, lr 1e-3). Reports
the mIoU on the 12 Val images of each run, and the gain. Runs are deterministic: seed 0's
`finetune` row is the notebook's pair of numbers.
"""

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _report import write_result  # noqa: E402
from data_pipelines import convert as convert_cli  # noqa: E402
from data_pipelines.downstream import synthetic  # noqa: E402
from mtp_jax import config as config_lib  # noqa: E402
from mtp_jax.checkpoints.manager import read_checkpoint  # noqa: E402
from mtp_jax.predict.model import config_from_meta  # noqa: E402
from mtp_jax.train import loop  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"finetune": ["optimizer.lr=3e-4"], "finetune-smoke-lr": [],
         "frozen": ["model.freeze_encoder=True"]}


def finetune_miou(pretrain_config, data: str, workdir: str, sets: list) -> float:
  """mIoU on the fixture's Val images after finetuning with the pretraining's encoder."""
  size = pretrain_config.data.image_size
  c = config_lib.load_config(os.path.join(ROOT, "configs/finetune/loveda.py:smoke"))
  c = config_lib.apply_overrides(c, [f"data.dir={data!r}", f"data.image_size={size}",
                                     f"eval.image_size={size}", "eval.slide_window=0", *sets])
  c.model.encoder = pretrain_config.model.encoder
  c.model.encoder_overrides = pretrain_config.model.encoder_overrides
  return float(loop.train_and_evaluate(c, workdir)["eval"]["loveda"]["ss"]["miou"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pretrain", required=True, help="a pretraining workdir")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["finetune", "frozen"])
  parser.add_argument("--steps", type=int, default=42)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/finetune_gain.json"))
  args = parser.parse_args(argv)
  pretrain_config = config_from_meta(read_checkpoint(args.pretrain)[2], args.pretrain)   # the run's own config
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for seed in args.seeds:
      raw, data = f"{tmp}/raw{seed}", f"{tmp}/data{seed}"
      synthetic.write_loveda(raw, per_domain=6, seed=seed, size=pretrain_config.data.image_size, style="objects")
      convert_cli.convert_release(convert_cli.RELEASES["loveda"], raw, data, log=lambda *_: None)
      for mode in args.modes:
        sets = [*MODES[mode], f"train.num_steps={args.steps}"]
        random = finetune_miou(pretrain_config, data, f"{tmp}/{seed}_{mode}_random", sets)
        pretrained = finetune_miou(pretrain_config, data, f"{tmp}/{seed}_{mode}_pretrained",
                                   [*sets, f"model.encoder_init={args.pretrain!r}"])
        rows.append(dict(seed=seed, mode=mode, random_miou=random, pretrained_miou=pretrained,
                         gain=pretrained - random))
        print(f"seed {seed} {mode}: random {random:.3f}, pretrained {pretrained:.3f}, gain {pretrained - random:+.3f}")
  write_result(dict(pretrain=os.path.abspath(args.pretrain), steps=args.steps, rows=rows), args.out)


if __name__ == "__main__":
  main()
