"""CLU metric writers: console (absl logging), TensorBoard and a JSON-lines file, plus progress.

Only process 0 writes files; the others log to the console only.
"""

import json
import os
import time

import jax
import numpy as np
from clu import metric_writers

JSON_FILE = "metrics.jsonl"


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per write_scalars call: {"step": s, "name": value, ...}.

  `resume_step`: rows of steps after it (logged by a run that died before its next checkpoint)
  are dropped when the file is opened, so a resumed run leaves exactly one row per step.
  None (evaluation runs): every row is kept.
  """

  def __init__(self, path: str, resume_step: int | None = 0):
    self.path = path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path) and resume_step is not None:
      with open(path) as f:
        rows = [line for line in f if line.strip()]
      kept = [line for line in rows if json.loads(line).get("step", 0) <= resume_step]
      if len(kept) != len(rows):
        with open(path + ".tmp", "w") as f:
          f.writelines(kept)
        os.replace(path + ".tmp", path)
    self._file = open(path, "a")

  def write_scalars(self, step, scalars):
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")

  def write_hparams(self, hparams):
    self._file.write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()

  # Not carried by the JSON file (TensorBoard has them).
  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass


def create_writer(workdir: str, resume_step: int | None = 0) -> metric_writers.MetricWriter:
  """Console + TensorBoard (`<workdir>/tensorboard`) + `<workdir>/metrics.jsonl` on process 0.
  resume_step: see JsonlWriter (None keeps every row already in the file)."""
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(None, just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"), asynchronous=True),
      JsonlWriter(os.path.join(workdir, JSON_FILE), resume_step),
  ])


class Progress:
  """Prints `step 40/200 | loss 2.31 | 3.1 steps/s | ETA 52s` lines and measures steps/s."""

  def __init__(self, total_steps: int, start_step: int):
    self.total, self.last_step, self.last_time = total_steps, start_step, time.perf_counter()

  def update(self, step: int, scalars: dict) -> float:
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(rate, 1e-9)
    shown = " | ".join(f"{k} {v:.4g}" for k, v in scalars.items())
    if jax.process_index() == 0:
      print(f"step {step}/{self.total} | {shown} | {rate:.2f} steps/s | ETA {_duration(eta)}", flush=True)
    return rate


def read_rows(workdir: str) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl` that carry a step (hparams rows left out)."""
  path = os.path.join(workdir, JSON_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if "step" in r]


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 120:
    return f"{seconds}s"
  if seconds < 7200:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
