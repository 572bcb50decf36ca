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
// `writable[k]` marks lists written in place: those must already be dense with lists[0]'s strides,
// and no tensor written in place may share memory with any other tensor of the call (blocks run
// concurrently: an alias would race). Read-only tensors with another layout are copied into
// lists[0]'s layout. `extra_inputs` are further read-only tensors checked for overlap.
TensorLists check_tensor_lists(
    const std::vector<at::TensorList>& lists,
    const std::vector<const char*>& names,
    const std::vector<bool>& writable,
    const std::vector<at::Tensor>& extra_inputs = {});

// grad_sq_norm's lists: grads alone, or grads paired with params when adaptive.
TensorLists check_sq_norm_lists(at::TensorList grads, at::TensorList params, bool adaptive);

// sam_perturb_'s arguments, validated: the lists (params, grads, backups), the accumulator dtype,
// and rho / sq_norm as one-element tensors of that dtype on the lists' device when given.
struct PerturbArgs {
  TensorLists tl;
  at::ScalarType acc_type;
  std::optional<at::Tensor> rho;
  std::optional<at::Tensor> sq_norm;
};

PerturbArgs check_perturb_args(
    at::TensorList params, at::TensorList grads, at::TensorList backups, double rho,
    const std::optional<at::Tensor>& rho_tensor, double eps, const std::optional<at::Tensor>& sq_norm);

}  // namespace bisam
