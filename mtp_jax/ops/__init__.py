"""Pure jax.numpy ops: box conversions, IoU, NMS, RoI alignment, box coders, anchors, assignment,
DCNv3."""

from mtp_jax.ops.anchors import AnchorGenerator, anchor_inside_flags
from mtp_jax.ops.assign import (Assignment, Sample, max_iou_assign, prepend_gt_as_proposals,
                                random_sample)
from mtp_jax.ops.box_coders import DeltaXYWH, DeltaXYWHT, MidpointOffset
from mtp_jax.ops.boxes import (hbox_to_rbox, norm_angle_le90, poly_to_hbox, poly_to_rbox,
                               rbox_to_hbox, rbox_to_poly, regularize_le90)
from mtp_jax.ops.iou import box_iou, box_iou_rotated, rotated_intersection_area
from mtp_jax.ops.suppression import nms, nms_rotated
from mtp_jax.ops.dcnv3 import dcnv3_core
from mtp_jax.ops.rois import (map_roi_levels, multilevel_roi_align, multilevel_roi_align_rotated,
                                   roi_align, roi_align_rotated)

__all__ = ["AnchorGenerator", "Assignment", "DeltaXYWH", "DeltaXYWHT", "MidpointOffset", "Sample",
           "anchor_inside_flags", "box_iou", "box_iou_rotated", "dcnv3_core", "hbox_to_rbox",
           "map_roi_levels", "max_iou_assign", "multilevel_roi_align", "multilevel_roi_align_rotated",
           "nms", "nms_rotated", "norm_angle_le90", "poly_to_hbox", "poly_to_rbox",
           "prepend_gt_as_proposals", "random_sample", "rbox_to_hbox", "rbox_to_poly",
           "regularize_le90", "roi_align", "roi_align_rotated", "rotated_intersection_area"]
