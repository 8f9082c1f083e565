"""The programs `python -m mtp_jax.plan` compiles: the training loop's own step and evaluation step
on the devices of a slice, from abstract state and batches (nothing is allocated), and the parts
of the model one at a time.

Everything comes from the code the loop runs: `loop.Trainer` (model, optimizer, shardings, the
jitted step with its state donated), `evaluate.jit_eval_step`, the data source's static example
shapes (`Source.device_shapes`). The slice's devices may belong to several hosts: the program is
compiled as the multi-process job would run it (the same global batch, split over every chip), and
the batch must split over the hosts as the loop requires.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from data_pipelines import sources
from mtp_jax import experiment, tasks as tasks_lib
from mtp_jax.ops import target
from mtp_jax.parallel import sharding
from mtp_jax.plan import estimate
from mtp_jax.train import batching, evaluate, loop


@dataclasses.dataclass
class Program:
  """A jitted function and the abstract arguments it is compiled for."""
  name: str
  jitted: object
  args: tuple
  images: int                # global images (change detection: image pairs) per run
  argument_bytes: int        # per device, before layout padding (a lower bound on the compiler's)


@dataclasses.dataclass
class Compiled:
  """A compiled program, or the compiler's refusal to fit it (`out_of_memory`)."""
  program: Program
  lower_seconds: float
  compile_seconds: float
  executable: object = None
  out_of_memory: dict | None = None


def _device_bytes(tree) -> int:
  """Bytes per device of a tree of sharded ShapeDtypeStructs (the largest shard of each)."""
  import math  # noqa: PLC0415
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(tree))


class Experiment:
  """A config's tasks, mesh and Trainer on `devices` (of `hosts` processes); evaluate: also check
  that the evaluation batch splits."""

  def __init__(self, config: ml_collections.ConfigDict, devices, hosts: int, evaluate: bool = True):
    self.config, self.hosts = config, hosts
    source = sources.source(config)
    self.tasks = experiment.tasks(config, source.known_class_names(config))
    self.mesh = sharding.config_mesh(config.mesh, devices, hosts)
    batching.check_batch_size("data.batch_per_subset", config.data.batch_per_subset, self.mesh,
                              config.optimizer.grad_accum_steps, processes=hosts)
    if evaluate:
      batching.check_batch_size("eval.batch_per_subset", config.eval.batch_per_subset, self.mesh,
                                processes=hosts)
    self.trainer = loop.Trainer(config, self.tasks, self.mesh)
    self.source = source

  @property
  def chips(self) -> int:
    return self.mesh.devices.size

  def train_program(self) -> Program:
    c = self.config
    state = self.trainer.abstract_sharded_state()
    batch = batching.abstract_batch(self.source.device_shapes(c, train=True), c.data.batch_per_subset,
                                    self.trainer.fields, sharding.batch_sharding(self.mesh))
    images = c.data.batch_per_subset * len(c.data.subsets)
    return Program("train step", self.trainer.step, (state, batch), images, _device_bytes((state, batch)))

  def eval_program(self) -> Program:
    c = self.config
    state = self.trainer.abstract_sharded_state()
    batch = batching.abstract_batch(self.source.device_shapes(c, train=False), c.eval.batch_per_subset,
                                    evaluate.eval_fields(c, self.tasks), sharding.batch_sharding(self.mesh))
    jitted = evaluate.jit_eval_step(c, self.trainer.graphdef, self.mesh, self.tasks)
    args = (state.params, state.batch_stats, batch)
    return Program("eval step", jitted, args, c.eval.batch_per_subset * len(c.data.subsets), _device_bytes(args))

  def encoder_program(self) -> Program:
    """The encoder alone, forward and backward (loss: the sum of squares of its maps), on the
    training batch's images, its parameters sharded as in the step."""
    c = self.config
    abstract = nnx.eval_shape(lambda: experiment.encoder(c, nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
                          sharding.tree_shardings(params, self.mesh, c.sharding_rules))
    shapes = self.source.device_shapes(c, train=True)
    image_shape, image_dtype = next(iter(shapes.values()))["image"]
    images = c.data.batch_per_subset * len(c.data.subsets)
    x = jax.ShapeDtypeStruct((images, *image_shape), image_dtype, sharding=sharding.batch_sharding(self.mesh))
    dtype = experiment.compute_dtype(c) or jnp.float32
    multi_scale = all(t.multi_scale for t in self.tasks.values())

    def loss(params, x):
      encoder = nnx.merge(graphdef, params)
      flat = x.reshape(-1, *x.shape[-3:]).astype(dtype)
      with jax.named_scope("encoder"):
        maps = encoder(flat, train=True, key=jax.random.key(0), multi_scale=multi_scale)
      return sum(jnp.sum(jnp.square(m.astype(jnp.float32))) for m in maps)

    jitted = jax.jit(sharding.traced_in_mesh(jax.value_and_grad(loss), self.mesh))
    args = (params, x)
    return Program("encoder", jitted, args, images, _device_bytes(args))


def single_task_config(config, task: str) -> ml_collections.ConfigDict:
  """`config` with only `task` enabled (the --parts programs)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for name in tasks_lib.enabled(config):
      c.tasks[name].enabled = name == task
  return c


def compile_program(program: Program, platform: str) -> Compiled:
  """Lowers `program` for `platform` ('tpu', 'gpu', 'cpu': the ops take that platform's form,
  `mtp_jax/ops/target.py`) and compiles it; an HBM refusal is returned in `out_of_memory`, any
  other compiler error is raised."""
  start = time.perf_counter()
  with target.compiling_for(platform):
    lowered = program.jitted.lower(*program.args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  try:
    with estimate.without_persistent_cache():
      executable = lowered.compile()
  except Exception as e:  # noqa: BLE001 (jax raises JaxRuntimeError; only an HBM refusal is ours)
    oom = estimate.out_of_memory(e)
    if oom is None:
      raise
    return Compiled(program, lower_s, time.perf_counter() - start, out_of_memory=oom)
  return Compiled(program, lower_s, time.perf_counter() - start, executable=executable)

