// CPU backend of the multi-tensor SAM ops: at::parallel_for over fixed-size chunks of the
// flattened tensor list. Partial sums are per chunk and combined in chunk order, so results
// do not depend on the thread count (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "multi_tensor_checks.h"
#include "perturb_scale.h"

namespace bisam {
namespace {

constexpr int64_t kChunkElements = 16384;
constexpr int kLanes = 16;  // independent accumulators: lets the compiler vectorise a fixed-order sum

struct Chunk {
  size_t tensor;
  int64_t start;
  int64_t length;
};

std::vector<Chunk> split_into_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t start = 0; start < numels[i]; start += kChunkElements) {
      chunks.push_back({i, start, std::min(kChunkElements, numels[i] - start)});
    }
  }
  return chunks;
}

template <typename scalar_t>
scalar_t* data_at(const at::Tensor& t, const Chunk& c) {
  return static_cast<scalar_t*>(t.data_ptr()) + c.start;
}

template <typename scalar_t, bool Adaptive>
at::opmath_type<scalar_t> chunk_sq_sum(const scalar_t* g, const scalar_t* w, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      acc_t x = static_cast<acc_t>(g[i + j]);
      if (Adaptive) x *= static_cast<acc_t>(w[i + j]);
      lanes[j] += x * x;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    acc_t x = static_cast<acc_t>(g[i]);
    if (Adaptive) x *= static_cast<acc_t>(w[i]);
    lanes[j] += x * x;
  }
  acc_t sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  return sum;
}

// Sum of g^2 (or (w*g)^2) over validated lists: lists[0] = grads, lists[1] = params if adaptive.
template <typename scalar_t>
at::opmath_type<scalar_t> sq_sum(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>* params,
                                 const std::vector<Chunk>& chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> partials(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Chunk& c = chunks[k];
      const scalar_t* g = data_at<scalar_t>(grads[c.tensor], c);
      partials[k] = params ? chunk_sq_sum<scalar_t, true>(g, data_at<scalar_t>((*params)[c.tensor], c), c.length)
                           : chunk_sq_sum<scalar_t, false>(g, nullptr, c.length);
    }
  });
  acc_t total = 0;
  for (acc_t p : partials) total += p;
  return total;
}

template <typename scalar_t, bool Adaptive>
void chunk_perturb(scalar_t* w, const scalar_t* g, scalar_t* backup, int64_t n, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t wi = w[i];
    backup[i] = wi;
    const acc_t wa = static_cast<acc_t>(wi);
    acc_t step = scale * static_cast<acc_t>(g[i]);
    if (Adaptive) step *= wa * wa;
    w[i] = static_cast<scalar_t>(wa + step);
  }
}

at::Tensor grad_sq_norm_cpu(at::TensorList grads, at::TensorList params, bool adaptive) {
  const TensorLists tl = check_sq_norm_lists(grads, params, adaptive);
  const auto chunks = split_into_chunks(tl.numels);
  at::Tensor out = at::empty({}, grads[0].options().dtype(accumulate_type(tl.dtype)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tl.dtype, "grad_sq_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    *out.data_ptr<acc_t>() = sq_sum<scalar_t>(tl.lists[0], adaptive ? &tl.lists[1] : nullptr, chunks);
  });
  return out;
}

at::Tensor sam_perturb_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList backups, double rho,
    const std::optional<at::Tensor>& rho_tensor, bool adaptive, double eps, const std::optional<at::Tensor>& sq_norm) {
  const PerturbArgs args = check_perturb_args(params, grads, backups, rho, rho_tensor, eps, sq_norm);
  const TensorLists& tl = args.tl;
  const auto& rho_t = args.rho;
  const auto& sq_t = args.sq_norm;
  const auto chunks = split_into_chunks(tl.numels);
  at::Tensor norm_out = at::empty({}, params[0].options().dtype(args.acc_type));
  const auto& w = tl.lists[0];
  const auto& g = tl.lists[1];
  const auto& b = tl.lists[2];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tl.dtype, "sam_perturb_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t sq = sq_t ? sq_t->item<acc_t>() : sq_sum<scalar_t>(g, adaptive ? &w : nullptr, chunks);
    const acc_t norm = std::sqrt(sq);
    const acc_t rho_value = rho_t ? rho_t->item<acc_t>() : static_cast<acc_t>(rho);
    const acc_t scale = perturb_scale<acc_t>(norm, rho_value, static_cast<acc_t>(eps));
    *norm_out.data_ptr<acc_t>() = reported_norm<acc_t>(norm, rho_value);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const Chunk& c = chunks[k];
        scalar_t* wp = data_at<scalar_t>(w[c.tensor], c);
        scalar_t* bp = data_at<scalar_t>(b[c.tensor], c);
        const scalar_t* gp = data_at<scalar_t>(g[c.tensor], c);
        if (scale == acc_t(0)) {
          std::memcpy(bp, wp, c.length * sizeof(scalar_t));  // skipped step: weights stay bit-identical
        } else if (adaptive) {
          chunk_perturb<scalar_t, true>(wp, gp, bp, c.length, scale);
        } else {
          chunk_perturb<scalar_t, false>(wp, gp, bp, c.length, scale);
        }
      }
    });
  });
  return norm_out;
}

void sam_restore_cpu(at::TensorList params, at::TensorList backups) {
  const TensorLists tl = check_tensor_lists({params, backups}, {"params", "backups"}, {true, false});
  const auto chunks = split_into_chunks(tl.numels);
  const size_t element_size = at::elementSize(tl.dtype);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Chunk& c = chunks[k];
      std::memcpy(
          static_cast<char*>(tl.lists[0][c.tensor].data_ptr()) + c.start * element_size,
          static_cast<const char*>(tl.lists[1][c.tensor].data_ptr()) + c.start * element_size,
          c.length * element_size);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(bisam, CPU, m) {
  m.impl("grad_sq_norm", &grad_sq_norm_cpu);
  m.impl("sam_perturb_", &sam_perturb_cpu);
  m.impl("sam_restore_", &sam_restore_cpu);
}

}  // namespace bisam
