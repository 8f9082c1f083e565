"""Train a config's model (resuming from --workdir) and evaluate it, or evaluate a checkpoint.

    python main.py --config configs/pretrain/quickstart.py --workdir workdirs/quickstart
    python main.py --config configs/pretrain/quickstart.py --workdir DIR --set train.num_steps=50
    python main.py --config configs/pretrain/quickstart.py --workdir DIR --mode eval [--checkpoint STEP]

--config takes `path/to/config.py[:arg]`; --set overrides one config key (repeatable; the value is
read as a Python literal). --mode eval evaluates the latest (or --checkpoint STEP) checkpoint of
--workdir on the valid splits and writes <workdir>/report.md, without changing the checkpoints.
A training run resumes from the latest checkpoint in --workdir. Errors in the
user's input (config, data, workdir) print one line that says what and where, and exit with 2.

Several processes (multi-host): every process runs the same command. On a TPU pod slice and under
SLURM's srun the processes find each other by themselves; elsewhere pass
--coordinator_address HOST:PORT --num_processes N --process_id I (mtp_jax/parallel/distributed.py,
launch/). SIGTERM (a preemption notice) saves a checkpoint at the current step and exits with 143.
"""

import sys

from absl import app, flags, logging

from mtp_jax import cli


def parse(argv):
  """app.run's flags_parser: main.py's own flags by the project's convention (mtp_jax/cli.py);
  absl's logging flags (-v N, --logtostderr, --log_dir, ...) go on to absl."""
  parser = cli.parser(__file__, __doc__, allow_abbrev=False)
  parser.add_argument("--config", required=True, help="config file: path/to/config.py[:arg]")
  parser.add_argument("--workdir", required=True, help="where checkpoints, metrics and the report go")
  parser.add_argument("--mode", default="train", choices=["train", "eval"],
                      help="train: train (resuming from --workdir), then evaluate; eval: evaluate a checkpoint")
  parser.add_argument("--checkpoint", type=int, default=None, metavar="STEP",
                      help="--mode eval: the step of the checkpoint to evaluate (default: the latest)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. train.num_steps=10 (repeatable; the value is a Python literal)")
  parser.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                      help="multi-process: HOST:PORT of process 0's coordinator")
  parser.add_argument("--num_processes", type=int, default=None, metavar="N",
                      help="multi-process: number of processes in the job")
  parser.add_argument("--process_id", type=int, default=None, metavar="I",
                      help="multi-process: this process's index in [0, num_processes)")
  parser.add_argument("-v", "--verbosity", type=int, default=None, metavar="N",
                      help="absl logging verbosity (default: warnings and errors only; 0 also shows INFO)")
  args, rest = parser.parse_known_args(argv[1:])
  if args.checkpoint is not None and args.mode != "eval":
    parser.error("--checkpoint applies to --mode eval; training always resumes from the latest checkpoint")
  if args.verbosity is not None:
    rest.append(f"--verbosity={args.verbosity}")
  try:
    unparsed = flags.FLAGS([argv[0], *rest])[1:]
  except flags.Error as e:
    parser.error(" ".join(str(e).split()))
  if unparsed:
    parser.error(f"unexpected arguments: {' '.join(unparsed)}")
  return args


def main(args):
  from mtp_jax.quiet_startup import quiet_startup
  quiet_startup()
  if args.verbosity is None:  # Orbax and CLU log every detail at INFO; -v 0 shows them
    logging.set_verbosity(logging.WARNING)
  from mtp_jax.errors import Preempted  # after flag parsing: keeps --help fast
  try:
    with cli.reported():
      from mtp_jax.parallel import distributed
      distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
      from mtp_jax.config import apply_overrides, load_config
      config = apply_overrides(load_config(args.config), args.set)
      from mtp_jax.train import loop
      if args.mode == "eval":
        loop.evaluate_checkpoint(config, args.workdir, args.checkpoint)
      else:
        loop.train_and_evaluate(config, args.workdir)
  except Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(143)  # 128 + SIGTERM, as if the signal had ended the process


if __name__ == "__main__":
  app.run(main, flags_parser=parse)
