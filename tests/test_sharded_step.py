"""The train step on the 8-device CPU mesh: data parallel, FSDP and tensor parallel agree (the
full three-task ss + is + rd step too); FSDP really shards; gradient accumulation, the
non-finite guard, remat and bf16 behave as documented."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from data_pipelines import sources
from data_pipelines.samrs import examples as samrs_examples
from mtp_jax import experiment
from mtp_jax.parallel import sharding
from mtp_jax.train import batching, loop

from conftest import MTP_RUN, SAMRS_CLASSES, tiny_config

SUBSETS = ("sota", "sior", "fast")
CLASSES = {"sota": 18, "sior": 20, "fast": 37}


def fixed_batches(config, n):
  """n host batches from the training reader (the same ones for every run that asks)."""
  batches = samrs_examples.train_batches(
      config.data.dir, SUBSETS, image_size=config.data.image_size,
      max_instances=dict(config.data.max_instances), batch_size=config.data.batch_per_subset,
      seed=config.seed, shuffle_window=config.data.shuffle_window)
  out = [next(batches) for _ in range(n)]
  batches.close()
  return out


_TRAINERS = {}


def trainer_for(config):
  """The Trainer of `config`, built (and its step compiled) once per module: tests that need the
  same program share one jitted step instead of tracing and compiling it again."""
  key = config.to_json_best_effort()
  if key not in _TRAINERS:
    mesh = sharding.make_mesh(config.mesh.shape)
    _TRAINERS[key] = loop.Trainer(config, experiment.tasks(config, SAMRS_CLASSES), mesh)
  return _TRAINERS[key]


def run(config, raw_batches, edit=None):
  """(final state, per-step metrics) of the configured step over `raw_batches`, from a fresh
  initial state (`edit(state)` may change it first)."""
  trainer = trainer_for(config)
  state = trainer.init()
  if edit is not None:
    edit(state)
  metrics = []
  for raw in raw_batches:
    state, m = trainer.step(state, batching.device_batch(raw, SUBSETS, trainer.mesh, trainer.fields))
    metrics.append(jax.device_get(m))
  return state, metrics


def host_params(state):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state.params)}


def max_abs_diff(a, b, skip=()):
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a if k not in skip)


# The biases of the ConvTransposes that feed UperNet's BatchNorm-ed lateral convs: BatchNorm
# cancels any constant shift, so their exact gradient is 0 and AdamW's first steps move them by
# +-lr on the sign of float rounding noise. Every other parameter has a real gradient.
NO_GRADIENT = {"['encoder']['fpn1'][3]['bias'].value", "['encoder']['fpn2'][0]['bias'].value"}


@pytest.fixture(scope="module")
def five_batches(tfrecord_dir):
  return fixed_batches(tiny_config(tfrecord_dir), 5)


# The layout comparisons use the plain ViT encoder: RVSA's bilinear sampling has gradients that
# jump where a sample crosses a pixel, so the last-bit differences of another layout's reductions
# send a trajectory across such a jump in some runs and not others (measured with RVSA and
# tensor parallelism: parameters up to 6e-3 apart after 5 steps while the losses agree to 4e-6,
# the same before and after the task protocol).
LAYOUT = {"model.encoder": "vit_t"}


@pytest.fixture(scope="module")
def data_parallel(tfrecord_dir, five_batches):
  return run(tiny_config(tfrecord_dir, **LAYOUT, **{"mesh.shape": (8, 1, 1)}), five_batches)


# Losses agree to rtol 1e-5. Parameters after 5 AdamW steps at lr 1e-2 (NO_GRADIENT aside): the
# layouts differ only in the order of float32 reductions (all-reduce vs reduce-scatter, partial
# sums of sharded matmuls), which AdamW's ~lr * sign(g) first steps magnify where gradients are
# tiny. FSDP: max |difference| < 1e-4 (measured 6.8e-5). FSDP + tensor (partial sums inside every
# qkv/MLP matmul): mean < 5e-5 (measured 1.3e-5), max < 2.5e-3 (measured 1.1e-3, in the fpn1
# ConvTranspose kernels), 5% of the 5 x lr a parameter can move in 5 steps.
@pytest.mark.parametrize("mesh_shape, max_tol", [((1, 8, 1), 1e-4), ((1, 4, 2), 2.5e-3)],
                         ids=["fsdp", "fsdp+tensor"])
def test_sharded_steps_equal_data_parallel(mesh_shape, max_tol, tfrecord_dir, five_batches, data_parallel):
  dp_state, dp_metrics = data_parallel
  state, metrics = run(tiny_config(tfrecord_dir, **LAYOUT, **{"mesh.shape": mesh_shape}), five_batches)
  a, b = host_params(state), host_params(dp_state)
  diff = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a if k not in NO_GRADIENT])
  assert diff.max() < max_tol and diff.mean() < 5e-5, (diff.max(), diff.mean())
  np.testing.assert_allclose([m["loss"] for m in metrics], [m["loss"] for m in dp_metrics], rtol=1e-5)
  # Parameters and optimizer state really are split: FSDP over 8 holds about an eighth per
  # device; with (fsdp 4, tensor 2) the matrices are split 8 ways, the UperNet convs (output
  # channels only) and vectors 4 ways.
  dp_bytes = sharding.bytes_per_device((dp_state.params, dp_state.opt_state))
  fsdp_bytes = sharding.bytes_per_device((state.params, state.opt_state))
  assert dp_bytes / 8 <= fsdp_bytes < 1.25 * dp_bytes / mesh_shape[1], (dp_bytes, fsdp_bytes)
  qkv = state.params["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec == (P("fsdp", "tensor") if mesh_shape[2] > 1 else P("fsdp", None))


def test_three_task_step_compiles_once_and_fsdp_equals_data_parallel(mtp_run, tfrecord_dir):
  """The full pretraining step (ss + is + rd; the shared tiny run: 3 steps, data parallel on the
  8-device mesh) again with FSDP over the 8 devices, from the same initial state on the same
  batches: losses per step and component agree and the parameters after 3 AdamW steps at lr
  1e-2 (float32 reduction order; the RoI sampling sees the same proposals only up to that
  rounding; tolerances below, measured figures printed), one compiled program for the three
  steps. The NMS loops run per device (`sharding.vmap_batch_shards`): vmapped over a sharded
  batch they would all-reduce on every iteration, which deadlocked XLA:CPU here."""
  from mtp_jax.checkpoints.manager import read_checkpoint
  workdir, _ = mtp_run
  config = tiny_config(tfrecord_dir, **{**MTP_RUN, "mesh.shape": (1, 8, 1)})
  tasks = experiment.tasks(config)
  trainer = loop.Trainer(config, tasks, sharding.config_mesh(config.mesh))
  batches = sources.source(config).train_batches(config, tasks, config.data.batch_per_subset)
  state = loop.fresh_state(config, trainer)
  metrics = []
  for _ in range(3):
    state, m = trainer.step(state, batching.device_batch(next(batches), SUBSETS, trainer.mesh, trainer.fields))
    metrics.append(jax.device_get(m))
  batches.close()
  assert trainer.step._cache_size() == 1
  rows = [r for r in map(json.loads, open(f"{workdir}/metrics.jsonl")) if "loss" in r]
  components = [k for k in rows[0] if k.split("/")[0] in ("ss", "is", "rd")]
  assert {k.split("/")[0] for k in components} == {"ss", "is", "rd"}
  got_loss, want_loss = [float(m["loss"]) for m in metrics], [r["loss"] for r in rows]
  got_parts = np.array([[float(m[k]) for k in components] for m in metrics])
  want_parts = np.array([[r[k] for k in components] for r in rows])
  part_rel = np.abs(got_parts - want_parts) / np.maximum(np.abs(want_parts), 1e-3)
  dp, _, _, _ = read_checkpoint(workdir, 3)
  norm = lambda k: k.replace(".value", "").replace("'", "")   # "['blocks'][0]" == "['blocks']['0']"
  want = {norm(jax.tree_util.keystr(p)): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(dp)}
  got = {norm(k): v for k, v in host_params(state).items()}
  assert set(got) == set(want)
  diff = np.concatenate([np.abs(got[k] - want[k]).ravel() for k in want])
  measured = (f"loss rel {np.max(np.abs(np.subtract(got_loss, want_loss)) / np.abs(want_loss)):.2e}, "
              f"component rel max {part_rel.max():.2e}, params max {diff.max():.2e} mean {diff.mean():.2e}")
  print("FSDP vs DP, three tasks:", measured)
  # Measured: loss 1.1e-5, components 2.9e-4, parameters mean 1.8e-6 (max 3.6e-3: AdamW's
  # sign-like first steps where a gradient is ~0).
  np.testing.assert_allclose(got_loss, want_loss, rtol=2e-4, err_msg=measured)
  assert part_rel.max() < 5e-3 and diff.mean() < 5e-5, measured
  qkv = state.params["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec == P("fsdp", None)


def test_rules_leave_whole_what_does_not_divide():
  mesh = sharding.make_mesh((1, 4, 2))
  rules = (("embed", "fsdp"), ("mlp", "tensor"), ("conv_out", "fsdp"))
  assert sharding.logical_to_mesh(P("embed", "mlp"), rules, mesh, (48, 96)) == P("fsdp", "tensor")
  assert sharding.logical_to_mesh(P("embed", "mlp"), rules, mesh, (48, 19)) == P("fsdp", None)
  assert sharding.logical_to_mesh(P(None, "conv_out"), rules, mesh, (3, 19)) == P(None, None)
  assert sharding.logical_to_mesh(P("embed", "conv_out"), rules, mesh, (8, 8)) == P("fsdp", None)
  assert sharding.logical_to_mesh(P("embed", "mlp"), rules, sharding.make_mesh((8, 1, 1))) == P(None, None)


def gradients(state):
  """The first step's gradient, read from AdamW's first moment (mu = (1 - b1) g after one step)."""
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")
  return {jax.tree_util.keystr(p): np.asarray(v) / 0.1 for p, v in jax.tree_util.tree_leaves_with_path(mu)}


def test_gradient_accumulation_equals_one_step_on_the_whole_batch(tfrecord_dir):
  # GroupNorm and no dropout: nothing couples the images of a batch, so k micro-batches whose
  # losses are normalised by the whole batch's pixel counts give the whole batch's gradient. The
  # gradients are compared directly (lr 0): AdamW's first update, ~lr * sign(g), would magnify
  # float noise in tiny gradients into +-lr differences. Tolerance: relative error of each
  # parameter's gradient (as a vector) < 1e-4; measured 2.5e-6. The encoder is the plain ViT:
  # RVSA's bilinear sampling has gradients that jump where a sample crosses a pixel, so the
  # other kernel shapes of a micro-batch (last-bit differences) move them by ~1e-3 there.
  kw = {"mesh.shape": (8, 1, 1), "data.batch_per_subset": 16, "tasks.ss.norm": "group",
        "model.encoder": "vit_t", "tasks.ss.dropout": 0.0, "model.drop_path_rate": 0.0,
        "optimizer.lr": 0.0}
  batch = fixed_batches(tiny_config(tfrecord_dir, **kw), 1)
  whole, whole_metrics = run(tiny_config(tfrecord_dir, **kw), batch)
  accumulated, acc_metrics = run(tiny_config(tfrecord_dir, **kw, **{"optimizer.grad_accum_steps": 2}), batch)
  np.testing.assert_allclose(acc_metrics[0]["loss"], whole_metrics[0]["loss"], rtol=1e-6)
  np.testing.assert_allclose(acc_metrics[0]["grad_norm"], whole_metrics[0]["grad_norm"], rtol=1e-5)
  g_whole, g_acc = gradients(whole), gradients(accumulated)
  errors = {k: np.linalg.norm(g_acc[k] - g_whole[k]) / np.linalg.norm(g_whole[k])
            for k in g_whole if k not in NO_GRADIENT and np.any(g_whole[k])}   # encoder.norm is unused
  assert max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
  # And it is not trivially so: one micro-batch alone has another gradient. The first half of
  # the batch twice over has exactly that half's gradient (losses are means over the batch and
  # GroupNorm sees one image at a time), and runs through the whole-batch step already compiled.
  first_half_twice = [{s: {k: np.concatenate([v[:8], v[:8]]) for k, v in batch[0][s].items()} for s in SUBSETS}]
  _, half_metrics = run(tiny_config(tfrecord_dir, **kw), first_half_twice)
  assert abs(half_metrics[0]["grad_norm"] - whole_metrics[0]["grad_norm"]) > 1e-2 * whole_metrics[0]["grad_norm"]


def poison_sota_logits(state):
  """Sets one sota class's conv_seg bias to inf: the sota logits become inf - inf = NaN."""
  bias = state.params["heads"]["ss"]["semseghead"]["sota"]["conv_seg"]["bias"]
  bias[...] = bias[...].at[0].set(jnp.inf)


# The non-finite guard and remat are checked on the layout tests' data-parallel program, and the
# unguarded counterfactual on the remat program with the guard off (guard and remat do not
# change a finite step): two programs fewer to compile than one per check.
REMAT_UNGUARDED = {**LAYOUT, "model.remat": True, "optimizer.skip_nonfinite": False}


def test_nonfinite_step_is_skipped_and_counted(tfrecord_dir, five_batches):
  config = tiny_config(tfrecord_dir, **LAYOUT, **{"mesh.shape": (8, 1, 1)})
  trainer = trainer_for(config)
  state = trainer.init()
  poison_sota_logits(state)
  before = jax.device_get((state.params, state.opt_state, state.batch_stats))
  state, metrics = trainer.step(state, batching.device_batch(five_batches[0], SUBSETS, trainer.mesh, trainer.fields))
  assert not np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 1 and int(state.nonfinite_steps) == 1 and int(metrics["nonfinite_steps"]) == 1
  after = jax.device_get((state.params, state.opt_state, state.batch_stats))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  # Without the guard the same step writes NaN into the parameters.
  state, _ = run(tiny_config(tfrecord_dir, **REMAT_UNGUARDED), five_batches[:1], edit=poison_sota_logits)
  assert np.isnan(np.asarray(state.params["encoder"]["pos_embed"][...])).any()


def test_remat_is_the_same_step_and_bf16_keeps_float32_parameters(tfrecord_dir, five_batches, data_parallel):
  dp_state, dp_metrics = data_parallel
  remat, remat_metrics = run(tiny_config(tfrecord_dir, **REMAT_UNGUARDED), five_batches[:2])
  np.testing.assert_allclose([m["loss"] for m in remat_metrics], [m["loss"] for m in dp_metrics[:2]], rtol=1e-6)
  bf16, bf16_metrics = run(tiny_config(tfrecord_dir, **LAYOUT, **{"model.compute_dtype": "bfloat16"}),
                           five_batches[:2])
  assert {v.dtype for v in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.float32)}
  # bf16 activations: the first loss (same initial parameters) within 2% of float32's.
  np.testing.assert_allclose(bf16_metrics[0]["loss"], dp_metrics[0]["loss"], rtol=2e-2)
  assert bf16_metrics[0]["loss"] != dp_metrics[0]["loss"]


def test_vmap_batch_shards_runs_nms_loops_per_device_without_collectives():
  """Batched NMS over a batch split 8 ways: the per-device vmap gives exactly the plain vmap's
  indices, and its compiled program has no collective (a plain vmap over the sharded batch
  all-reduces the loops' "any row still running" on every iteration); a batch that does not
  divide falls back to the plain vmap."""
  from mtp_jax.ops import nms
  mesh = sharding.make_mesh((4, 2, 1))
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 60, (16, 300, 2))
  boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(4, 20, (16, 300, 2))], -1), jnp.float32)
  scores = jnp.asarray(rng.uniform(size=(16, 300)), jnp.float32)
  one = lambda b, s: nms(b, s, 0.5, 50, tile_size=64)[0]
  fn = sharding.traced_in_mesh(lambda b, s: sharding.vmap_batch_shards(one)(b, s), mesh)
  spread = jax.jit(fn, in_shardings=sharding.batch_sharding(mesh))
  plain = jax.jit(jax.vmap(one), in_shardings=sharding.batch_sharding(mesh))
  np.testing.assert_array_equal(spread(boxes, scores), plain(boxes, scores))
  hlo = lambda f, *a: f.lower(*a).compile().as_text()
  assert "all-reduce" not in hlo(spread, boxes, scores)
  assert "all-reduce" in hlo(plain, boxes, scores)   # what the per-device form avoids
  odd = jax.jit(fn)(boxes[:12], scores[:12])          # 12 rows over 8 shards: plain vmap
  np.testing.assert_array_equal(odd, jax.vmap(one)(boxes[:12], scores[:12]))
