"""Metrics (CLU metrics on device, host-side evaluators), and metric writers (the run report, which
reads the tasks, is mtp_jax/train/report.py).

The public evaluators are importable from here: dota_map, coco_ap and the confusion-matrix scores.
"""

from mtp_jax.metrics.coco import CocoEvaluator, coco_ap
from mtp_jax.metrics.rotated_detection import DotaEvaluator, dota_map
from mtp_jax.metrics.segmentation import (ConfusionMatrix, change_detection_scores, classification_scores,
                                          confusion_matrix, segmentation_scores)

__all__ = ["CocoEvaluator", "ConfusionMatrix", "DotaEvaluator", "change_detection_scores",
           "classification_scores", "coco_ap", "confusion_matrix", "dota_map", "segmentation_scores"]
