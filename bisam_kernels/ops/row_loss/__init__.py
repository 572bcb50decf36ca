"""The fused row losses: the BiSAM lower bound with its gradient, fused with the softmax.

One module per layer: ``modes`` (the named integer modes), ``kernels`` (Triton), ``launch`` (configurations
and launches), ``composite`` (the PyTorch path: CPU, float64), ``dispatch`` (which of the two runs),
``autograd`` (the autograd Function and the torch.library operators), ``api`` (``bisam_loss``,
``BiSAMLoss``). The package is not named after the function, so that ``bk.ops.bisam_loss`` is the function.

For logits ``z`` (rows) and targets ``y`` (docs/design.md section 1)::

    F_j = z_j - z_y,   s_j = mu * phi(F_j),   l = logsumexp_j s_j     (l / mu with scale_by_mu)

and, with ``p = softmax(s)`` and ``c_j = p_j * mu * phi'(F_j)``, ``dl/dz_k = c_k - [k == y] * sum_j c_j``.

How the work is split (bytes of the logits moved by forward + backward):

* ``reduction="mean"/"sum"``: the forward computes the per-row loss *and* the gradient, already scaled
  by ``1 / count`` (count = non-ignored rows, counted on the device first). One pass over a row that
  fits on chip (K <= 8192): 1 read + 1 write; for wider rows an online max / log-sum-exp pass and a
  second pass writing the gradient: 2 reads + 1 write. The backward multiplies the stored gradient by
  ``grad_output`` in place with a kernel that reads ``grad_output`` on the device and touches nothing
  when it is 1 (``loss.backward()``), so it adds no traffic in the common case.
* ``reduction="none"``: the backward needs a different scale per row, so the forward only reads the
  logits (1 read) and the backward runs the same kernel again with the per-row scale (1 read + 1 write,
  2 reads + 1 write for wide rows).
* ``inplace_backward=True`` writes the gradient into the logits' buffer (no gradient allocation).

No host synchronisation anywhere on CUDA. Math in float32 (float64 for float64 logits); the gradient is
stored in the logits' dtype; the loss is returned in the logits' dtype, and in float32 under
``torch.autocast`` (as ``F.cross_entropy`` does: a float16 loss times a GradScaler's scale overflows).

On CUDA, float16 / bfloat16 / float32 logits run the Triton kernels; float64 logits (and every CPU
tensor) run the composite PyTorch implementation of the same ops, with the same outputs.
"""

from bisam_kernels.ops.row_loss.api import BiSAMLoss, bisam_loss
from bisam_kernels.ops.row_loss.dispatch import triton_on_cpu
from bisam_kernels.ops.row_loss.launch import aot_specializations, kernel_configs

__all__ = ["bisam_loss", "BiSAMLoss", "triton_on_cpu", "kernel_configs", "aot_specializations"]
