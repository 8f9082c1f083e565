"""Export a training run to a PyTorch state_dict with the official MTP key names: the encoder
(default) or, with --full, the whole pretraining model (encoder, decoders, per-dataset predictors
and BatchNorm statistics; the official `Iter_*_pretrn_model.pth` layout, MTP_SPEC §3.6).

    python -m mtp_jax.export --workdir workdirs/quickstart --out encoder.pth [--step N]
    python -m mtp_jax.export --workdir DIR --out encoder.safetensors
    python -m mtp_jax.export --workdir DIR --out model.pth --full

`.pth` files load with `model.load_state_dict(torch.load(path), strict=True)` into a module of the
same architecture (for the RVSA encoders: `mtp_jax.torch_twin.vit_rvsa.build_twin`, or the
official `ViT_Win_RVSA_V3_WSZ7`; for --full: `mtp_jax.torch_twin.mtp_decoders.MTPFramework`, or
the official `MutliTaskPretrnFramework`, whose `state_dict` also has the heads of tasks a run did
not train). `.pth` needs torch, `.safetensors` the safetensors package.
"""

from mtp_jax import cli
from mtp_jax.errors import CheckpointError


def main(argv=None):
  parser = cli.parser(__file__, __doc__)
  parser.add_argument("--workdir", required=True, help="a training run's workdir (its checkpoints/)")
  parser.add_argument("--out", required=True, help="FILE.pth or FILE.safetensors")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--full", action="store_true",
                      help="the whole model (official full-model keys) instead of the encoder")
  args = parser.parse_args(argv)
  if not args.out.endswith((".pth", ".pt", ".safetensors")):
    parser.error(f"--out {args.out!r} must end in .pth, .pt or .safetensors")
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # Orbax warns about metadata files it does not need here
  from mtp_jax.checkpoints import sources, torch_convert
  from mtp_jax.checkpoints.manager import read_checkpoint
  with cli.reported(CheckpointError):
    if args.full:
      sd, step = sources.model_state_dict(args.workdir, args.step)
    else:
      params, _, _, step = read_checkpoint(args.workdir, args.step)
      if "encoder" not in params:
        raise CheckpointError(f"the checkpoint at step {step} has no encoder parameters")
      sd = torch_convert.encoder_to_state_dict(params["encoder"])
    if args.full:
      from mtp_jax.checkpoints.full_model import write_full_checkpoint
      write_full_checkpoint(sd, args.out)
    else:
      torch_convert.write_state_dict(sd, args.out)
  print(f"wrote {len(sd)} {'model' if args.full else 'encoder'} tensors of step {step} to {args.out}")


if __name__ == "__main__":
  main()
