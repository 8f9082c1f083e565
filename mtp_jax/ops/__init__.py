"""Pure jax.numpy ops: box conversions (more land with the rotated-box issue)."""

from mtp_jax.ops.boxes import (norm_angle_le90, poly_to_hbox, poly_to_rbox, rbox_to_hbox,
                               rbox_to_poly, regularize_le90)

__all__ = ["norm_angle_le90", "poly_to_hbox", "poly_to_rbox", "rbox_to_hbox", "rbox_to_poly",
           "regularize_le90"]
