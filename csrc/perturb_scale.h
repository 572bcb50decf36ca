// The SAM step size from the norm, shared by the CPU and CUDA kernels (no torch includes: nvcc-friendly).
#pragma once

#include <limits>

#if defined(__CUDACC__)
#define BISAM_HOST_DEVICE __host__ __device__
#else
#define BISAM_HOST_DEVICE
#endif

namespace bisam {

template <typename Acc>
BISAM_HOST_DEVICE inline bool is_finite(Acc x) {
  return x - x == Acc(0);  // false for inf and NaN, without relying on <cmath> in device code
}

// rho / (norm + eps); 0 (the perturbation is skipped, weights untouched) when the norm is zero,
// non-finite (overflowed fp16 gradients), the step would overflow, or rho is not a finite
// non-negative number (a rho tensor cannot be checked on the host without a sync).
template <typename Acc>
BISAM_HOST_DEVICE inline Acc perturb_scale(Acc norm, Acc rho, Acc eps) {
  if (!is_finite(norm) || !(norm > Acc(0)) || !is_finite(rho) || !(rho >= Acc(0))) {
    return Acc(0);
  }
  const Acc scale = rho / (norm + eps);
  return is_finite(scale) ? scale : Acc(0);
}

// The norm the op returns: the norm itself (inf/NaN show a skipped step), NaN for an invalid rho.
template <typename Acc>
BISAM_HOST_DEVICE inline Acc reported_norm(Acc norm, Acc rho) {
  return (is_finite(rho) && rho >= Acc(0)) ? norm : std::numeric_limits<Acc>::quiet_NaN();
}

}  // namespace bisam
