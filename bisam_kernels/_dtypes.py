"""The accumulate-dtype rule every kernel follows (the C++ ``accumulate_type`` is its twin)."""

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 math for float64 tensors, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
