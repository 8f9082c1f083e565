"""Two-stage detection core shared by Oriented R-CNN and Mask R-CNN: FPN neck, RPN, RoI heads."""

from mtp_jax.models.detection.fpn import FPN, resize_nearest
from mtp_jax.models.detection.rpn import (MASK_RCNN_RPN, ORIENTED_RCNN_RPN, ProposalConfig,
                                          RPNConfig, RPNHead, RPNTargets, batch_rpn_targets,
                                          rpn_loss, rpn_proposals, rpn_targets)

__all__ = ["FPN", "MASK_RCNN_RPN", "ORIENTED_RCNN_RPN", "ProposalConfig", "RPNConfig", "RPNHead",
           "RPNTargets", "batch_rpn_targets", "resize_nearest", "rpn_loss", "rpn_proposals",
           "rpn_targets"]
