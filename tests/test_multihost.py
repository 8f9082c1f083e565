"""Multi-host: two processes with 4 CPU devices each form one 8-device job through jax.distributed
(coordinator on 127.0.0.1), resume a one-process checkpoint, each read its own shards, and they
end where one 8-device process ends. Plus how a process finds its job (flags, SLURM, TPU)
without starting anything."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mtp_jax.checkpoints.manager import read_checkpoint
from mtp_jax.metrics import DotaEvaluator
from mtp_jax.errors import ConfigError
from mtp_jax.parallel import distributed
from mtp_jax.train import loop

from conftest import MTP_RUN, TEST_XLA_FLAGS, QUICKSTART, ROOT, tiny_config, tiny_overrides

def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def params_at(workdir, step):
  params, _, _, _ = read_checkpoint(workdir, step)   # onto one device, whatever topology wrote it
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}


def test_two_processes_resume_train_and_evaluate_the_three_tasks_as_one_process(mtp_run, tfrecord_dir, tmp_path):
  """The shared tiny three-task run (one process, 8 devices, data read as 2 streams, a checkpoint
  every step) resumed from its step-1 checkpoint by 2 processes of 4 devices: each restores the
  arrays and its own stream's data position, reads its own shards (0::2, 1::2), and the
  gradients are summed over the processes. Steps 2-3 are the one-process run's, and the
  evaluation split over the 2 processes (confusion counts summed on device; each process's
  detections and masks gathered for DOTA mAP and COCO AP) gives exactly the numbers, the DOTA
  Task1 files and the COCO result files of one 8-device process evaluating the same checkpoint
  (which restores the 2 processes' checkpoint onto one process)."""
  shared, _ = mtp_run
  multi = str(tmp_path / "multi")
  shutil.copytree(shared, multi)
  for name in ("report", "tensorboard", "metrics.jsonl", "checkpoints/2", "checkpoints/3"):
    path = os.path.join(multi, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  outs = run_two_processes(tfrecord_dir, multi)
  assert "report:" in outs[0] and "report:" not in outs[1]        # only process 0 writes reports
  assert "rd rotated mAP" in outs[0] and "is mask AP" in outs[0] and "eval step 3" not in outs[1]

  # The same run: losses and each task's loss components per step, and the parameters. These are
  # two different XLA programs (4 devices a process + gloo vs 8 in one), so float sums differ in
  # their last bits, the RoI sampling sees the same proposals only up to that rounding, and
  # AdamW (~lr * sign(g) while its moments are young) magnifies them where a gradient is ~0.
  # Measured: loss rel 0, components 2.1e-7, parameters max 1.4e-6, mean 7.4e-10.
  rows = [json.loads(line) for line in open(os.path.join(multi, "metrics.jsonl"))]
  want = {r["step"]: r for r in map(json.loads, open(os.path.join(shared, "metrics.jsonl"))) if "loss" in r}
  rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in rows] == [2, 3]                       # one writer, one row a step
  components = [k for k in rows[0] if k.split("/")[0] in ("ss", "is", "rd")]
  assert {k.split("/")[0] for k in components} == {"ss", "is", "rd"}
  loss_rel = max(abs(r["loss"] - want[r["step"]]["loss"]) / abs(want[r["step"]]["loss"]) for r in rows)
  part_rel = max(abs(r[k] - want[r["step"]][k]) / max(abs(want[r["step"]][k]), 1e-3) for r in rows for k in components)
  a, b = params_at(multi, 3), params_at(shared, 3)
  no_gradient = {"['encoder']['fpn1']['3']['bias']", "['encoder']['fpn2']['0']['bias']"}
  diff = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a if k not in no_gradient])
  measured = (f"loss rel {loss_rel:.2e}, component rel max {part_rel:.2e}, "
              f"params max {diff.max():.2e} mean {diff.mean():.2e}")
  print("two processes vs one, three tasks:", measured)
  assert loss_rel < 1e-5 and part_rel < 1e-4 and diff.max() < 1e-3 and diff.mean() < 1e-6, measured
  # The checkpoint holds both streams' positions, as the one process's two streams. (Grain's
  # interleave also records which slot its shard iterator took, iterators_in_use_indices: a
  # restored iterator numbers it anew, so that bookkeeping differs from an uninterrupted run's.)
  data = positions(json.load(open(os.path.join(multi, "checkpoints", "3", "data", "metadata"))))
  assert data == positions(json.load(open(os.path.join(shared, "checkpoints", "3", "data", "metadata"))))
  assert sorted(data["streams"]) == ["0", "1"]

  evaluated = str(tmp_path / "evaluated")
  shutil.copytree(multi, evaluated)
  shutil.rmtree(os.path.join(evaluated, "report"))   # what follows is the evaluation's own output
  loop.evaluate_checkpoint(tiny_config(tfrecord_dir, **MTP_RUN), evaluated)
  report = json.load(open(os.path.join(evaluated, "report", "metrics.json")))
  eval_multi = json.load(open(os.path.join(multi, "report", "metrics.json")))["eval"]
  assert report["step"] == 3 and report["mode"] == "eval" and report["eval"] == eval_multi
  assert all(eval_multi[s]["rd"]["images"] == 4 and eval_multi[s]["is"]["images"] == 4 for s in eval_multi)
  # Whichever process evaluated an image, byte for byte the same submission lines and COCO
  # files: 2 processes of 4 devices run each image on the same device position, with the same
  # per-device program, as one process of 8.
  read = lambda *parts: open(os.path.join(*parts), "rb").read()
  lines = 0
  for s in eval_multi:
    for name in os.listdir(os.path.join(multi, "report", "dota_task1", s)):   # Task1_*.txt and Task1.zip
      want_file = read(multi, "report", "dota_task1", s, name)
      assert read(evaluated, "report", "dota_task1", s, name) == want_file, (s, name)
      lines += len(want_file.splitlines()) if name.endswith(".txt") else 0
  assert lines > 0   # detections to compare: a misaligned row would change them
  coco = os.path.join(multi, "report", "coco")
  names = sorted(os.listdir(coco))
  assert names == sorted(f"{s}_{k}.json" for s in eval_multi for k in ("gt", "bbox", "segm"))
  for name in names:
    assert read(evaluated, "report", "coco", name) == read(coco, name), name
  assert any(json.load(open(os.path.join(coco, f"{s}_segm.json"))) for s in eval_multi)


def positions(state):
  """A data-iterator checkpoint without grain's interleave slot numbers."""
  if isinstance(state, dict):
    return {k: positions(v) for k, v in state.items() if k != "iterators_in_use_indices"}
  return state


def run_two_processes(tfrecord_dir, workdir, *args) -> list[str]:
  """main.py with the shared run's settings (MTP_RUN) as 2 processes of 4 CPU devices each
  (coordinator on 127.0.0.1); their outputs."""
  port = free_port()
  sets = [arg for s in tiny_overrides(tfrecord_dir, **MTP_RUN) for arg in ("--set", s)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4 " + TEST_XLA_FLAGS,
         "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache")}
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config", QUICKSTART, "--workdir", workdir, *sets,
       *args, "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT) for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def test_cluster_from_flags_slurm_and_tpu():
  assert distributed.resolve(environ={}) == distributed.Cluster("single")
  assert distributed.resolve("10.0.0.1:1234", 4, 2, environ={}) == distributed.Cluster("flags", "10.0.0.1:1234", 4, 2)
  with pytest.raises(ConfigError, match="go together"):
    distributed.resolve("10.0.0.1:1234", 4, None, environ={})
  with pytest.raises(ConfigError, match="--process_id 4 is not in"):
    distributed.resolve("10.0.0.1:1234", 4, 4, environ={})
  slurm = {"SLURM_NTASKS": "32", "SLURM_PROCID": "17", "SLURM_JOB_ID": "4100",
           "SLURM_STEP_NODELIST": "gpu-a[07-10,12],gpu-b3"}
  assert distributed.resolve(environ=slurm) == distributed.Cluster("slurm", "gpu-a07:12004", 32, 17)
  assert distributed.resolve(environ={**slurm, "MTP_COORDINATOR_PORT": "2222"}).coordinator_address == "gpu-a07:2222"
  assert distributed.resolve(environ={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).source == "single"
  with pytest.raises(ConfigError, match="srun"):
    distributed.resolve(environ={"SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"})
  # Flags win over the environment.
  assert distributed.resolve("h:1", 2, 1, environ=slurm).source == "flags"
  assert distributed.resolve(environ={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}).source == "tpu"
  assert distributed.resolve(environ={"TPU_WORKER_HOSTNAMES": "t0"}).source == "single"
  assert distributed.first_host("node1") == "node1"
  assert distributed.first_host("node[3-4]") == "node3"


GATHER_SCRIPT = """
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
sys.path.insert(0, sys.argv[3])
from test_dota_map import random_dataset
from mtp_jax.metrics import DotaEvaluator
detections, annotations = random_dataset(np.random.default_rng(11), images=7)
evaluator = DotaEvaluator(3)
for i in range(jax.process_index(), 7, 2):        # each process its own images, as its shards
  evaluator.add(i, detections[i], annotations[i])
r = evaluator.gather().result()
print("RESULT " + json.dumps({"map": r["map"], "images": r["images"], "ap": r["ap_per_class"]}))
"""


def test_host_side_evaluator_gathered_over_two_processes_equals_one():
  """DotaEvaluator.gather() (pickled images through jax's process_allgather) in two real processes
  gives every process the one-process numbers."""
  from test_dota_map import random_dataset
  detections, annotations = random_dataset(np.random.default_rng(11), images=7)
  one = DotaEvaluator(3)
  for i in range(7):
    one.add(i, detections[i], annotations[i])
  expected = one.result()
  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1 " + TEST_XLA_FLAGS}
  procs = [subprocess.Popen([sys.executable, "-c", GATHER_SCRIPT, f"127.0.0.1:{port}", str(i),
                             os.path.dirname(__file__)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
           for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    got = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert got["images"] == 7 and got["map"] == expected["map"]
    assert got["ap"] == {str(k): v for k, v in expected["ap_per_class"].items()}
