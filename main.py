"""mtp_jax entry point.

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

flags.DEFINE_string("config", None, "config file: path/to/config.py[:arg]")
flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the report go")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train: train (resuming from --workdir), then evaluate; eval: evaluate a checkpoint")
flags.DEFINE_integer("checkpoint", None, "--mode eval: the step of the checkpoint to evaluate (default: the latest)")
flags.DEFINE_multi_string("set", [], "config override key=value, e.g. train.num_steps=10")
flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0's coordinator")
flags.DEFINE_integer("num_processes", None, "multi-process: number of processes in the job")
flags.DEFINE_integer("process_id", None, "multi-process: this process's index in [0, num_processes)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mtp_jax.quiet_startup import quiet_startup
  quiet_startup()
  if not FLAGS["verbosity"].present:  # Orbax and CLU log every detail at INFO; -v 0 shows them
    logging.set_verbosity(logging.WARNING)
  from mtp_jax.errors import Preempted, UserError  # after flag parsing: keeps --help fast
  try:
    from mtp_jax.parallel import distributed
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from mtp_jax.config import apply_overrides, load_config
    config = apply_overrides(load_config(FLAGS.config), FLAGS.set)
    from mtp_jax.train import loop
    if FLAGS.mode == "eval":
      loop.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint)
    elif FLAGS.checkpoint is not None:
      raise UserError("--checkpoint applies to --mode eval; training always resumes from the latest checkpoint")
    else:
      loop.train_and_evaluate(config, FLAGS.workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(143)  # 128 + SIGTERM, as if the signal had ended the process


if __name__ == "__main__":
  app.run(main)
