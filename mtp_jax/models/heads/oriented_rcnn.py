"""Oriented R-CNN rotated-detection head of MTP (MTP_SPEC §3.2, §3.3), shared trunk + per-dataset
predictors.

Shared by all subsets: `neck` (mmdet FPN, 5 maps, strides 4..64), `rpn_head` (oriented RPN,
midpoint-offset deltas) and `roi_head` (Shared2FC trunk). Per subset: `predictors[subset]`
(`fc_cls` C + 1, `fc_reg` 5, class-agnostic), MTP's `rotdetroiboxhead_fc_{cls,reg}{k}`.
Everything runs through the two-stage detector it shares with Mask R-CNN
(`mtp_jax/models/detection/two_stage.py`); this head is that detector with Oriented R-CNN's
settings and no second branch. Ground truth "boxes" are le90 (cx, cy, w, h, angle).
"""

from flax import nnx

from mtp_jax.models.detection.roi_head import RoIConfig
from mtp_jax.models.detection.rpn import RPNConfig
from mtp_jax.models.detection.two_stage import TwoStageDetector


class OrientedRCNN(TwoStageDetector):
  """The rotated-detection decoder: encoder maps -> per-subset losses or rotated detections."""

  def __init__(self, in_channels, num_classes: dict, *, rpn: RPNConfig = RPNConfig(),
               roi: RoIConfig = RoIConfig(), channels: int = 256, fc_channels: int = 1024,
               init: str = "mtp", rngs: nnx.Rngs, dtype=None):
    if not (rpn.rotated and roi.rotated):
      raise ValueError("Oriented R-CNN needs rotated RPN and R-CNN configs")
    super().__init__(in_channels, num_classes, rpn=rpn, roi=roi, channels=channels,
                     fc_channels=fc_channels, init=init, rngs=rngs, dtype=dtype)
