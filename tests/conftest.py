"""Test setup: CPU backend with 8 host devices and the persistent compilation cache, set before
JAX starts; shared fixtures build a small synthetic SAMRS sample and its TFRecords once."""

import contextlib
import fcntl
import os
import pickle
import shutil

os.environ["JAX_PLATFORMS"] = "cpu"
# XLA:CPU aborts a program whose simulated devices wait more than 40 s for each other at a
# collective; 8 simulated devices of a loaded 2-core machine can lag that much (seen in the
# three-task step), so the tests allow 15 minutes. The tests' programs are tiny and compile far
# longer than they run, so LLVM optimises them at level 0: compiles take ~40 % less time, steps
# run ~1.7x slower; without LLVM's expensive passes the three-task step compiles in 43 s instead
# of 51 (same step time). Child processes get the same flags (TEST_XLA_FLAGS).
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                  "--xla_cpu_collective_timeout_seconds=900")
# Added once: pytest-xdist's workers inherit the controller's environment, where this file has
# already run, and the persistent cache keys on the XLA_FLAGS string, so a repeated copy would
# keep every worker's programs from the cache entries of the processes the tests start (the
# notebook's kernel, main.py children) with "--xla_force_host_platform_device_count=8 " +
# TEST_XLA_FLAGS.
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in ["--xla_force_host_platform_device_count=8",
                                                         *TEST_XLA_FLAGS.split()] if f not in _flags])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags, logging  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
jax.config.update("jax_compilation_cache_dir", os.path.join(ROOT, ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
flags.FLAGS.mark_as_parsed()
logging.set_verbosity(logging.WARNING)

QUICKSTART = os.path.join(ROOT, "configs", "pretrain", "quickstart.py")


def tiny_overrides(data_dir, **overrides) -> list[str]:
  """`--set` values shrinking the quickstart to a 2-block, 48-wide ViT at 64 px on the test sample,
  semantic segmentation only (`TINY_RD` and `TINY_IS` add toy rotated-detection and
  instance-segmentation heads)."""
  sets = [f"data.dir={data_dir!r}", f"data.image_size={SAMPLE_SIZE}", "data.batch_per_subset=8",
          "data.shuffle_window=16", "model.encoder_overrides.embed_dim=48",
          "model.encoder_overrides.depth=2", "model.encoder_overrides.num_heads=2",
          "model.encoder_overrides.out_indices=(0, 1, 1, 1)",
          "model.encoder_overrides.patch_size=8",  # 8x8 tokens: RVSA windows fit at 64 px
          "tasks.ss.channels=16", "data.max_instances.fast=2", "tasks.rd.enabled=False",
          "tasks.is.enabled=False",
          "optimizer.lr=1e-2", "optimizer.warmup_steps=0", "train.log_every=1",
          "train.checkpoint_every=3", "eval.batch_per_subset=8", "eval.report_images=1"]
  return sets + [f"{k}={v!r}" for k, v in overrides.items()]


def tiny_config(data_dir, **overrides):
  """The quickstart config with `tiny_overrides` (and `overrides`, dotted keys) applied."""
  from mtp_jax import config as config_lib
  return config_lib.apply_overrides(config_lib.load_config(QUICKSTART), tiny_overrides(data_dir, **overrides))


# {subset: object class names} of SAMRS (what the converted sample carries).
def _samrs_classes():
  from data_pipelines.samrs.classes import subset
  return {s: list(subset(s).classes) for s in ("sota", "sior", "fast")}


SAMRS_CLASSES = _samrs_classes()

# A toy Oriented R-CNN for the 64 px sample: MTP's structure and assignment rules, small widths
# and sample counts, anchors of 2 x stride (the sample's objects are 6-17 px at 64 px; MTP's
# 8 x stride anchors would never reach the 0.3 IoU a positive needs).
TINY_RD = {"tasks.rd.enabled": True, "tasks.rd.neck_channels": 32, "tasks.rd.fc_channels": 64,
           "tasks.rd.anchor_scale": 2.0, "tasks.rd.rpn_samples": 64, "tasks.rd.train_proposals": 256,
           "tasks.rd.test_proposals": 256, "tasks.rd.rcnn_samples": 64, "tasks.rd.max_detections": 100,
           "tasks.rd.max_candidates": 1000}

# A toy Mask R-CNN for the same sample: MTP's structure and rules, small widths and counts.
TINY_IS = {"tasks.is.enabled": True, "tasks.is.neck_channels": 32, "tasks.is.fc_channels": 64,
           "tasks.is.mask_channels": 16, "tasks.is.anchor_scale": 2.0, "tasks.is.rpn_samples": 64,
           "tasks.is.train_pre_nms": 256, "tasks.is.train_proposals": 128,
           "tasks.is.test_pre_nms": 256, "tasks.is.test_proposals": 128,
           "tasks.is.rcnn_samples": 64, "tasks.is.max_detections": 50,
           "tasks.is.max_candidates": 1000}

def run_optimised(jitted, *args):
  """`jitted` compiled for `args` at LLVM's default level 3 instead of the tests' 0: for the
  overfitting tests, whose hundreds of steps make running, not compiling, dominate, and whose
  thresholds were set with default numerics (at level 0 the initial parameters differ in their
  last bits and rd's 250 steps reach mAP 0.875 instead of > 0.9 on sota)."""
  return jitted.lower(*args).compile(compiler_options={"xla_backend_optimization_level": "3"})


@contextlib.contextmanager
def _locked(path):
  with open(path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
    yield


def _pickle_dump(value, path):
  with open(path, "wb") as f:
    pickle.dump(value, f)


def _pickle_load(path):
  with open(path, "rb") as f:
    return pickle.load(f)


def computed_once(tmp_path_factory, name, compute, dump=None, load=None):
  """`compute(folder)` for a session fixture, run once per test run even over pytest-xdist
  workers (`make test` runs two, and a fixture recomputed per worker cost minutes).

  Without xdist: compute in a fresh temporary folder. With it, in `<run's shared tmp>/<name>/`:
  the first worker to ask computes under an exclusive file lock and writes the value
  (`dump(value, path)`, default pickle); the others wait for the lock and `load(path)` it. A
  failed computation leaves no value, so each worker that asks fails with its own traceback.
  """
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return compute(str(tmp_path_factory.mktemp(name)))
  dump = dump or _pickle_dump
  load = load or _pickle_load
  root = tmp_path_factory.getbasetemp().parent   # pytest-N/, above each worker's popen-gwK/
  folder, done = root / name, root / f"{name}.value"
  with _locked(root / f"{name}.lock"):
    if done.exists():
      return load(str(done))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    value = compute(str(folder))
    dump(value, str(done) + ".part")
    os.replace(str(done) + ".part", done)
    return value


SAMPLE_IMAGES = 16   # per subset: 12 train, 4 valid
SAMPLE_SIZE = 64


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
  from data_pipelines.samrs import synthetic
  def generate(out):
    synthetic.generate(out, images=SAMPLE_IMAGES, size=SAMPLE_SIZE, seed=0)
    return out
  return computed_once(tmp_path_factory, "samrs_sample", generate)


@pytest.fixture(scope="session")
def tfrecord_dir(sample_dir, tmp_path_factory):
  from data_pipelines.samrs import convert
  def convert_all(out):
    for subset in ("sota", "sior", "fast"):
      for split in ("train", "valid"):
        convert.convert_split(sample_dir, subset, split, out, num_shards=2, log=lambda *_: None)
    return out
  return computed_once(tmp_path_factory, "samrs_tfrecords", convert_all)


# The tiny three-task (ss + is + rd) pretraining run shared by the detection and segmentation
# tests (3 steps, evaluated at the end): its workdir, results and the overrides that made it
# (for main.py children).
# On the 8-device mesh, data parallel (the quickstart's mesh.shape (-1, 1, 1)); the data read as 2
# streams and a checkpoint every step, so that two processes can resume it (test_multihost).
MTP_RUN = {**TINY_IS, **TINY_RD, "train.num_steps": 3, "eval.every_steps": 0, "data.num_streams": 2,
           "train.checkpoint_every": 1}


@pytest.fixture(scope="session")
def mtp_run(tfrecord_dir, tmp_path_factory):
  from mtp_jax.train import loop
  return computed_once(tmp_path_factory, "mtp",
                       lambda workdir: (workdir, loop.train_and_evaluate(tiny_config(tfrecord_dir, **MTP_RUN), workdir)))


# rd alone, overfitted on the first 2 training images of each subset (unaugmented, 250 steps at
# LLVM level 3): a detector that really finds the sample's objects, shared by the overfitting
# test (test_rotated_detection_task) and large-scene prediction (test_predict).
RD_OVERFIT_STEPS = 250


@pytest.fixture(scope="session")
def rd_overfit(tfrecord_dir, tmp_path_factory):
  """(tasks, mesh, trainer, trained state, the raw batch it was trained on, per-step metrics);
  one device. Trained once per test run (`computed_once`): another worker rebuilds the
  trainer and puts the saved state back on its device."""
  from data_pipelines.samrs import examples as samrs_examples
  from mtp_jax.parallel import sharding
  from mtp_jax import experiment
  from mtp_jax.train import batching, loop
  config = tiny_config(tfrecord_dir, **TINY_RD, **{
      "tasks.ss.enabled": False, "data.batch_per_subset": 2, "model.encoder_overrides.embed_dim": 64,
      "optimizer.lr": 2e-3, "optimizer.weight_decay": 0.0, "train.num_steps": RD_OVERFIT_STEPS})
  tasks = experiment.tasks(config)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  trainer = loop.Trainer(config, tasks, mesh)
  raw = {s: next(iter(samrs_examples.make_dataset(tfrecord_dir, s, "train", image_size=SAMPLE_SIZE, max_instances=16,
                                                  batch_size=2, train=False))) for s in ("sota", "sior", "fast")}

  def train(_):
    batch = batching.device_batch(raw, ("sota", "sior", "fast"), mesh, trainer.fields)
    state = run_optimised(jax.jit(trainer._init_fn, out_shardings=trainer.state_shardings))()
    step = run_optimised(trainer.step, state, batch)
    history = []
    for _ in range(RD_OVERFIT_STEPS):
      state, metrics = step(state, batch)
      history.append(jax.device_get(metrics))
    return state, history

  def dump(value, path):
    state, history = value
    _pickle_dump(([np.asarray(leaf) for leaf in jax.tree.leaves(state)], history), path)

  def load(path):
    leaves, history = _pickle_load(path)
    tree = jax.tree.structure(trainer.state_shardings)
    return jax.device_put(jax.tree.unflatten(tree, leaves), trainer.state_shardings), history

  state, history = computed_once(tmp_path_factory, "rd_overfit", train, dump, load)
  return tasks, mesh, trainer, state, raw, history
