// Argument checks shared by the CPU and CUDA backends of the multi-tensor SAM ops.
// Every error names the offending argument (and list index), so a user sees what to fix.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace bisam {

// float32 accumulation for float32/bfloat16/float16 tensors, float64 for float64 tensors.
at::ScalarType accumulate_type(at::ScalarType t);

// A validated, homogeneous group of equally long tensor lists, ready for a kernel:
// every tensor is dense, lists[k][i] has the layout of lists[0][i], one device, one dtype.
struct TensorLists {
  std::vector<std::vector<at::Tensor>> lists;
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> numels;
};

// `lists` are checked pairwise against lists[0]; names[k] is what the user called lists[k].
// `writable[k]` marks lists written in place: those must already be dense with lists[0]'s strides.
// Read-only tensors with another layout are copied into lists[0]'s layout.
TensorLists check_tensor_lists(
    const std::vector<at::TensorList>& lists,
    const std::vector<const char*>& names,
    const std::vector<bool>& writable);

// grad_sq_norm's lists: grads alone, or grads paired with params when adaptive.
TensorLists check_sq_norm_lists(at::TensorList grads, at::TensorList params, bool adaptive);

void check_rho_and_eps(double rho, double eps);

// An optional 0-dim (or one-element) floating tensor on `device`, converted to `dtype`.
std::optional<at::Tensor> check_scalar_tensor(
    const std::optional<at::Tensor>& t, const char* name, at::Device device, at::ScalarType dtype);

}  // namespace bisam
