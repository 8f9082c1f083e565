"""A trained run's model, predicting batches of tiles on the local devices.

    predictor = Predictor.from_workdir("workdirs/loveda", step=None, subset=None)
    outputs = predictor(tiles)   # tiles (n, S, S, C) or, change detection, (n, 2, S, S, C) pixels
                                 # -> {task: per-tile outputs of Task.prediction's kind} (numpy)

The run's config comes from its checkpoint (saved with every step), so a workdir alone is
enough: no data folder is needed (class names are the dataset's own lists). Tiles are padded to
a static batch (`batch`, a multiple of the local device count) and split over the local devices;
params are replicated. A pretraining model has one predictor per SAMRS subset: `subset` picks
whose classes (and predictor weights) answer, the first of data.subsets by default.
"""

import copy
import json

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtp_jax.errors import CheckpointError, ConfigError


def _tuples(value):
  """JSON lists back to the tuples the configs hold."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def config_from_meta(meta: dict, where: str) -> ml_collections.ConfigDict:
  text = meta.get("config")
  if not text:
    raise CheckpointError(f"{where}: the checkpoint holds no config (written by an older version)")
  return ml_collections.ConfigDict(_tuples(json.loads(text)))


class Predictor:
  """The model of `config` with `params` / `batch_stats` (nested dicts of arrays, as read from a
  checkpoint), predicting the enabled tasks that have a `prediction` kind for one subset."""

  def __init__(self, config, params, batch_stats, *, subset: str | None = None, batch: int = 0,
               tasks=None):
    from data_pipelines import sources  # noqa: PLC0415
    from mtp_jax import experiment  # noqa: PLC0415
    self.config = config
    subsets = tuple(config.data.subsets)
    self.subset = subset or subsets[0]
    if self.subset not in subsets:
      raise ConfigError(f"--subset {self.subset!r}: the model was trained on {list(subsets)}")
    names = sources.source(config).known_class_names(config)
    model_tasks = experiment.tasks(config, names)
    # The heads answer for one subset: tasks built over that subset alone pass its name (and one
    # interleaved group) to the heads, whose per-subset predictors are looked up by name.
    one = copy.deepcopy(config)
    with one.unlocked():
      one.data.subsets = (self.subset,)
    wanted = tasks or tuple(n for n, t in model_tasks.items() if t.prediction)
    unknown = [n for n in wanted if n not in model_tasks]
    if unknown:
      raise ConfigError(f"--tasks {unknown}: the model's tasks are {list(model_tasks)}")
    self.tasks = {n: t for n, t in experiment.tasks(one, names).items()
                  if n in wanted}
    self.size = int(config.data.image_size)
    self.channels = len(config.data.mean)
    self.bands = tuple(config.data.bands) if "bands" in config.data else ()

    abstract = nnx.eval_shape(lambda: experiment.model(config, model_tasks, nnx.Rngs(0)))
    graphdef, p_state, b_state = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    try:
      nnx.replace_by_pure_dict(p_state, params)
      if batch_stats:
        nnx.replace_by_pure_dict(b_state, batch_stats)
    except (KeyError, ValueError) as e:
      raise CheckpointError(f"the checkpoint's parameters do not fit the model of its config ({e})") from None

    devices = jax.local_devices()
    self.batch = batch or len(devices)
    if self.batch % len(devices):
      raise ConfigError(f"--batch {self.batch} is not a multiple of the {len(devices)} local devices")
    mesh = Mesh(np.asarray(devices), ("data",))
    self._tiles_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    self._state = jax.device_put((p_state, b_state), replicated)
    size, chosen = (self.size, self.size), self.subset
    predict_tasks = self.tasks

    def predict(state, tiles):
      model = nnx.merge(graphdef, *state)
      features = model.features(tiles, train=False)
      return {n: t.predict_outputs(model.heads[n], features, size)[chosen] for n, t in predict_tasks.items()}

    self._predict = jax.jit(predict, out_shardings=replicated)

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, **kwargs) -> "Predictor":
    """The model of the latest (or `step`'s) checkpoint of a training run's workdir."""
    from mtp_jax.checkpoints.manager import read_checkpoint  # noqa: PLC0415
    params, batch_stats, meta, step = read_checkpoint(workdir, step)
    predictor = cls(config_from_meta(meta, workdir), params, batch_stats, **kwargs)
    predictor.step = step
    return predictor

  step = None

  @property
  def multi_date(self) -> bool:
    """Whether a tile is several dates of one place (a task that takes more than one, `Task.dates`)."""
    return any(t.dates > 1 for t in self.tasks.values())

  def class_names(self, task: str) -> list:
    return self.tasks[task].output_names(self.subset)

  def __call__(self, tiles: np.ndarray) -> dict:
    """tiles (n <= batch, [T,] S, S, C) pixels -> {task: outputs} with n rows, numpy."""
    n = len(tiles)
    if n > self.batch:
      raise ValueError(f"{n} tiles in one call; the batch is {self.batch}")
    padded = np.zeros((self.batch, *tiles.shape[1:]), np.float32)
    padded[:n] = tiles
    out = self._predict(self._state, jax.device_put(padded, self._tiles_sharding))
    return jax.tree.map(lambda a: np.asarray(a)[:n], out)
