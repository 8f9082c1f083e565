"""The "MTP average" of the paper (MTP_SPEC.md §3.6): the mean of the headline numbers of the
three pretraining tasks (ss mIoU, is mask AP, rd mAP) over every subset (9 numbers for SOTA,
SIOR, FAST). Each task gives its own headline number (mtp_jax/tasks/, Task.headline).
"""

import math

MTP_TASKS = ("ss", "is", "rd")


def mtp_average(headlines: dict) -> float | None:
  """Mean of {subset: {task: headline fraction}} over every subset and the three MTP tasks; None
  unless every subset has all three. NaN if any of them is NaN (an empty evaluation), so it is
  never silently partial."""
  if not headlines or any(set(MTP_TASKS) - set(tasks) for tasks in headlines.values()):
    return None
  values = [float(tasks[t]) for tasks in headlines.values() for t in MTP_TASKS]
  return float("nan") if any(math.isnan(v) for v in values) else sum(values) / len(values)
