"""The pretraining numbers of MTP (MTP_SPEC.md §3.6): one headline metric per task and subset,
and the "MTP average" of all of them when the three tasks run.

Per subset, the evaluation results hold one dict per task:
  ss: segmentation_scores  -> headline "miou"        (mIoU, background included, §3.4)
  is: {"segm": coco_ap, "bbox": coco_ap} -> "segm"/"AP" (COCO mask AP, IoU 0.50:0.95)
  rd: DotaEvaluator.result -> "map"         (DOTA VOC07 mAP at IoU 0.5)
"""

import math

HEADLINE = {"ss": ("miou",), "is": ("segm", "AP"), "rd": ("map",)}
HEADLINE_NAMES = {"ss": "mIoU", "is": "mask AP", "rd": "rotated mAP"}


def headline(task: str, result: dict) -> float:
  """The task's headline number (a fraction) from its result dict."""
  value = result
  for key in HEADLINE[task]:
    value = value[key]
  return float(value)


def mtp_average(per_subset: dict) -> float | None:
  """Mean of the headline numbers of ss, is and rd over every subset ({subset: {task: result}}),
  as the paper's "MTP average" (9 numbers for SOTA, SIOR, FAST); None unless every subset has all
  three tasks. NaN if any of them is NaN (an empty evaluation), so it is never silently partial."""
  if not per_subset or any(set(HEADLINE) - set(tasks) for tasks in per_subset.values()):
    return None
  values = [headline(t, tasks[t]) for tasks in per_subset.values() for t in HEADLINE]
  return float("nan") if any(math.isnan(v) for v in values) else sum(values) / len(values)
