"""Loads the compiled extension (bisam_kernels._C), which registers the torch.ops.bisam operators."""

import torch

try:
    from bisam_kernels import _C  # noqa: F401  (importing registers the ops)
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "bisam_kernels._C is not built: run `pip install --no-build-isolation -e .` "
        "(or the README's test command, which builds it)"
    ) from error


def built_with_cuda() -> bool:
    """True when the extension carries the CUDA kernels (registered under the CUDA dispatch key)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("bisam::grad_sq_norm", "CUDA")
