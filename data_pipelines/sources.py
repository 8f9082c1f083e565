"""Data sources of the experiments, picked by `config.data.dataset` (DESIGN.md §3.2).

A source knows a dataset's class lists, its training batch stream and its evaluation batches;
the loop, the Trainer and the evaluation ask it and name no dataset. Every source reads the same
folder layout (`<data.dir>/<subset>/<split>/` shards + dataset_info.json) with the same grain
reader (records/reader.py `make_dataset`, records/batches.py `TrainBatches`), and differs in the
record parser:

  samrs                 pretraining: subsets sota/sior/fast, the SAMRS example (samrs/examples.py)
  eurosat[_ms], resisc45 scene classification: one subset named as the dataset
                        (downstream/classification.py)
  spacenet1, loveda     semantic segmentation (the `ss` task; downstream/segmentation.py)
  levir_cd, whu_cd, cdd, oscd  change detection (the `cd` task; downstream/change.py)
  dota_v1, dota_v2, dior_r, fair1m  rotated detection (the `rd` task; downstream/detection.py),
                        DOTA and FAIR1M as patches of their large images
  dior, xview           horizontal detection (the `hd` task; downstream/detection.py), xView as
                        MTP's 416-px patches
"""

import functools

import jax
import numpy as np

from data_pipelines import augment
from data_pipelines.downstream import (change, change_releases, classification, detection, detection_releases,
                                       scene_folders, segmentation, segmentation_releases)
from data_pipelines.records import reader, shards
from data_pipelines.records.batches import TrainBatches
from data_pipelines.samrs import examples as samrs_examples
from data_pipelines.samrs.classes import subset as samrs_subset
from mtp_jax.errors import DataError
from mtp_jax.tasks import (ChangeDetection, Classification, HorizontalDetection, InstanceSegmentation,
                           RotatedDetection, SemanticSegmentation, needs_masks)


def _reader_streams(config):
  n, p = config.data.num_streams or jax.process_count(), jax.process_count()
  if n % p:
    from mtp_jax.errors import ConfigError  # noqa: PLC0415
    raise ConfigError(f"data.num_streams = {n} must be a multiple of the {p} processes")
  per = n // p
  return tuple(range(jax.process_index() * per, (jax.process_index() + 1) * per)), n


class Source:
  """What the loop needs from a dataset. subsets: config.data.subsets; tasks: the tasks it serves."""

  tasks = ()
  pretraining = False   # True: the pretraining data (its runs start from MAE or from scratch)

  def class_names(self, config) -> dict:
    """{subset: object class names}, checked against the converted data."""
    raise NotImplementedError

  def known_class_names(self, config) -> dict:
    """{subset: object class names} the dataset defines, without reading any data (prediction)."""
    raise NotImplementedError

  def eval_dataset(self, config, subset: str, tasks, batch_size: int, split: str):
    """This process's evaluation batches of `split`."""
    raise NotImplementedError

  def train_parsers(self, config, tasks) -> dict:
    """{subset: parse(raw, rng)} of the training records, for `TrainBatches`."""
    raise NotImplementedError

  def padding_batch(self, config, subset: str, tasks, batch_size: int) -> dict:
    """A batch of `is_real=False` examples shaped like the evaluation batches, all zero."""
    raise NotImplementedError

  def device_shapes(self, config, train: bool) -> dict:
    """{subset: {field: (shape, numpy dtype)}} of the static examples of the training (train) or
    evaluation batches, from the config alone, without reading data (python -m mtp_jax.plan
    compiles on them). Instance fields are sized at data.max_instances: evaluation packs every
    object of the split, but no task reads instances on the device when it evaluates."""
    raise NotImplementedError

  bands = 3   # input bands of the converted images

  def check_bands(self, config, data_options: dict):
    """ConfigError unless data.bands picks existing bands and data.mean has one entry per band,
    and the task-specific data settings are 0 where none of the dataset's tasks uses them.

    data_options: {task: {data key: what it does}}, what the tasks declare (`Task.data_options`,
    given by the caller: the data pipelines know no task); a key that none of `self.tasks`
    declares must be 0 (data.rand_augment where the dataset has no scene classification ...)."""
    from mtp_jax.errors import ConfigError  # noqa: PLC0415
    picked = tuple(config.data.bands) or tuple(range(self.bands))
    if max(picked) >= self.bands or min(picked) < 0:
      raise ConfigError(f"data.bands {tuple(config.data.bands)}: {config.data.dataset} images have "
                        f"{self.bands} bands (0-{self.bands - 1})")
    served = {key for task in self.tasks for key in data_options.get(task, {})}
    for options in data_options.values():
      for key, what in options.items():
        if config.data[key] and key not in served:
          raise ConfigError(f"data.{key} = {config.data[key]} {what}; {config.data.dataset} has none "
                            "(leave it 0)")
    if len(config.data.mean) != len(picked):
      raise ConfigError(f"data.mean has {len(config.data.mean)} entries for the {len(picked)} bands "
                        f"the model sees ({config.data.dataset}: {self.bands} bands"
                        + (f", data.bands {tuple(config.data.bands)})" if config.data.bands else ")"))

  def reader_streams(self, config):
    """(this process's stream indices, total streams): data.num_streams, or one per process."""
    return _reader_streams(config)

  def train_batches(self, config, tasks, local_batch: int) -> TrainBatches:
    streams, num_streams = self.reader_streams(config)
    return TrainBatches(
        config.data.dir, tuple(config.data.subsets), parse=self.train_parsers(config, tasks),
        batch_size=local_batch, seed=config.seed, streams=streams, num_streams=num_streams,
        shuffle_window=config.data.shuffle_window, max_corrupt_fraction=config.data.max_corrupt_fraction,
        num_workers=config.data.num_workers)


class SamrsSource(Source):
  tasks = (SemanticSegmentation.name, InstanceSegmentation.name, RotatedDetection.name)
  pretraining = True

  def known_class_names(self, config):
    return {s: list(samrs_subset(s).classes) for s in config.data.subsets}

  def class_names(self, config):
    out = {}
    for s in config.data.subsets:
      info = shards.load_info(config.data.dir, s, "train")
      expected = list(samrs_subset(s).classes)
      if info.get("class_names") != expected:
        raise DataError(f"{config.data.dir}/{s}/train holds classes {info.get('class_names')}, "
                        f"not the {len(expected)} {s} classes")
      out[s] = expected
    return out

  def train_parsers(self, config, tasks):
    augment_config = augment.AugmentConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                              for k, v in config.data.augment.items()})
    max_instances = dict(config.data.max_instances)
    return {s: samrs_examples.parser(config.data.image_size, max_instances.get(s, 0), augment_config,
                                     needs_masks(tasks))
            for s in config.data.subsets}

  def eval_max_instances(self, config, subset):
    return shards.eval_max_instances(config.data.dir, subset)

  def device_shapes(self, config, train):
    return {s: samrs_examples.example_shapes(config.data.image_size, config.data.max_instances[s])
            for s in config.data.subsets}

  def eval_dataset(self, config, subset, tasks, batch_size, split):
    return samrs_examples.make_dataset(
        config.data.dir, subset, split, image_size=config.data.image_size,
        max_instances=self.eval_max_instances(config, subset), batch_size=batch_size, train=False,
        process_index=jax.process_index(), process_count=jax.process_count(),
        with_masks=needs_masks(tasks), max_corrupt_fraction=config.data.max_corrupt_fraction)

  def padding_batch(self, config, subset, tasks, batch_size):
    m = self.eval_max_instances(config, subset)
    shapes = samrs_examples.example_shapes(config.data.image_size, m)
    out = {k: np.zeros((batch_size, *shape), dtype) for k, (shape, dtype) in shapes.items()}
    out["semantic"][:] = 255   # padding label, ignored
    out["image_id"] = np.full((batch_size,), "", dtype=np.str_)
    if needs_masks(tasks):
      out["mask_rles"] = np.full((batch_size, m), "", dtype=object)
    else:
      out.pop("mask_crops", None)
    return out


class ReleaseSource(Source):
  """A finetuning release converted by `python -m data_pipelines.convert <name>`: one subset
  named as the dataset, the release's class list; subclasses give the parser and the shapes."""

  def __init__(self, release):
    self.release = release
    self.bands = getattr(release, "bands", 3)

  def known_class_names(self, config):
    (subset,) = config.data.subsets
    return {subset: list(self.release.classes)}

  def class_names(self, config):
    (subset,) = config.data.subsets
    info = shards.load_info(config.data.dir, subset, "train")
    if info.get("class_names") != list(self.release.classes):
      raise DataError(f"{config.data.dir}/{subset}/train holds classes {info.get('class_names')}, "
                      f"not the {self.release.name} classes {list(self.release.classes)}")
    return {subset: list(self.release.classes)}

  def _parse(self, config):
    """parse(raw, rng) -> static example of this release's task."""
    raise NotImplementedError

  def example_shapes(self, config, train: bool = False, max_instances: int | None = None) -> dict:
    """{field: (shape, dtype)} of the examples (evaluation's unless train; detection packs
    `max_instances` objects, default every object of the evaluated split)."""
    raise NotImplementedError

  def device_shapes(self, config, train):
    return {s: self.example_shapes(config, train, config.data.max_instances.get(s)) for s in config.data.subsets}

  def train_parsers(self, config, tasks):
    return {s: self._parse(config) for s in config.data.subsets}

  def eval_dataset(self, config, subset, tasks, batch_size, split):
    return reader.make_dataset(
        config.data.dir, subset, split, batch_size=batch_size, train=False, process_index=jax.process_index(),
        process_count=jax.process_count(), max_corrupt_fraction=config.data.max_corrupt_fraction,
        parse=self._parse(config))

  def padding_batch(self, config, subset, tasks, batch_size):
    out = {k: np.zeros((batch_size, *shape), dtype) for k, (shape, dtype) in self.example_shapes(config).items()}
    if "semantic" in out:
      out["semantic"][:] = 255   # ignored
    out["image_id"] = np.full((batch_size,), "", dtype=np.str_)
    return out


class SceneSource(ReleaseSource):
  """Scene classification (the `cls` task)."""

  tasks = (Classification.name,)

  def _parse(self, config):
    bands = tuple(config.data.bands) if config.data.bands else None
    return functools.partial(classification.to_example, image_size=config.data.image_size,
                             mean=tuple(config.data.mean), std=tuple(config.data.std), bands=bands,
                             dtype=self.release.pixel_dtype, rand_augment=config.data.rand_augment)

  def check_bands(self, config, data_options):
    super().check_bands(config, data_options)
    if config.data.rand_augment and (self.release.pixel_dtype != "uint8" or len(config.data.mean) != 3):
      from mtp_jax.errors import ConfigError  # noqa: PLC0415
      raise ConfigError(f"data.rand_augment = {config.data.rand_augment}: RandAugment's ops are defined on "
                        f"8-bit RGB, and {config.data.dataset} gives {len(config.data.mean)} "
                        f"{self.release.pixel_dtype} bands (set data.rand_augment=0)")

  def example_shapes(self, config, train=False, max_instances=None):
    return classification.example_shapes(config.data.image_size, len(config.data.mean),
                                         self.release.pixel_dtype)


class SegmentationSource(ReleaseSource):
  """Semantic segmentation: the `ss` task with the release's object classes (background is
  output 0, as in pretraining), evaluated on a canvas of eval.image_size px."""

  tasks = (SemanticSegmentation.name,)

  @staticmethod
  def eval_size(config) -> int:
    return config.eval.image_size or config.data.image_size

  def _parse(self, config):
    return functools.partial(segmentation.to_example, image_size=config.data.image_size,
                             eval_size=self.eval_size(config))

  def example_shapes(self, config, train=False, max_instances=None):
    return segmentation.example_shapes(config.data.image_size if train else self.eval_size(config))


class ChangeSource(ReleaseSource):
  """Change detection (the `cd` task): image pairs."""

  tasks = (ChangeDetection.name,)

  def _parse(self, config):
    bands = tuple(config.data.bands) if config.data.bands else None
    return functools.partial(change.to_example, image_size=config.data.image_size, bands=bands,
                             dtype=self.release.pixel_dtype, resize_to=config.data.resize,
                             label_size=config.eval.label_size)

  def example_shapes(self, config, train=False, max_instances=None):
    return change.example_shapes(config.data.image_size, len(config.data.mean), self.release.pixel_dtype,
                                 0 if train else config.eval.label_size)


class DetectionSource(ReleaseSource):
  """Rotated (`rd`) or horizontal (`hd`) detection on whole images or on the patches of large
  ones. Training packs data.max_instances[dataset] objects per image; evaluation every object of
  the split."""

  def __init__(self, release, tasks=(RotatedDetection.name,), rect_classes=(), flips=augment.FLIPS):
    super().__init__(release)
    self.tasks = tuple(tasks)
    self.rect_classes = tuple(rect_classes)   # RandomRotate turns these images by multiples of 90
    self.flips = tuple(flips)

  def eval_max_instances(self, config, subset):
    return shards.eval_max_instances(config.data.dir, subset, config.eval.split)

  def _parse(self, config, max_instances=None):
    (subset,) = config.data.subsets
    return functools.partial(
        detection.to_example, image_size=config.data.image_size,
        max_instances=max_instances or config.data.max_instances[subset],
        flip_prob=config.data.augment.flip_prob, rotate_prob=config.data.rotate_prob,
        rect_classes=self.rect_classes, flips=self.flips)

  def eval_dataset(self, config, subset, tasks, batch_size, split):
    return reader.make_dataset(
        config.data.dir, subset, split, batch_size=batch_size, train=False, process_index=jax.process_index(),
        process_count=jax.process_count(), max_corrupt_fraction=config.data.max_corrupt_fraction,
        parse=self._parse(config, shards.eval_max_instances(config.data.dir, subset, split)))

  def example_shapes(self, config, train=False, max_instances=None):
    (subset,) = config.data.subsets
    return detection.example_shapes(config.data.image_size,
                                    max_instances or self.eval_max_instances(config, subset))

  def padding_batch(self, config, subset, tasks, batch_size):
    out = super().padding_batch(config, subset, tasks, batch_size)
    out["source_id"] = np.full((batch_size,), "", dtype=np.str_)
    return out


SOURCES = {"samrs": SamrsSource(), "eurosat": SceneSource(scene_folders.EUROSAT),
           "eurosat_ms": SceneSource(scene_folders.EUROSAT_MS),
           "resisc45": SceneSource(scene_folders.RESISC45),
           "spacenet1": SegmentationSource(segmentation_releases.SPACENET1),
           "loveda": SegmentationSource(segmentation_releases.LOVEDA),
           "levir_cd": ChangeSource(change_releases.LEVIR_CD), "whu_cd": ChangeSource(change_releases.WHU_CD),
           "cdd": ChangeSource(change_releases.CDD), "oscd": ChangeSource(change_releases.OSCD),
           # mmrotate's DOTA RandomRotate keeps storage tanks and roundabouts (classes 9, 11) upright
           "dota_v1": DetectionSource(detection_releases.DOTA_V1, rect_classes=(9, 11)),
           "dota_v2": DetectionSource(detection_releases.DOTA_V2, rect_classes=(9, 11)),
           "dior_r": DetectionSource(detection_releases.DIOR_R),
           "dior": DetectionSource(detection_releases.DIOR, tasks=(HorizontalDetection.name,), flips=("horizontal",)),
           "fair1m": DetectionSource(detection_releases.FAIR1M),
           "xview": DetectionSource(detection_releases.XVIEW, tasks=(HorizontalDetection.name,), flips=("horizontal",))}


def source(config) -> Source:
  return SOURCES[config.data.dataset]
