"""The tasks, by name: pretraining (MTP_SPEC §3.1) and finetuning (§5), each in its own module (DESIGN.md §3.1).

    tasks = build_tasks(config, class_names)   # {name: Task} of the enabled tasks

Adding a task is adding its module and one line in `TASKS`. What the rest of the system needs to
know about a task, it reads from the task's class (`Task.pretraining`, `dates`, `objects`,
`data_options`, `smoke`, ...), never from its name.
"""

import math

from mtp_jax.models.classes import with_background
from mtp_jax.tasks.base import Task
from mtp_jax.tasks.change_detection import ChangeDetection
from mtp_jax.tasks.classification import Classification
from mtp_jax.tasks.horizontal_detection import HorizontalDetection
from mtp_jax.tasks.instance_segmentation import InstanceSegmentation
from mtp_jax.tasks.rotated_detection import RotatedDetection
from mtp_jax.tasks.semantic_segmentation import SemanticSegmentation

# In the order of MTP's loss sum (ss, is, rd; MTP_SPEC §3.2), then the finetuning tasks (§5).
TASKS = {"ss": SemanticSegmentation, "is": InstanceSegmentation, "rd": RotatedDetection,
         "cls": Classification, "cd": ChangeDetection, "hd": HorizontalDetection}
ORDER = tuple(TASKS)
# The tasks whose headlines make the paper's MTP average (MTP_SPEC §3.6): the pretraining tasks.
MTP_AVERAGE = tuple(n for n in ORDER if TASKS[n].pretraining)


def enabled(config) -> tuple:
  """Names of the enabled tasks, in loss-sum order."""
  return tuple(n for n in ORDER if n in config.tasks and config.tasks[n].enabled)


def build_tasks(config, class_names: dict) -> dict:
  """{name: Task} of the enabled tasks; class_names: {subset: object class names}."""
  return {n: TASKS[n](config.tasks[n], config.data, config.eval, class_names) for n in enabled(config)}


def needs_masks(tasks: dict) -> bool:
  """Whether the input pipeline must decode instance masks for these tasks ({name: Task})."""
  return any(t.needs_masks for t in tasks.values())


def data_options() -> dict:
  """{task: {data key: what it does}} of every task (`Task.data_options`), for the data checks
  (data_pipelines/sources.py check_bands, which knows no task)."""
  return {n: dict(t.data_options) for n, t in TASKS.items()}


def mtp_average(headlines: dict) -> float | None:
  """The "MTP average" of the paper (MTP_SPEC §3.6): the mean of the headline numbers of the
  pretraining tasks (`MTP_AVERAGE`: ss mIoU, is mask AP, rd mAP) over every subset (9 numbers for
  SOTA, SIOR, FAST), from {subset: {task: headline fraction}}. None unless every subset has all
  of them; NaN if any of them is NaN (an empty evaluation), so it is never silently partial."""
  if not headlines or any(set(MTP_AVERAGE) - set(tasks) for tasks in headlines.values()):
    return None
  values = [float(tasks[t]) for tasks in headlines.values() for t in MTP_AVERAGE]
  return float("nan") if any(math.isnan(v) for v in values) else sum(values) / len(values)


__all__ = ["MTP_AVERAGE", "ORDER", "TASKS", "ChangeDetection", "Classification", "HorizontalDetection",
           "InstanceSegmentation", "RotatedDetection", "SemanticSegmentation", "Task", "build_tasks",
           "data_options", "enabled", "mtp_average", "needs_masks", "with_background"]
