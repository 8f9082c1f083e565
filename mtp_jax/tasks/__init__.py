"""The tasks, by name: pretraining (MTP_SPEC §3.1) and finetuning (§5), each in its own module (DESIGN.md §3.1).

    tasks = build_tasks(config, class_names)   # {name: Task} of the enabled tasks

`TASKS` run; `PENDING` are named in the config and stop with a clear error when enabled, until
their module lands. Adding a task is adding its module and one line here.
"""

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
PENDING = {}
ORDER = ("ss", "is", "rd", "cls", "cd", "hd")


def enabled(config) -> tuple:
  """Names of the enabled tasks, in loss-sum order."""
  return tuple(n for n in ORDER if n in config.tasks and config.tasks[n].enabled)


def build_tasks(config, class_names: dict) -> dict:
  """{name: Task} of the enabled tasks; class_names: {subset: object class names}."""
  return {n: TASKS[n](config, class_names) for n in enabled(config)}


def needs_masks(tasks: dict) -> bool:
  """Whether the input pipeline must decode instance masks for these tasks ({name: Task})."""
  return any(t.needs_masks for t in tasks.values())


__all__ = ["ORDER", "PENDING", "TASKS", "ChangeDetection", "Classification", "HorizontalDetection", "InstanceSegmentation", "RotatedDetection", "SemanticSegmentation", "Task",
           "build_tasks", "enabled", "needs_masks", "with_background"]
