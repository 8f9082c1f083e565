"""The pretraining tasks, by name (MTP_SPEC §3.1), each in its own module (DESIGN.md §3.1).

    tasks = build_tasks(config, class_names)   # {name: Task} of the enabled tasks

`TASKS` run; `PENDING` are named in the config and stop with a clear error when enabled, until
their module lands. Adding a task is adding its module and one line here.
"""

from mtp_jax.models.classes import with_background
from mtp_jax.tasks.base import Task
from mtp_jax.tasks.rotated_detection import RotatedDetection
from mtp_jax.tasks.semantic_segmentation import SemanticSegmentation

# In the order of MTP's loss sum (ss, is, rd; MTP_SPEC §3.2).
TASKS = {"ss": SemanticSegmentation, "rd": RotatedDetection}
PENDING = {"is": "Mask R-CNN instance segmentation"}
ORDER = ("ss", "is", "rd")


def enabled(config) -> tuple:
  """Names of the enabled tasks, in loss-sum order."""
  return tuple(n for n in ORDER if n in config.tasks and config.tasks[n].enabled)


def build_tasks(config, class_names: dict) -> dict:
  """{name: Task} of the enabled tasks; class_names: {subset: object class names}."""
  return {n: TASKS[n](config, class_names) for n in enabled(config)}


__all__ = ["ORDER", "PENDING", "TASKS", "RotatedDetection", "SemanticSegmentation", "Task",
           "build_tasks", "enabled", "with_background"]
