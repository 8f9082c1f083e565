"""A config turned into what it describes: its tasks over its data source, and its model.

    from mtp_jax import experiment
    tasks = experiment.tasks(config)                        # {name: Task} of the enabled tasks
    model = experiment.model(config, tasks, nnx.Rngs(0))    # encoder + every task's head
    dtype = experiment.compute_dtype(config)                # the activations' dtype

The data source is `data_pipelines.sources.source(config)` (picked by data.dataset): `tasks`
asks it for the class lists, and the loop and the evaluation read their batches from it. The
training loop (mtp_jax/train/), prediction, the planner, the benchmarks and the tests build from
here, so none of them imports the training loop for a model. It imports no training code.
"""

import jax
from flax import nnx

from data_pipelines import sources
from mtp_jax import models, tasks as tasks_lib
from mtp_jax.models.multitask import MultiTaskModel
from mtp_jax.ops import target

DTYPES = {"float32": None, "bfloat16": jax.numpy.bfloat16, "float16": jax.numpy.float16}


def compute_dtype_name(config) -> str:
  """config.model.compute_dtype with 'auto' resolved for the platform the program is traced for
  (`mtp_jax/ops/target.py`): 'float32' on the CPU, 'bfloat16' on TPUs and GPUs."""
  name = config.model.compute_dtype
  if name == "auto":
    return target.by_platform(cpu="float32", accelerator="bfloat16")
  return name


def compute_dtype(config):
  """The activations' dtype of config (None: float32, the parameters' own)."""
  return DTYPES[compute_dtype_name(config)]


def tasks(config, class_names: dict | None = None) -> dict:
  """{name: Task} of the enabled tasks over the subsets of config.data, in the order the batch
  interleaves them. class_names {subset: [names]} default to those of the converted data
  (the source checks them against the dataset's own lists); pass
  `sources.source(config).known_class_names(config)` to build without reading data."""
  names = class_names if class_names is not None else sources.source(config).class_names(config)
  return tasks_lib.build_tasks(config, {s: names[s] for s in config.data.subsets})


def encoder(config, rngs: nnx.Rngs):
  """The encoder of config.model, with as many input bands as data.mean has."""
  return models.build_encoder(
      config.model.encoder, config.data.image_size, rngs=rngs, dtype=compute_dtype(config),
      drop_path_rate=config.model.drop_path_rate, remat=config.model.remat,
      scan_blocks=config.model.scan_blocks, in_chans=len(config.data.mean),
      **dict(config.model.encoder_overrides))


def model(config, tasks: dict, rngs: nnx.Rngs) -> MultiTaskModel:
  """The encoder of config.model and the head of every task in `tasks` ({name: Task})."""
  return MultiTaskModel(encoder(config, rngs), tasks, dtype=compute_dtype(config), rngs=rngs,
                        mean=tuple(config.data.mean), std=tuple(config.data.std),
                        freeze_encoder=config.model.freeze_encoder)
