"""Dispatch between the Triton kernels (CUDA; CPU tensors under the interpreter in the tests) and the
composite path, for the three row-loss computations: forward (with the fused gradient), the per-row
gradient of reduction="none", and the in-place gradient scaling.
"""

import contextlib
from collections.abc import Iterator

import torch

from bisam_kernels._dtypes import accumulate_dtype
from bisam_kernels.ops.row_loss import launch
from bisam_kernels.ops.row_loss.composite import composite_forward, composite_rows, composite_scale_grad_
from bisam_kernels.ops.row_loss.kernels import triton
from bisam_kernels.ops.row_loss.modes import TRITON_DTYPES, Reduction

_triton_on_cpu = False  # tests: run the Triton kernels on CPU tensors (Triton's interpreter)


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True) -> Iterator[None]:
    """Route CPU tensors through the Triton kernels (needs TRITON_INTERPRET=1 set before importing
    triton). For tests: the Triton code then runs under the interpreter on the CPU."""
    global _triton_on_cpu
    previous, _triton_on_cpu = _triton_on_cpu, enabled
    try:
        yield
    finally:
        _triton_on_cpu = previous


def use_triton(z: torch.Tensor) -> bool:
    if triton is None or z.dtype not in TRITON_DTYPES:
        return False
    return z.is_cuda or (_triton_on_cpu and z.device.type == "cpu")


def unit_col_stride(z: torch.Tensor) -> torch.Tensor:
    return z if z.stride(1) == 1 or z.shape[1] <= 1 else z.contiguous()


def writable(z: torch.Tensor) -> bool:
    """No two elements of the (N, K) view z share memory (it can hold the gradient in place)."""
    dims = sorted((st, n) for st, n in zip(z.stride(), z.shape) if n > 1)
    span = 1
    for st, n in dims:
        if st < span:
            return False
        span = st * n
    return True


def fuses_gradient(reduction: int, dtype: torch.dtype) -> bool:
    """Whether the forward writes the gradient (mean / sum). Not for float16: its gradient must be
    multiplied by grad_output (an AMP loss scale) before it is rounded, or small entries flush to zero;
    float16 logits recompute the gradient in the backward instead (2 reads + 1 write)."""
    return reduction != Reduction.NONE and dtype != torch.float16


def device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward_impl(z, t, phi, mu, alpha, ignore_index, reduction, out_scale, want_grad, into_logits=False,
                  want_stats=False, float32_loss=False):
    """(loss, gradient or None, row statistics or None). The loss has z's dtype, or float32 with float32_loss.

    The gradient of the reduced loss (of each row's loss for "none"), in a new (N, K) tensor, or written
    over the logits when into_logits (into a new tensor all the same when the logits' memory overlaps
    itself, an expanded tensor say). Row statistics: (2, N) for the backward of reduction="none"."""
    into_logits = into_logits and writable(z)
    loss_dtype = torch.float32 if float32_loss else z.dtype
    if use_triton(z):
        z, t = unit_col_stride(z), t.contiguous()
        g = stats = None
        if want_grad:
            g = z if into_logits else launch.empty(z.shape, z.dtype, z.device)
        if want_stats:
            stats = launch.empty((2, z.shape[0]), torch.float32, z.device)
        with device_of(z):
            loss, g = launch.triton_forward(z, t, phi, mu, alpha, ignore_index, reduction, out_scale, g, stats,
                                      loss_dtype)
        return loss, g, stats
    loss, g, stats = composite_forward(z, t, phi, mu, alpha, ignore_index, reduction, out_scale, want_grad,
                                        want_stats, loss_dtype)
    if into_logits and g is not None:
        g = z.copy_(g)
    return loss, g, stats


def row_grad_impl(z, t, grad_rows, stats, phi, mu, alpha, ignore_index, out_scale):
    """Gradient of sum_i grad_rows[i] * l_i; stats: the forward's row statistics, or an empty tensor."""
    if use_triton(z):
        stats = stats.contiguous() if stats.numel() else None  # the kernel indexes a dense (2, N) tensor
        with device_of(z):
            return launch.triton_row_grad(unit_col_stride(z), t.contiguous(), grad_rows, stats, phi, mu, alpha,
                                    ignore_index, out_scale)
    row_scale = grad_rows.to(accumulate_dtype(z.dtype))
    _, g, _, _ = composite_rows(z, t, phi, mu, alpha, ignore_index, out_scale, row_scale, True, check=False)
    return g.to(z.dtype)


def scale_grad_impl(g: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    """g *= go in place; returns a copy of go (the caller's go may be modified later, by gradcheck say)."""
    if use_triton(g):
        with device_of(g):
            return launch.triton_scale_grad_(g, go)
    return composite_scale_grad_(g, go)


def tracing(t: torch.Tensor) -> bool:
    """Under torch.compile / AOT autograd tracing (fake or functional tensors): use the ops, functionally."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor
