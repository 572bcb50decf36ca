"""bisam_kernels: fused Triton and CUDA C++ kernels and a drop-in optimizer for BiSAM.

BiSAM (Xie et al., ICML 2024, arXiv 2407.12993) is Sharpness-Aware Minimization whose ascent step
uses a lower bound of the 0-1 loss. See README.md for the API and docs/design.md for the math.
"""

from bisam_kernels import ops
from bisam_kernels._extension import built_with_cuda
from bisam_kernels.ops.fused_linear import (
    FusedLinearBiSAMLoss,
    FusedLinearCrossEntropy,
    fused_linear_bisam_loss,
    fused_linear_cross_entropy,
)
from bisam_kernels.ops.row_loss import BiSAMLoss, bisam_loss
from bisam_kernels.ops.cross_entropy import smooth_cross_entropy
from bisam_kernels.optim import SAM, BiSAM
from bisam_kernels.training import BiSAMStepOutput, bisam_step, frozen_bn_stats

__version__ = "0.1.0"

__all__ = [
    "ops",
    "built_with_cuda",
    "bisam_loss",
    "BiSAMLoss",
    "fused_linear_bisam_loss",
    "fused_linear_cross_entropy",
    "FusedLinearBiSAMLoss",
    "FusedLinearCrossEntropy",
    "smooth_cross_entropy",
    "BiSAM",
    "SAM",
    "bisam_step",
    "BiSAMStepOutput",
    "frozen_bn_stats",
]
