"""Surviving the death of a run: SIGKILL after a checkpoint, SIGTERM (preemption notice, which must
save at the current step), and a damaged latest checkpoint. The dying run is main.py in a child
process; the restart runs in the test process. Each time the finished run must be
bit-identical to one that never stopped: parameters and every logged loss."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtp_jax.train import loop

from conftest import QUICKSTART, ROOT, tiny_config, tiny_overrides

# The train and eval programs are those of test_multihost.py's RUN (5 steps: the same learning
# rate schedule), which runs first: they come from the compilation cache.
STEPS = 5
EVERY = 2
RUN = {"train.num_steps": STEPS, "train.checkpoint_every": EVERY, "eval.max_batches": 1}
# The SIGTERM run saves only when it stops (or at the end): any step below STEPS that it saved at
# is the step SIGTERM found it on, not a periodic checkpoint's.
SIGTERM_RUN = {**RUN, "train.checkpoint_every": STEPS}


def command(workdir, data_dir, run=RUN):
  sets = [arg for s in tiny_overrides(data_dir, **run) for arg in ("--set", s)]
  return [sys.executable, os.path.join(ROOT, "main.py"), "--config", QUICKSTART, "--workdir", workdir, *sets]


def environment():
  """The test process's backend (8 CPU devices) and its compilation cache, for main.py."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


class Run:
  """main.py in a child process; its output lines are collected as they come."""

  def __init__(self, workdir, data_dir, run=RUN):
    self.proc = subprocess.Popen(command(workdir, data_dir, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=environment(), cwd=ROOT)
    self.lines = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
    self._reader.start()

  def wait_for(self, condition, timeout=300):
    deadline = time.time() + timeout
    while not condition():
      assert self.proc.poll() is None, "".join(self.lines)[-3000:]
      assert time.time() < deadline, "".join(self.lines)[-3000:]
      time.sleep(0.02)

  def finish(self, timeout=300):
    self.proc.wait(timeout)
    self._reader.join(10)
    return self.proc.returncode, "".join(self.lines)


def params(workdir, step):
  tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return jax.tree.leaves(tree["params"])


def losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_same_run(workdir, reference):
  for a, b in zip(params(workdir, STEPS), params(reference, STEPS), strict=True):
    np.testing.assert_array_equal(a, b)
  assert losses(workdir) == losses(reference)      # one row per step, every loss bit-identical
  assert [s for s, _ in losses(workdir)] == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def reference(tfrecord_dir, tmp_path_factory):
  """The uninterrupted run (in this process; main.py children load its compiled step from the cache)."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  loop.train_and_evaluate(tiny_config(tfrecord_dir, **RUN), workdir)
  return workdir


def restart(workdir, data_dir, capsys, run=RUN) -> tuple[dict, str]:
  """Runs the same config to the end in this process (a fresh process would do the same, slower)."""
  capsys.readouterr()
  results = loop.train_and_evaluate(tiny_config(data_dir, **run), workdir)
  return results, capsys.readouterr().out


def test_sigkill_after_a_checkpoint_then_restart_is_bit_identical(reference, tfrecord_dir, tmp_path, capsys):
  workdir = str(tmp_path / "killed")
  run = Run(workdir, tfrecord_dir)
  run.wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", str(EVERY))))   # committed (renamed)
  run.proc.kill()
  code, _ = run.finish()
  assert code == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, "report")), "the run ended before the kill"
  results, out = restart(workdir, tfrecord_dir, capsys)
  resumed_at = results["train"]["start_step"]
  assert EVERY <= resumed_at < STEPS and resumed_at % EVERY == 0 and "resumed from" in out
  assert_same_run(workdir, reference)


def test_sigterm_saves_the_current_step_and_the_restart_is_bit_identical(reference, tfrecord_dir, tmp_path, capsys):
  workdir = str(tmp_path / "preempted")
  run = Run(workdir, tfrecord_dir, SIGTERM_RUN)
  run.wait_for(lambda: any(line.startswith("step 1/") for line in run.lines))
  run.proc.send_signal(signal.SIGTERM)
  code, out = run.finish()
  assert code == 143, out[-3000:]
  stopped = int(re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved", out).group(1))
  assert 1 <= stopped < STEPS
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*")))
  assert steps == [stopped]                         # saved at the step it was on, the only checkpoint
  assert losses(workdir)[-1][0] == stopped          # ... and that step's metrics were logged
  _, out = restart(workdir, tfrecord_dir, capsys, SIGTERM_RUN)
  assert f"resumed from {os.path.join(workdir, 'checkpoints')} at step {stopped}" in out
  assert_same_run(workdir, reference)


def _largest_file(directory):
  files = [p for p in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


def _damage(victim, how):
  with open(victim, "r+b") as f:
    if how == "truncated":
      f.truncate(os.path.getsize(victim) // 2)
    else:   # Orbax reads this back without complaint; the saved fingerprint does not match
      f.seek(os.path.getsize(victim) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0x55]))


def test_damaged_checkpoints_fall_back_to_the_last_good_one_loudly(reference, tfrecord_dir, tmp_path, capsys):
  """The latest checkpoint truncated (unreadable) and the one before it with a flipped byte
  (readable, the wrong fingerprint): both are set aside with a warning each and the run
  resumes from the one before them, ending as if nothing had happened."""
  workdir = str(tmp_path / "damaged")
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, "report", "metrics.json"))
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert saved[-1] == STEPS and len(saved) >= 3, saved
  damaged = {saved[-1]: "truncated", saved[-2]: "flipped byte"}
  for step, how in damaged.items():
    _damage(_largest_file(os.path.join(workdir, "checkpoints", str(step), "state")), how)
  capsys.readouterr()
  results = loop.train_and_evaluate(tiny_config(tfrecord_dir, **RUN), workdir)
  err = capsys.readouterr().err
  for step in damaged:
    assert f"checkpoint {os.path.join(workdir, 'checkpoints')}/{step} is damaged" in err, step
    moved = glob.glob(os.path.join(workdir, "checkpoints.corrupt", f"{step}-*"))
    assert len(moved) == 1 and os.path.isdir(os.path.join(moved[0], "state"))   # kept, not deleted
  assert "unreadable state" in err and "differ from the fingerprint" in err
  assert results["train"]["start_step"] == saved[-3]   # the last good checkpoint
  assert_same_run(workdir, reference)
