"""Class counts with and without background: the one place that converts them.

`num_classes` is always the number of OBJECT classes (SOTA 18, SIOR 20, FAST 37, MTP_SPEC §3.1),
never counting background. A classifier that also predicts background has `with_background(C)`
outputs: semantic segmentation puts background at index 0 (MTP's --background), the detection
heads at index C (mmdet's convention); each says so where it calls this.
"""


def with_background(num_classes: int) -> int:
  """Object classes -> outputs of a classifier that also predicts background."""
  return num_classes + 1
