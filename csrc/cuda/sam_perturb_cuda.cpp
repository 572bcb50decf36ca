// CUDA backend of the multi-tensor SAM ops: checks, allocation on the current stream, then the
// raw-pointer launchers of multi_tensor_kernels.cu. Nothing here waits on the device.
// Built a second time with BISAM_CUDA_EMULATION for the CPU emulation of the kernels (docs/design.md
// section 9): the same code on CPU tensors, registered as bisam_cuda_emulated::*, nothing under CUDA.
#include <ATen/ATen.h>
#include <torch/library.h>

#if !defined(BISAM_CUDA_EMULATION)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <vector>

#include "cuda/multi_tensor_kernels.cuh"
#include "multi_tensor_checks.h"

namespace bisam {
namespace {

struct LaunchSettings {
  cudaStream_t stream;
  bool large_kernel_args;
};

#if defined(BISAM_CUDA_EMULATION)
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}  // CPU tensors: nothing to select
};

LaunchSettings launch_settings(bool large_kernel_args) { return {nullptr, large_kernel_args}; }
#else
using DeviceGuard = c10::cuda::CUDAGuard;

// 32 KiB of kernel arguments need a CUDA 12.1+ driver (the runtime is checked when building) and a
// Volta or newer GPU. Not while a CUDA graph is captured: torch's multi-tensor kernels stay at 4 KiB there too.
bool large_kernel_args_supported(cudaStream_t stream) {
  static const bool driver_supports = [] {
    int version = 0;
    return cudaDriverGetVersion(&version) == cudaSuccess && version >= 12010;
  }();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c10::cuda::current_device()));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  return driver_supports && major >= 7 && capture == cudaStreamCaptureStatusNone;
}

LaunchSettings launch_settings(bool allow_large_kernel_args) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  return {stream, allow_large_kernel_args && large_kernel_args_supported(stream)};
}
#endif

cuda::ElementType element_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::ElementType::kFloat32;
    case at::kDouble: return cuda::ElementType::kFloat64;
    case at::kHalf: return cuda::ElementType::kFloat16;
    case at::kBFloat16: return cuda::ElementType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t);
  }
}

std::vector<void*> data_pointers(const std::vector<at::Tensor>& list) {
  std::vector<void*> out;
  out.reserve(list.size());
  for (const at::Tensor& t : list) out.push_back(t.data_ptr());
  return out;
}

// Writes the squared norm of the validated lists into a new 0-dim accumulator tensor.
at::Tensor sq_norm_of(
    const TensorLists& tl, bool adaptive, const at::TensorOptions& acc_options, const LaunchSettings& launch) {
  const auto grads = data_pointers(tl.lists[0]);
  const auto params = adaptive ? data_pointers(tl.lists[1]) : std::vector<void*>{};
  const int n = static_cast<int>(tl.numels.size());
  at::Tensor workspace = at::empty({cuda::sq_norm_workspace_size(tl.numels.data(), n)}, acc_options);
  at::Tensor out = at::empty({}, acc_options);
  cuda::launch_sq_norm(
      element_type(tl.dtype), adaptive, grads.data(), adaptive ? params.data() : nullptr, tl.numels.data(), n,
      workspace.data_ptr(), out.data_ptr(), launch.large_kernel_args, launch.stream);
  return out;
}

// Each op takes large_kernel_args last: whether 32 KiB argument packs may be used (the CUDA
// registration allows them where supported; the emulated one lets the tests choose).
at::Tensor grad_sq_norm(at::TensorList grads, at::TensorList params, bool adaptive, bool large_kernel_args) {
  const TensorLists tl = check_sq_norm_lists(grads, params, adaptive);
  const DeviceGuard guard(tl.device);
  return sq_norm_of(
      tl, adaptive, grads[0].options().dtype(accumulate_type(tl.dtype)), launch_settings(large_kernel_args));
}

at::Tensor sam_perturb(
    at::TensorList params, at::TensorList grads, at::TensorList backups, double rho,
    const std::optional<at::Tensor>& rho_tensor, bool adaptive, double eps, const std::optional<at::Tensor>& sq_norm,
    bool large_kernel_args) {
  // Checked before the device guard: a CUDA rho with CPU lists must fail with a message naming rho.
  const PerturbArgs args = check_perturb_args(params, grads, backups, rho, rho_tensor, eps, sq_norm);
  const TensorLists& tl = args.tl;
  const DeviceGuard guard(tl.device);
  const LaunchSettings launch = launch_settings(large_kernel_args);
  const at::TensorOptions acc_options = params[0].options().dtype(args.acc_type);
  const auto& rho_t = args.rho;
  const auto& given_sq = args.sq_norm;
  // adaptive: the norm is of |w| * g, so the params list doubles as the reduction's second input.
  const at::Tensor sq = given_sq ? *given_sq
                                 : sq_norm_of(TensorLists{{tl.lists[1], tl.lists[0]}, tl.device, tl.dtype, tl.numels},
                                              adaptive, acc_options, launch);
  at::Tensor norm_out = at::empty({}, acc_options);
  const auto w = data_pointers(tl.lists[0]);
  const auto g = data_pointers(tl.lists[1]);
  const auto b = data_pointers(tl.lists[2]);
  cuda::launch_perturb(
      element_type(tl.dtype), adaptive, w.data(), g.data(), b.data(), tl.numels.data(),
      static_cast<int>(tl.numels.size()), sq.data_ptr(), rho_t ? rho_t->data_ptr() : nullptr, rho, eps,
      norm_out.data_ptr(), launch.large_kernel_args, launch.stream);
  return norm_out;
}

void sam_restore(at::TensorList params, at::TensorList backups, bool large_kernel_args) {
  const TensorLists tl = check_tensor_lists({params, backups}, {"params", "backups"}, {true, false});
  const DeviceGuard guard(tl.device);
  const LaunchSettings launch = launch_settings(large_kernel_args);
  const auto w = data_pointers(tl.lists[0]);
  const auto b = data_pointers(tl.lists[1]);
  cuda::launch_restore(
      element_type(tl.dtype), w.data(), b.data(), tl.numels.data(), static_cast<int>(tl.numels.size()),
      launch.large_kernel_args, launch.stream);
}

}  // namespace

#if defined(BISAM_CUDA_EMULATION)
TORCH_LIBRARY_FRAGMENT(bisam_cuda_emulated, m) {
  m.def("grad_sq_norm", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(grad_sq_norm)));
  m.def("sam_perturb_", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(sam_perturb)));
  m.def("sam_restore_", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(sam_restore)));
}
#else
TORCH_LIBRARY_IMPL(bisam, CUDA, m) {
  m.impl("grad_sq_norm", [](at::TensorList grads, at::TensorList params, bool adaptive) {
    return grad_sq_norm(grads, params, adaptive, true);
  });
  m.impl("sam_perturb_", [](at::TensorList params, at::TensorList grads, at::TensorList backups, double rho,
                            const std::optional<at::Tensor>& rho_tensor, bool adaptive, double eps,
                            const std::optional<at::Tensor>& sq_norm) {
    return sam_perturb(params, grads, backups, rho, rho_tensor, adaptive, eps, sq_norm, true);
  });
  m.impl("sam_restore_", [](at::TensorList params, at::TensorList backups) { sam_restore(params, backups, true); });
}
#endif

}  // namespace bisam
