#include "multi_tensor_checks.h"

#include <algorithm>
#include <cfloat>
#include <cmath>

namespace bisam {

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

static bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Strides agree on every dimension of size > 1 (size-1 dimensions do not affect the layout).
static bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

struct MemoryRange {
  uintptr_t begin;
  uintptr_t end;
  bool writable;
  const char* name;
  size_t index;
};

// No tensor written in place may overlap any other tensor: sweep the ranges sorted by start.
static void check_no_overlap(std::vector<MemoryRange> ranges) {
  std::sort(ranges.begin(), ranges.end(), [](const MemoryRange& a, const MemoryRange& b) { return a.begin < b.begin; });
  const MemoryRange* widest = nullptr;           // the earlier range reaching furthest
  const MemoryRange* widest_writable = nullptr;  // the same among writable ranges
  for (const MemoryRange& r : ranges) {
    const MemoryRange* clash = nullptr;
    if (widest_writable != nullptr && r.begin < widest_writable->end) {
      clash = widest_writable;
    } else if (r.writable && widest != nullptr && r.begin < widest->end) {
      clash = widest;
    }
    TORCH_CHECK_VALUE(
        clash == nullptr, r.name, "[", r.index, "] shares memory with ", clash->name, "[", clash->index,
        "]: tensors updated in place must not alias any other argument (is a parameter listed twice?)");
    if (widest == nullptr || r.end > widest->end) widest = &r;
    if (r.writable && (widest_writable == nullptr || r.end > widest_writable->end)) widest_writable = &r;
  }
}

TensorLists check_tensor_lists(
    const std::vector<at::TensorList>& lists,
    const std::vector<const char*>& names,
    const std::vector<bool>& writable,
    const std::vector<at::Tensor>& extra_inputs) {
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
    // A read-only first list (grad_sq_norm's grads) may be any view: one with gaps or overlaps is copied
    // densely, as the other read-only inputs are below. A written list must be dense as it is.
    const at::Tensor ref = writable[0] || lists[0][i].is_non_overlapping_and_dense() ? lists[0][i]
                                                                                     : lists[0][i].contiguous();
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
    out.lists[0].push_back(ref);
    for (size_t k = 1; k < lists.size(); ++k) {
      const at::Tensor& t = lists[k][i];
      const bool layout_matches = same_layout(t, ref);
      if (writable[k]) {
        TORCH_CHECK_VALUE(
            layout_matches && t.is_non_overlapping_and_dense(), names[k], "[", i, "] has strides ", t.strides(),
            " but ", names[0], "[", i, "] has strides ", ref.strides(), ": tensors updated in place must share a layout");
        out.lists[k].push_back(t);
      } else if (layout_matches) {
        out.lists[k].push_back(t);
      } else {
        // A read-only input in another layout: copy it into the reference layout.
        out.lists[k].push_back(at::empty_like(ref).copy_(t));
      }
    }
    out.numels.push_back(ref.numel());
  }
  if (std::find(writable.begin(), writable.end(), true) != writable.end()) {
    std::vector<MemoryRange> ranges;
    auto add = [&](const at::Tensor& t, bool w, const char* name, size_t index) {
      if (t.numel() == 0) return;
      const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
      ranges.push_back({begin, begin + static_cast<uintptr_t>(t.numel() * t.element_size()), w, name, index});
    };
    for (size_t k = 0; k < lists.size(); ++k) {
      for (size_t i = 0; i < n; ++i) add(lists[k][i], writable[k], names[k], i);
    }
    for (const at::Tensor& t : extra_inputs) {
      if (t.defined() && t.device() == out.device) add(t, false, "a scalar argument (rho or sq_norm)", 0);
    }
    check_no_overlap(std::move(ranges));
  }
  return out;
}

TensorLists check_sq_norm_lists(at::TensorList grads, at::TensorList params, bool adaptive) {
  if (!adaptive) {
    TORCH_CHECK_VALUE(params.empty(), "params are only read when adaptive=True: pass an empty list");
    return check_tensor_lists({grads}, {"grads"}, {false});
  }
  TORCH_CHECK_VALUE(
      params.size() == grads.size(), "adaptive=True needs params paired with grads: params has ", params.size(),
      " tensors but grads has ", grads.size());
  return check_tensor_lists({grads, params}, {"grads", "params"}, {false, false});
}

static void check_rho_and_eps(double rho, double eps, at::ScalarType acc_type) {
  // The kernels compute in the accumulator type: a finite double may still overflow a float.
  const double max_value = acc_type == at::kDouble ? DBL_MAX : FLT_MAX;
  TORCH_CHECK_VALUE(
      std::isfinite(rho) && rho >= 0 && rho <= max_value, "rho must be finite and non-negative, got ", rho);
  TORCH_CHECK_VALUE(
      std::isfinite(eps) && eps >= 0 && eps <= max_value, "eps must be finite and non-negative, got ", eps);
}

// An optional one-element floating tensor on `device`, converted to `dtype`.
static std::optional<at::Tensor> check_scalar_tensor(
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

PerturbArgs check_perturb_args(
    at::TensorList params, at::TensorList grads, at::TensorList backups, double rho,
    const std::optional<at::Tensor>& rho_tensor, double eps, const std::optional<at::Tensor>& sq_norm) {
  std::vector<at::Tensor> scalars;
  if (rho_tensor.has_value()) scalars.push_back(*rho_tensor);
  if (sq_norm.has_value()) scalars.push_back(*sq_norm);
  TensorLists tl = check_tensor_lists(
      {params, grads, backups}, {"params", "grads", "backups"}, {true, false, true}, scalars);
  const at::ScalarType acc_type = accumulate_type(tl.dtype);
  check_rho_and_eps(rho_tensor.has_value() ? 0.0 : rho, eps, acc_type);
  auto rho_t = check_scalar_tensor(rho_tensor, "rho", tl.device, acc_type);
  auto sq_t = check_scalar_tensor(sq_norm, "sq_norm", tl.device, acc_type);
  return {std::move(tl), acc_type, std::move(rho_t), std::move(sq_t)};
}

}  // namespace bisam
