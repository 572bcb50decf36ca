"""Fused ops: each module holds its kernels, launcher and autograd next to each other."""

from bisam_kernels.ops.fused_linear import (
    FusedLinearBiSAMLoss,
    FusedLinearCrossEntropy,
    fused_linear_bisam_loss,
    fused_linear_cross_entropy,
)
from bisam_kernels.ops.row_loss import BiSAMLoss, bisam_loss
from bisam_kernels.ops.sam_perturb import grad_sq_norm, sam_perturb_, sam_perturbation, sam_restore_

__all__ = ["grad_sq_norm", "sam_perturb_", "sam_restore_", "sam_perturbation", "bisam_loss", "BiSAMLoss",
           "fused_linear_bisam_loss", "fused_linear_cross_entropy", "FusedLinearBiSAMLoss", "FusedLinearCrossEntropy"]
