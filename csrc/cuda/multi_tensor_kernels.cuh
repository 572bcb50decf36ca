// Launchers of the multi-tensor SAM kernels, on raw pointers and a stream. This header and the
// .cu behind it include no torch headers (that keeps nvcc fast); sam_perturb_cuda.cpp binds them.
// large_kernel_args: pack up to 32764 bytes of tensor addresses per launch (CUDA 12.1+, Volta and
// newer) instead of 4 KiB, so about 8x fewer launches for long lists (multi_tensor_apply.cuh).
#pragma once

#if defined(BISAM_CUDA_EMULATION)
#include "emulated/cuda_emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace bisam::cuda {

enum class ElementType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Workspace for launch_sq_norm: this many accumulators (float, or double for kFloat64).
int64_t sq_norm_workspace_size(const int64_t* numels, int n);

// out_sq_norm[0] <- sum over tensors of g^2, or (|w| g)^2 when adaptive (params then non-null).
// Two stages (per-block partials, then one block in fixed order): deterministic, no atomics.
void launch_sq_norm(
    ElementType type, bool adaptive, const void* const* grads, const void* const* params, const int64_t* numels,
    int n, void* workspace, void* out_sq_norm, bool large_kernel_args, cudaStream_t stream);

// backup <- w; w <- w + rho * (w^2 if adaptive) * g / (sqrt(*sq_norm) + eps), the scale computed on the
// device; weights are left untouched when the scale is invalid (see perturb_scale.h). rho is read from
// rho_device when non-null. norm_out[0] <- the reported norm. Accumulator type as in launch_sq_norm.
void launch_perturb(
    ElementType type, bool adaptive, void* const* params, const void* const* grads, void* const* backups,
    const int64_t* numels, int n, const void* sq_norm, const void* rho_device, double rho, double eps,
    void* norm_out, bool large_kernel_args, cudaStream_t stream);

// w <- backup, bit-exact.
void launch_restore(
    ElementType type, void* const* params, const void* const* backups, const int64_t* numels, int n,
    bool large_kernel_args, cudaStream_t stream);

}  // namespace bisam::cuda
