"""Planning on the TPU compiler (mtp_jax/plan): slice names, the compiler's figures, the kernels
read from its HLO, and `python -m mtp_jax.plan` end to end on the quickstart config.

Everything compiles for TPU slices from this CPU machine with libtpu (the `tpu` extra, in the
test extra); the small programs compile in seconds, the toy-size quickstart's steps in about a minute.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from mtp_jax.plan import chips, estimate, hlo

from conftest import TINY_RD

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # the xdist workers and their children
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "pretrain", "quickstart.py")
GIB = 2 ** 30


def topology_devices(name: str):
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(**chips.resolve(name).topology_kwargs()).devices)


@pytest.fixture(scope="module")
def v5e():
  """One v5e chip of the TPU compiler, and a spec builder for arrays on it."""
  devices = topology_devices("v5e-4")
  mesh = Mesh(np.array(devices[:1]), ("one",))
  return lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))


# ---- slices ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, topology, num_chips, hosts, kind", [
    ("v4-8", "v4:2x2x1", 4, 1, "TPU v4"),
    ("v4-16", "v4:2x2x2", 8, 2, "TPU v4"),
    ("v5p-8", "v5:2x2x1", 4, 1, "TPU v5"),
    ("v5p-64", "v5:2x4x4", 32, 8, "TPU v5"),
    ("v5e-8", "v5e:2x4", 8, 1, "TPU v5 lite"),
    ("v5litepod-16", "v5e:4x4", 16, 2, "TPU v5 lite"),
    ("v5e-256", "v5e:16x16", 256, 32, "TPU v5 lite"),
    ("v6e-8", "v6e:2x4", 8, 1, "TPU v6 lite"),
    ("v6e-1", "v6e:1x1", 1, 1, "TPU v6 lite"),
    ("v5p:4x4x4", "v5:4x4x4", 64, 16, "TPU v5"),
])
def test_slice_names_give_the_compilers_devices_and_hosts(name, topology, num_chips, hosts, kind):
  s = chips.resolve(name)
  assert (s.topology, s.num_chips, s.num_hosts) == (topology, num_chips, hosts)
  devices = topology_devices(name)
  assert len(devices) == num_chips and len({d.process_index for d in devices}) == hosts
  assert {d.device_kind for d in devices} == {kind}
  assert chips.chip_of_device_kind(kind) is s.chip


@pytest.mark.parametrize("name, says", [
    ("v5p-7", "counts TensorCores"), ("v5e-3", "v5e-1, v5e-4, v5e-8"), ("v7-8", "unknown TPU generation"),
    ("v5e:2x2x2", "2 axes"), ("tpu", "expected a Cloud TPU name")])
def test_bad_slice_names_say_what_is_wrong(name, says):
  from mtp_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=says):
    chips.resolve(name)


# ---- the compiler's figures ------------------------------------------------------------------
def test_roofline_takes_the_slower_bound():
  r = estimate.roofline(flops=2e12, bytes_accessed=1e9, peak_flops=1e12, bytes_per_s=1e12)
  assert (r["seconds"], r["bound"], r["intensity"], r["utilization"]) == (2.0, "compute", 2000.0, 1.0)
  r = estimate.roofline(flops=1e9, bytes_accessed=4e12, peak_flops=1e12, bytes_per_s=2e12)
  assert (r["seconds"], r["bound"]) == (2.0, "memory") and r["utilization"] == pytest.approx(1e9 / 2 / 1e12)


def test_out_of_memory_messages_are_read():
  new = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                     "temporaries (32.00G) exceeds available HBM (15.75G).")
  old = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
                     "space hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.")
  assert estimate.out_of_memory(new)["needed_bytes"] == 32 * GIB
  assert estimate.out_of_memory(old)["needed_bytes"] == int(20.5 * GIB)
  assert estimate.out_of_memory(old)["available_bytes"] == int(15.75 * GIB)
  assert estimate.out_of_memory(RuntimeError("INVALID_ARGUMENT: bad shape")) is None


def test_a_program_beyond_hbm_is_refused_with_what_it_needs(v5e):
  from mtp_jax.plan.programs import Program, compile_program
  assert estimate.usable_hbm(topology_devices("v5e-4")[0]) == int(15.75 * GIB)
  assert estimate.usable_hbm(topology_devices("v5p-8")[0]) > 95 * GIB
  square = lambda n: Program("square", jax.jit(lambda x: jnp.exp(x) @ x), (v5e((n, n)),), 1, 4 * n * n)
  fits = compile_program(square(8192), "tpu")
  assert fits.out_of_memory is None and estimate.memory(fits.executable)["total"] < GIB
  refused = compile_program(square(65536), "tpu")   # 16 GiB in, 16 out: more than a v5e chip holds
  assert refused.executable is None and refused.out_of_memory["needed_bytes"] > 16 * GIB
  assert refused.out_of_memory["available_bytes"] == int(15.75 * GIB)


# ---- kernels ---------------------------------------------------------------------------------
def _compiled(f, *args):
  with estimate.without_persistent_cache():
    compiled = jax.jit(f).lower(*args).compile()
  return compiled, estimate.cost(compiled), hlo.kernels_and_loops(compiled.as_text())


def test_kernel_bytes_and_flops_equal_the_compilers_on_simple_programs(v5e):
  x, w = v5e((4096, 4096)), v5e((4096, 4096), jnp.bfloat16)
  programs = {"elementwise chain": (lambda x: jnp.exp(jnp.sin(x) * 2 + 1) - jnp.cos(x), x),
              "reduction": (lambda x: jnp.sum(jnp.exp(x)), x),
              "matmul": (lambda a: a @ a.T, w),
              # 4 floats per row live as 128 (the tile's lanes): 32x the array's own bytes
              "narrow rows": (lambda x: jnp.exp(x.reshape(-1, 4)), x)}
  for name, (f, arg) in programs.items():
    _, cost, (kernels, loops) = _compiled(f, arg)
    assert not loops
    if name != "matmul":   # XLA charges a matmul's operands once per output tile that reads them
      assert sum(k.bytes for k in kernels) == pytest.approx(cost["bytes"], rel=1e-6), name
  _, cost, (kernels, _) = _compiled(*programs["matmul"])
  assert sum(k.flops for k in kernels) == pytest.approx(2 * 4096 ** 3, rel=1e-6)
  assert cost["flops"] == pytest.approx(2 * 4096 ** 3, rel=1e-3)
  assert cost["bytes"] >= sum(k.bytes for k in kernels) >= 2 * 4096 * 4096 * 2   # a read, a @ a.T written
  _, cost, (kernels, _) = _compiled(*programs["narrow rows"])
  assert sum(k.bytes for k in kernels) > 32 * 2 * 4096 * 4096 * 4 * 0.99


def test_convolution_flops_count_only_taps_on_real_input(v5e):
  conv = lambda stride, padding: (lambda x, w: jax.lax.conv_general_dilated(
      x, w, stride, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")))
  x, w = v5e((8, 32, 32, 128), jnp.bfloat16), v5e((3, 3, 128, 256), jnp.bfloat16)
  cases = [(conv((1, 1), "SAME"), x, w), (conv((2, 2), ((1, 1), (1, 1))), x, w),
           (lambda x, w: jax.lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
            v5e((4, 16, 16, 64), jnp.bfloat16), v5e((2, 2, 64, 64), jnp.bfloat16)),
           (lambda x, w: jax.grad(lambda w: jnp.sum(conv((1, 1), "SAME")(x, w).astype(jnp.float32) ** 2))(w), x, w)]
  # SAME 3x3 on 32x32: each axis has 32*3 - 2 taps on real pixels
  _, cost, (kernels, _) = _compiled(*cases[0])
  assert sum(k.flops for k in kernels) == 2 * 8 * 256 * (32 * 3 - 2) ** 2 * 128
  for f, *args in cases:
    _, cost, (kernels, _) = _compiled(f, *args)
    assert sum(k.flops for k in kernels) == pytest.approx(cost["flops"], rel=1e-2)   # XLA adds elementwise work


def test_fixed_loops_are_counted_per_iteration_and_scopes_name_the_model_part(v5e):
  def f(x, w):
    with jax.named_scope("encoder"):
      with jax.named_scope("blocks.3"):
        y = jax.lax.fori_loop(0, 7, lambda i, y: jnp.tanh(y @ w), x)
    return jnp.sum(y.astype(jnp.float32) ** 2)
  x, w = v5e((512, 512), jnp.bfloat16), v5e((512, 512), jnp.bfloat16)
  _, cost, (kernels, loops) = _compiled(jax.grad(f, argnums=1), x, w)
  fixed = [l for l in loops if l["trips"] is not None]
  assert fixed and {l["trips"] for l in fixed} == {7}
  repeated = [k for k in kernels if k.count == 7 and k.flops]
  assert repeated, "the loop bodies' matmuls run 7 times"
  # 7 forward matmuls, then 7 x 2 in the backward loop (the gradients of y and w), each 2 x 512^3.
  assert sum(k.flops for k in repeated) == pytest.approx(21 * 2 * 512 ** 3, rel=1e-6)
  assert sum(k.flops for k in repeated) / 7 <= cost["flops"]   # XLA counts each body once
  scopes = {(k.scope, k.stage) for k in kernels if k.flops}
  assert ("encoder/blocks.3/while/body/closed_call", "forward") in scopes
  assert any(scope.startswith("encoder/blocks.3") and stage == "backward" for scope, stage in scopes)
  assert hlo.collapse("encoder/blocks.3/attn") == "encoder/blocks.*/attn"
  rows = hlo.by_scope(kernels)
  assert sum(r["bytes"] for r in rows) == pytest.approx(sum(k.bytes for k in kernels))
  assert all(k.source for k in kernels if k.flops), "every matmul names its Python line"


def test_a_rematerialised_block_keeps_its_scope_name(v5e):
  """jax.checkpoint repeats the scope path and adds its own names in the backward pass."""
  def f(x, w):
    with jax.named_scope("encoder"), jax.named_scope("blocks.3"):
      def block(x):
        with jax.named_scope("attn"):
          return jnp.tanh(x @ w)
      y = jax.checkpoint(block)(x)
    return jnp.sum(y.astype(jnp.float32) ** 2)
  x, w = v5e((512, 512), jnp.bfloat16), v5e((512, 512), jnp.bfloat16)
  _, _, (kernels, _) = _compiled(jax.grad(f, argnums=1), x, w)
  assert {(k.scope, k.stage) for k in kernels if k.flops} == {("encoder/blocks.3/attn", "forward"),
                                                              ("encoder/blocks.3/attn", "backward")}


# ---- python -m mtp_jax.plan ------------------------------------------------------------------
def run_plan(tmp_path, *args, timeout=1500):
  """Runs the command; returns (exit code, stdout + stderr, the JSON it wrote or None)."""
  out = tmp_path / "plan.json"
  proc = subprocess.run([sys.executable, "-m", "mtp_jax.plan", *args, "--json", str(out)], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  text = proc.stdout + proc.stderr
  return proc.returncode, text, json.loads(out.read_text()) if out.exists() else None


def positive_figures(program: dict) -> dict:
  """The figures of a planned program that must be finite and positive."""
  figures = {"compile_s": program["compile_s"], "images_per_chip": program["images_per_chip"],
             "hbm total": program["hbm"]["total"], "hbm arguments": program["hbm"]["argument"],
             "hbm program": program["hbm"]["code"],
             "hbm available": program["hbm"]["available"], "flops": program["cost"]["flops"],
             "bytes": program["cost"]["bytes"], "hbm bytes": program["cost"]["hbm_bytes"],
             "roofline": program["roofline"]["seconds"], "intensity": program["roofline"]["intensity"],
             "images/s per chip": program["images_per_s_per_chip"], "mfu": program["mfu"]}
  return figures


def check_planned(result: dict, chips_wanted: int, hosts: int, programs: tuple):
  assert (result["chips"], result["hosts"], result["fits"]) == (chips_wanted, hosts, True)
  assert set(result["programs"]) == set(programs)
  chip = chips.resolve(result["topology"]).chip   # the table's figures, not the JSON's
  for name in programs:
    p = result["programs"][name]
    bad = {k: v for k, v in positive_figures(p).items() if not (math.isfinite(v) and v > 0)}
    assert not bad, (name, bad)
    assert p["fits"] is True and p["hbm"]["total"] < p["hbm"]["available"] and p["hbm"]["temp"] >= 0
    assert 0 < p["mfu"] <= 1
    cost, roof = p["cost"], p["roofline"]
    assert cost["flops"] == pytest.approx(cost["xla_flops"] + cost["loops"]["repeat_flops"])
    assert roof["compute_seconds"] == pytest.approx(cost["flops"] / chip.peak_bf16_flops)
    assert roof["memory_seconds"] == pytest.approx(cost["bytes"] / chip.hbm_bytes_per_s)
    assert roof["seconds"] == max(roof["compute_seconds"], roof["memory_seconds"])
  train = result["programs"]["train step"]
  assert train["schedule_hours"] == pytest.approx(result["train_steps"] * train["roofline"]["seconds"] / 3600)
  assert train["images_per_s_per_chip"] == pytest.approx(
      result["batch_per_subset"] * len(result["subsets"]) / chips_wanted / train["roofline"]["seconds"])


# The TPU compiler takes ~3 minutes on 2 cores for the quickstart's three-task step and ~2 for its
# evaluation step, so the tests plan the quickstart on one subset (each subset's head programs are
# alike), the two-host one with rotated detection (the heads' per-device NMS loops) beside
# segmentation, the one-host one with segmentation alone. The whole quickstart on one host: the
# README; the paper's three-task step on 8 hosts: docs/benchmarks.md.
ONE_SUBSET = ["--set", "data.subsets=('sota',)"]
# The quickstart's structure at the tests' toy size (conftest's tiny model: 64 px, a 2-block ViT of
# width 48, and the toy Oriented R-CNN): the same programs, compiled for TPU in a third of the time.
TINY_MODEL = [arg for key, value in {
    "data.image_size": 64, "model.encoder_overrides.embed_dim": 48, "model.encoder_overrides.depth": 2,
    "model.encoder_overrides.num_heads": 2, "model.encoder_overrides.out_indices": (0, 1, 1, 1),
    "model.encoder_overrides.patch_size": 8, "tasks.ss.channels": 16, **TINY_RD}.items()
    for arg in ("--set", f"{key}={value!r}")]


@pytest.mark.slow
def test_plan_the_quickstart_on_two_tpu_hosts(tmp_path):
  """The quickstart's train step compiled as the two-process job runs it on a v5p-16 (8 chips
  over 2 hosts, the global batch split over every chip of both): it fits, and every figure is
  finite and positive."""
  code, text, result = run_plan(tmp_path, "--config", QUICKSTART, "--topology", "v5p-16", "--top", "3", "--no-eval",
                                *ONE_SUBSET, *TINY_MODEL, "--set", "data.batch_per_subset=8", "--set", "tasks.is.enabled=False")
  assert code == 0, text
  check_planned(result, 8, 2, ("train step",))
  assert result["tasks"] == ["ss", "rd"] and result["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert result["compute_dtype"] == "bfloat16"   # 'auto' for the TPU, though traced on this CPU
  train = result["programs"]["train step"]
  assert train["images_per_chip"] == 1 and train["cost"]["loops"]["run_time"] > 0   # NMS's loops
  scopes = {row["scope"].split("/")[0] for row in train["top"]["by_scope"]}
  assert len(train["top"]["by_bytes"]) == 3 and scopes & {"encoder", "ss", "is", "rd"}
  for line in ("v5p-16 (v5p, 8 chips, 2 hosts; topology v5:2x2x2)", "train step: 8 images per run, 1 per chip",
               "roofline", "schedule", "images/s per chip", "every program fits",
               "kernels with the most bytes"):
    assert line in text, (line, text)
  assert "Traceback" not in text and "WARNING: could not determine" not in text


def test_plan_the_quickstart_on_one_tpu_host(tmp_path):
  """On a v4-8 (4 megacore chips, one host), semantic segmentation alone, with the encoder
  compiled alone beside it (--parts)."""
  code, text, result = run_plan(tmp_path, "--config", QUICKSTART, "--topology", "v4-8", "--parts", *ONE_SUBSET, *TINY_MODEL,
                                "--set", "tasks.is.enabled=False", "--set", "tasks.rd.enabled=False")
  assert code == 0, text
  check_planned(result, 4, 1, ("train step", "eval step"))
  assert result["chip"]["name"] == "v4" and result["usable_hbm"] == int(30.75 * GIB)
  assert "v4-8 (v4, 4 chips, 1 host; topology v4:2x2x1)" in text
  encoder, step = result["parts"]
  whole = result["programs"]["train step"]["cost"]
  assert 0 < encoder["flops"] < whole["flops"] and 0 < encoder["bytes"] < whole["bytes"]
  assert step["attributed"]["flops"] == pytest.approx(whole["flops"] - encoder["flops"])
  assert "encoder (forward + backward)" in text and "train step (ss)" in text


def test_a_config_that_cannot_fit_is_reported_and_exits_1(tmp_path):
  """A batch whose arguments alone exceed a v5e chip: refused before compiling, with the size it
  needs; an evaluation step whose temporaries do not fit: refused by the compiler. Exit code 1 and
  no traceback. A batch the slice cannot split and a slice that does not exist are input errors (2)."""
  code, text, result = run_plan(tmp_path, "--config", QUICKSTART, "--topology", "v5e-4", "--set",
                                "data.image_size=4096", "--set", "data.batch_per_subset=1024",
                                "--set", "tasks.is.enabled=False", "--set", "tasks.rd.enabled=False",
                                "--set", "model.encoder_overrides.attention_query_block=0")
  assert code == 1, text
  train, evaluation = result["programs"]["train step"], result["programs"]["eval step"]
  assert train["fits"] is False and result["fits"] is False and train["compile_s"] == 0   # not compiled
  assert train["hbm"]["needed"] > train["hbm"]["available"] == int(15.75 * GIB)
  assert "DOES NOT FIT: needs" in text and "arguments alone" in text and "Traceback" not in text
  # the evaluation step's 12 images of 4096 px fit as arguments: the compiler refuses them
  # (attention over all 65,536 tokens at once; in blocks of queries the step would fit)
  assert evaluation["fits"] is False and evaluation["compile_s"] > 0 and "Ran out of memory" in evaluation["refusal"]
  assert evaluation["hbm"]["needed"] > 16 * GIB
  code, text, _ = run_plan(tmp_path, "--config", QUICKSTART, "--topology", "v5e-8")
  assert code == 2 and "data.batch_per_subset = 4 must be a multiple of the 8 batch shards" in text, text
  assert "Traceback" not in text
  code, text, _ = run_plan(tmp_path, "--config", QUICKSTART, "--topology", "v5p-6")
  assert code == 2 and "counts TensorCores" in text and "Traceback" not in text


def test_plan_needs_the_tpu_compiler_and_says_how_to_get_it(monkeypatch):
  import importlib.util
  from mtp_jax.errors import UserError
  from mtp_jax.plan import planner
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(UserError, match=r"pip install -e '\.\[tpu\]'"):
    planner.tpu_target("v5p-8")


def test_plan_on_this_machine_runs_real_steps(tfrecord_dir, tmp_path):
  """--topology local compiles for this machine's devices (the 8 simulated CPU devices here) and
  --run times real steps on the config's data; with no TPU chip there is no roofline."""
  from conftest import tiny_overrides
  sets = [a for s in tiny_overrides(tfrecord_dir) for a in ("--set", s)]
  code, text, result = run_plan(tmp_path, "--config", QUICKSTART, "--topology", "local", "--run", "2",
                                "--no-eval", *sets)
  assert code == 0, text
  train = result["programs"]["train step"]
  assert result["chips"] == 8 and result["chip"] is None and "roofline" not in train
  assert result["compute_dtype"] == "float32"    # 'auto' on the CPU
  measured = train["measured"]
  assert measured["steps"] == 2 and measured["seconds_per_step"] > 0 and math.isfinite(measured["last_loss"])
  assert measured["images_per_s_per_chip"] == pytest.approx(24 / 8 / measured["seconds_per_step"])
  assert train["cost"]["flops"] > 0 and "measured" in text


def test_a_refused_program_prints_what_it_needs():
  from mtp_jax.plan import planner
  from mtp_jax.plan.__main__ import program_lines
  from mtp_jax.plan.programs import Compiled, Program
  refused = Compiled(Program("train step", None, (), 96, 0), 1.0, 2.0,
                     out_of_memory={"needed_bytes": 20 * GIB, "available_bytes": int(15.75 * GIB),
                                    "message": "Ran out of memory on HBM"})
  target = planner.Target("v5e-8", [], 1, chips.CHIPS["v5e"], int(15.75 * GIB), "v5e-8", "tpu")
  figures = planner.program_figures(refused, target, 8)
  assert figures["fits"] is False and figures["hbm"] == {"needed": 20 * GIB, "available": int(15.75 * GIB)}
  assert "DOES NOT FIT: needs 20.00 GiB per chip" in "\n".join(program_lines(figures))
