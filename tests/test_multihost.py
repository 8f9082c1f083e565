"""Multi-host: two processes with 4 CPU devices each form one 8-device job through jax.distributed
(coordinator on 127.0.0.1), each reads its own shards, and they end where one 8-device process
ends. Plus how a process finds its job (flags, SLURM, TPU) without starting anything."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mtp_jax import export
from mtp_jax.metrics import DotaEvaluator
from mtp_jax.errors import ConfigError
from mtp_jax.parallel import distributed
from mtp_jax.train import loop

from conftest import MTP_RUN, TEST_XLA_FLAGS, QUICKSTART, ROOT, tiny_config, tiny_overrides

RUN = {"train.num_steps": 5, "train.checkpoint_every": 5, "eval.max_batches": 1}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def params_at(workdir, step):
  params, _ = export.restore_params(workdir, step)   # onto one device, whatever topology wrote it
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}


def test_two_processes_equal_one_process_with_eight_devices(tfrecord_dir, tmp_path):
  # One process, 8 devices, reading the data as 2 streams: the batches two processes would read.
  single = str(tmp_path / "single")
  loop.train_and_evaluate(tiny_config(tfrecord_dir, **RUN, **{"data.num_streams": 2}), single)

  multi = str(tmp_path / "multi")
  outs = run_two_processes(tfrecord_dir, multi)
  assert "report:" in outs[0] and "report:" not in outs[1]        # only process 0 writes reports

  # The same run: every step's loss within rtol 2e-5 (measured 4e-6), and the parameters. These
  # are two different XLA programs (4 devices a process + gloo vs 8 in one), so float sums differ
  # in their last bits, and AdamW's first steps (~lr * sign(g)) magnify that where gradients are
  # tiny or jump (RVSA's bilinear sampling): the mean |difference| stays < 5e-5 (measured 7e-6)
  # and the largest < 5e-3, a tenth of the 5 * lr AdamW can move a parameter in 5 steps
  # (measured 1.3e-3). The two biases in front of BatchNorm have no gradient at all and are left out.
  rows = [json.loads(line) for line in open(os.path.join(multi, "metrics.jsonl"))]
  single_rows = [json.loads(line) for line in open(os.path.join(single, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]  # one writer, one row a step
  np.testing.assert_allclose([r["loss"] for r in rows if "loss" in r],
                             [r["loss"] for r in single_rows if "loss" in r], rtol=2e-5)
  a, b = params_at(multi, 5), params_at(single, 5)
  no_gradient = {"['encoder']['fpn1']['3']['bias']", "['encoder']['fpn2']['0']['bias']"}
  diff = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a if k not in no_gradient])
  assert diff.mean() < 5e-5 and diff.max() < 5e-3, (diff.mean(), diff.max())
  # Each process read its own stream (shards 0::2 and 1::2); the checkpoint holds both positions,
  # the same as the single process's two streams.
  data = json.load(open(os.path.join(multi, "checkpoints", "5", "data", "metadata")))
  single_data = json.load(open(os.path.join(single, "checkpoints", "5", "data", "metadata")))
  assert data == single_data and sorted(data["streams"]) == ["0", "1"]
  eval_multi = json.load(open(os.path.join(multi, "report", "metrics.json")))["eval"]
  eval_single = json.load(open(os.path.join(single, "report", "metrics.json")))["eval"]
  for s in eval_single:   # the same pixels and images scored; parameters equal to the tolerance above
    assert eval_multi[s]["ss"]["pixels"] == eval_single[s]["ss"]["pixels"]
    np.testing.assert_allclose(eval_multi[s]["ss"]["miou"], eval_single[s]["ss"]["miou"], atol=1e-4)

  # The evaluation split over the two processes (each reading its own valid shards, the
  # confusion counts summed on device; the end of the run above) gives exactly the numbers of
  # one process evaluating the same checkpoint, which also restores the two processes'
  # checkpoint onto one process's 8 devices. (`--mode eval` over two processes, restoring a
  # one-process checkpoint: test_two_processes_evaluate_the_three_tasks_exactly_as_one.)
  assert "eval step 5 sota: ss mIoU" in outs[0] and "eval step 5" not in outs[1]
  evaluated = str(tmp_path / "evaluated")
  shutil.copytree(multi, evaluated)
  shutil.rmtree(os.path.join(evaluated, "report"))   # what follows is the evaluation's own output
  loop.evaluate_checkpoint(tiny_config(tfrecord_dir, **RUN), evaluated)
  report = json.load(open(os.path.join(evaluated, "report", "metrics.json")))
  assert report["step"] == 5 and report["mode"] == "eval"
  assert report["eval"] == eval_multi


def test_two_processes_evaluate_the_three_tasks_exactly_as_one(mtp_run, tfrecord_dir, tmp_path):
  """The ss + is + rd checkpoint of the shared tiny run, evaluated by 2 processes (each its own
  valid shards; confusion counts summed on device, each process's detections and masks gathered
  for DOTA mAP and COCO AP): exactly the one-process numbers, the same DOTA Task1 lines and the
  same COCO result files."""
  single, _ = mtp_run
  evaluated = str(tmp_path / "evaluated")
  shutil.copytree(single, evaluated)
  shutil.rmtree(os.path.join(evaluated, "report"))   # what follows is the evaluation's own output
  outs = run_two_processes(tfrecord_dir, evaluated, "--mode", "eval", run=MTP_RUN)
  assert "rd rotated mAP" in outs[0] and "is mask AP" in outs[0] and "report:" not in outs[1]
  report = json.load(open(os.path.join(evaluated, "report", "metrics.json")))
  eval_single = json.load(open(os.path.join(single, "report", "metrics.json")))["eval"]
  assert report["eval"] == eval_single
  assert all(eval_single[s]["rd"]["images"] == 4 and eval_single[s]["is"]["images"] == 4
             for s in eval_single)
  # Whichever process evaluated an image, byte for byte the same submission lines and COCO
  # files: 2 processes of 4 devices run each image on the same device position, with the same
  # per-device program, as the shared run's one process of 8.
  read = lambda *parts: open(os.path.join(*parts)).read()
  binary = lambda *parts: open(os.path.join(*parts), "rb").read()
  lines = 0
  for s in eval_single:
    for name in os.listdir(os.path.join(single, "report", "dota_task1", s)):   # Task1_*.txt and Task1.zip
      want = binary(single, "report", "dota_task1", s, name)
      assert binary(evaluated, "report", "dota_task1", s, name) == want, (s, name)
      lines += len(want.splitlines()) if name.endswith(".txt") else 0
  assert lines > 0   # detections to compare: a misaligned row would change them
  coco = os.path.join(single, "report", "coco")
  names = sorted(os.listdir(coco))
  assert names == sorted(f"{s}_{k}.json" for s in eval_single for k in ("gt", "bbox", "segm"))
  for name in names:
    assert read(evaluated, "report", "coco", name) == read(coco, name), name
  assert any(json.load(open(os.path.join(coco, f"{s}_segm.json"))) for s in eval_single)


def run_two_processes(tfrecord_dir, workdir, *args, run=RUN) -> list[str]:
  """main.py as 2 processes of 4 CPU devices each (coordinator on 127.0.0.1); their outputs."""
  port = free_port()
  sets = [arg for s in tiny_overrides(tfrecord_dir, **run) for arg in ("--set", s)]
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
