"""Names for the integer modes the row kernel and the operators take (one definition for all layers).

The Triton kernel and the ``torch.library`` schemas receive plain ints; these enums name them on the
Python side. ``PHIS`` and ``REDUCTIONS`` map the public string options onto them.
"""

import enum
import math

import torch


class Phi(enum.IntEnum):
    """The surrogate phi of the margin F = z_j - z_y (docs/design.md section 1)."""

    TANH = 0  # tanh(alpha F)
    LOG = 1  # 1 - softplus(log(e - 1) - F)
    IDENTITY = 2  # F: with mu = 1 the row loss is the cross-entropy (the fused linear cross-entropy)


class Reduction(enum.IntEnum):
    NONE = 0
    MEAN = 1
    SUM = 2


class ScaleMode(enum.IntEnum):
    """The factor of each row's gradient (times out_scale)."""

    ONE = 0
    INV_COUNT = 1  # 1 / scale[0]: the mean's count of non-ignored rows, on the device
    PER_ROW = 2  # scale[row]: the incoming gradient of reduction="none"


class StatsMode(enum.IntEnum):
    """The two row statistics (logsumexp s, sum_{j != y} p_j phi'(F_j)) at stats[row], stats[N + row]."""

    NONE = 0
    WRITE = 1  # the forward keeps them for the backward of reduction="none"
    READ = 2  # the backward reads them instead of a first pass over a wide row


class Finalize(enum.IntEnum):
    """A launch with a single program reduces its own rows (no count or reduction kernel)."""

    NONE = 0
    SUM = 1
    MEAN = 2


PHIS = {"tanh": Phi.TANH, "log": Phi.LOG}
REDUCTIONS = {"none": Reduction.NONE, "mean": Reduction.MEAN, "sum": Reduction.SUM}
GAMMA = math.log(math.e - 1.0)  # phi_log(x) = 1 - softplus(GAMMA - x), so phi_log(0) = 0

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TARGET_DTYPES = (torch.int64, torch.int32)
