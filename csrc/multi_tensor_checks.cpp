#include "multi_tensor_checks.h"

#include <cmath>

namespace bisam {

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

static bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

TensorLists check_tensor_lists(
    const std::vector<at::TensorList>& lists,
    const std::vector<const char*>& names,
    const std::vector<bool>& writable) {
  TORCH_INTERNAL_ASSERT(!lists.empty() && lists.size() == names.size() && lists.size() == writable.size());
  const size_t n = lists[0].size();
  for (size_t k = 1; k < lists.size(); ++k) {
    TORCH_CHECK_VALUE(
        lists[k].size() == n, names[k], " has ", lists[k].size(), " tensors but ", names[0], " has ", n);
  }
  TORCH_CHECK_VALUE(n > 0, names[0], " must not be empty");

  TensorLists out;
  out.lists.resize(lists.size());
  const at::Tensor& first = lists[0][0];
  out.device = first.device();
  out.dtype = first.scalar_type();
  TORCH_CHECK_TYPE(
      supported_dtype(out.dtype), names[0], "[0] has unsupported dtype ", out.dtype,
      " (float32, float64, float16 and bfloat16 are supported)");
  out.numels.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = lists[0][i];
    for (size_t k = 0; k < lists.size(); ++k) {
      const at::Tensor& t = lists[k][i];
      TORCH_CHECK_VALUE(t.defined(), names[k], "[", i, "] is undefined (None)");
      TORCH_CHECK_VALUE(
          t.device() == out.device, names[k], "[", i, "] is on ", t.device(), " but ", names[0], "[0] is on ",
          out.device, ": all tensors must be on one device");
      TORCH_CHECK_TYPE(
          t.scalar_type() == out.dtype, names[k], "[", i, "] has dtype ", t.scalar_type(), " but ", names[0],
          "[0] has dtype ", out.dtype, ": one call takes one dtype (bisam_kernels.ops groups by dtype for you)");
      TORCH_CHECK_VALUE(
          t.sizes() == ref.sizes(), names[k], "[", i, "] has shape ", t.sizes(), " but ", names[0], "[", i,
          "] has shape ", ref.sizes());
    }
    TORCH_CHECK_VALUE(
        ref.is_non_overlapping_and_dense(), names[0], "[", i,
        "] must be dense and non-overlapping (a view with gaps or overlaps cannot be updated as a flat vector)");
    for (size_t k = 0; k < lists.size(); ++k) {
      const at::Tensor& t = lists[k][i];
      const bool same_layout = k == 0 || t.strides() == ref.strides() || t.numel() <= 1;
      if (writable[k]) {
        TORCH_CHECK_VALUE(
            same_layout && t.is_non_overlapping_and_dense(), names[k], "[", i, "] has strides ", t.strides(),
            " but ", names[0], "[", i, "] has strides ", ref.strides(), ": tensors updated in place must share a layout");
        out.lists[k].push_back(t);
      } else if (same_layout) {
        out.lists[k].push_back(t);
      } else {
        // A read-only input in another layout: copy it into the reference layout.
        out.lists[k].push_back(at::empty_like(ref).copy_(t));
      }
    }
    out.numels.push_back(ref.numel());
  }
  return out;
}

TensorLists check_sq_norm_lists(at::TensorList grads, at::TensorList params, bool adaptive) {
  if (!adaptive) {
    return check_tensor_lists({grads}, {"grads"}, {false});
  }
  TORCH_CHECK_VALUE(
      params.size() == grads.size(), "adaptive=True needs params paired with grads: params has ", params.size(),
      " tensors but grads has ", grads.size());
  return check_tensor_lists({grads, params}, {"grads", "params"}, {false, false});
}

void check_rho_and_eps(double rho, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(rho) && rho >= 0, "rho must be finite and non-negative, got ", rho);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be finite and non-negative, got ", eps);
}

std::optional<at::Tensor> check_scalar_tensor(
    const std::optional<at::Tensor>& t, const char* name, at::Device device, at::ScalarType dtype) {
  if (!t.has_value()) {
    return std::nullopt;
  }
  TORCH_CHECK_VALUE(t->numel() == 1, name, " must hold exactly one element, got shape ", t->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), name, " must be a floating tensor, got ", t->scalar_type());
  TORCH_CHECK_VALUE(
      t->device() == device, name, " is on ", t->device(), " but the tensors are on ", device);
  return t->reshape({}).to(dtype);
}

}  // namespace bisam
