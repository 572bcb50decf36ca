// CUDA backend of the multi-tensor SAM ops: checks, allocation on the current stream, then the
// raw-pointer launchers of multi_tensor_kernels.cu. Nothing here waits on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/multi_tensor_kernels.cuh"
#include "multi_tensor_checks.h"

namespace bisam {
namespace {

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
at::Tensor sq_norm_of(const TensorLists& tl, bool adaptive, const at::TensorOptions& acc_options) {
  const auto grads = data_pointers(tl.lists[0]);
  const auto params = adaptive ? data_pointers(tl.lists[1]) : std::vector<void*>{};
  const int n = static_cast<int>(tl.numels.size());
  at::Tensor workspace = at::empty({cuda::sq_norm_workspace_size(tl.numels.data(), n)}, acc_options);
  at::Tensor out = at::empty({}, acc_options);
  cuda::launch_sq_norm(
      element_type(tl.dtype), adaptive, grads.data(), adaptive ? params.data() : nullptr, tl.numels.data(), n,
      workspace.data_ptr(), out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor grad_sq_norm_cuda(at::TensorList grads, at::TensorList params, bool adaptive) {
  const TensorLists tl = check_sq_norm_lists(grads, params, adaptive);
  const c10::cuda::CUDAGuard guard(tl.device);
  return sq_norm_of(tl, adaptive, grads[0].options().dtype(accumulate_type(tl.dtype)));
}

at::Tensor sam_perturb_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList backups, double rho,
    const std::optional<at::Tensor>& rho_tensor, bool adaptive, double eps, const std::optional<at::Tensor>& sq_norm) {
  // Checked before the device guard: a CUDA rho with CPU lists must fail with a message naming rho.
  const PerturbArgs args = check_perturb_args(params, grads, backups, rho, rho_tensor, eps, sq_norm);
  const TensorLists& tl = args.tl;
  const c10::cuda::CUDAGuard guard(tl.device);
  const at::TensorOptions acc_options = params[0].options().dtype(args.acc_type);
  const auto& rho_t = args.rho;
  const auto& given_sq = args.sq_norm;
  // adaptive: the norm is of |w| * g, so the params list doubles as the reduction's second input.
  const at::Tensor sq = given_sq ? *given_sq
                                 : sq_norm_of(TensorLists{{tl.lists[1], tl.lists[0]}, tl.device, tl.dtype, tl.numels},
                                              adaptive, acc_options);
  at::Tensor norm_out = at::empty({}, acc_options);
  const auto w = data_pointers(tl.lists[0]);
  const auto g = data_pointers(tl.lists[1]);
  const auto b = data_pointers(tl.lists[2]);
  cuda::launch_perturb(
      element_type(tl.dtype), adaptive, w.data(), g.data(), b.data(), tl.numels.data(),
      static_cast<int>(tl.numels.size()), sq.data_ptr(), rho_t ? rho_t->data_ptr() : nullptr, rho, eps,
      norm_out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  return norm_out;
}

void sam_restore_cuda(at::TensorList params, at::TensorList backups) {
  const TensorLists tl = check_tensor_lists({params, backups}, {"params", "backups"}, {true, false});
  const c10::cuda::CUDAGuard guard(tl.device);
  const auto w = data_pointers(tl.lists[0]);
  const auto b = data_pointers(tl.lists[1]);
  cuda::launch_restore(
      element_type(tl.dtype), w.data(), b.data(), tl.numels.data(), static_cast<int>(tl.numels.size()),
      c10::cuda::getCurrentCUDAStream());
}

}  // namespace

TORCH_LIBRARY_IMPL(bisam, CUDA, m) {
  m.impl("grad_sq_norm", &grad_sq_norm_cuda);
  m.impl("sam_perturb_", &sam_perturb_cuda);
  m.impl("sam_restore_", &sam_restore_cuda);
}

}  // namespace bisam
