// The multi-tensor SAM ops as functors of the harness (multi_tensor_apply.cuh), and their launchers.
#include "cuda/multi_tensor_kernels.cuh"

#include "cuda/multi_tensor_apply.cuh"
#include "perturb_scale.h"

namespace bisam::cuda {
namespace {

constexpr int kFinalizeThreads = 1024;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

template <typename T, bool Adaptive>
__device__ __forceinline__ acc_t<T> squared_term(T g, T w) {
  acc_t<T> x = to_acc(g);
  if constexpr (Adaptive) x *= to_acc(w);
  return x * x;
}

// One partial sum of g^2 (or (w g)^2 when adaptive; lists: grads, params) per block.
template <typename T, bool Adaptive>
struct SqNormPartials {
  static constexpr bool kRunsWithoutTensors = false;
  acc_t<T>* partials;  // this launch's: indexed by blockIdx.x

  __device__ __forceinline__ void operator()(const Chunk<2>& c) const {
    acc_t<T> sum = 0;
    if constexpr (Adaptive) {
      for_each_element<4>(
          c.length, [&](T g, T w) { sum += squared_term<T, true>(g, w); }, In<T>{c.at<T>(0)}, In<T>{c.at<T>(1)});
    } else {
      for_each_element<4>(c.length, [&](T g) { sum += squared_term<T, false>(g, g); }, In<T>{c.at<T>(0)});
    }
    sum = block_sum<acc_t<T>, kBlockThreads>(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
  }
};

template <typename A>
__global__ void __launch_bounds__(kFinalizeThreads) sum_partials_kernel(const A* partials, int64_t n, A* out) {
  A sum = 0;
  for (int64_t k = threadIdx.x; k < n; k += kFinalizeThreads) sum += partials[k];
  sum = block_sum<A, kFinalizeThreads>(sum);
  if (threadIdx.x == 0) *out = sum;
}

template <typename T, bool Adaptive>
__device__ __forceinline__ T perturbed(T w, T g, acc_t<T> scale) {
  const acc_t<T> wa = to_acc(w);
  acc_t<T> step = scale * to_acc(g);
  if constexpr (Adaptive) step *= wa * wa;
  return from_acc<T>(wa + step);
}

// backup <- w and, when the scale is not 0, w <- w + scale * (w^2 if adaptive) * g (lists: params,
// grads, backups). Block 0 reports the norm; the first launch only gets norm_out.
template <typename T, bool Adaptive>
struct Perturb {
  static constexpr bool kRunsWithoutTensors = true;
  using A = acc_t<T>;
  const A* sq_norm;
  const A* rho_device;  // null: rho_value
  A rho_value;
  A eps;
  A* norm_out;  // null: not reported by this launch

  __device__ __forceinline__ void operator()(const Chunk<3>& c) const {
    const A norm = sqrt(*sq_norm);
    const A rho = rho_device != nullptr ? *rho_device : rho_value;
    if (norm_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *norm_out = reported_norm<A>(norm, rho);
    const A scale = perturb_scale<A>(norm, rho, eps);
    if (scale == A(0)) {  // skipped step: the backup alone, g not read
      for_each_element<2>(c.length, [](T w, T& backup) { backup = w; }, In<T>{c.at<T>(0)}, Out<T>{c.at<T>(2)});
    } else {
      for_each_element<2>(
          c.length,
          [scale](T& w, T g, T& backup) {
            backup = w;
            w = perturbed<T, Adaptive>(w, g, scale);
          },
          InOut<T>{c.at<T>(0)}, In<T>{c.at<T>(1)}, Out<T>{c.at<T>(2)});
    }
  }
};

// w <- backup, bit-exact (lists: params, backups).
template <typename T>
struct Restore {
  static constexpr bool kRunsWithoutTensors = false;

  __device__ __forceinline__ void operator()(const Chunk<2>& c) const {
    for_each_element<4>(c.length, [](T& w, T backup) { w = backup; }, Out<T>{c.at<T>(0)}, In<T>{c.at<T>(1)});
  }
};

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_type(ElementType type, F&& f) {
  switch (type) {
    case ElementType::kFloat32: return f(TypeTag<float>{});
    case ElementType::kFloat64: return f(TypeTag<double>{});
    case ElementType::kFloat16: return f(TypeTag<__half>{});
    case ElementType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  throw std::invalid_argument("bisam_kernels: unsupported element type");
}

template <typename F>
void dispatch_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace

int64_t sq_norm_workspace_size(const int64_t* numels, int n) {
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += chunk_count(numels[i]);
  return total;
}

void launch_sq_norm(
    ElementType type, bool adaptive, const void* const* grads, const void* const* params, const int64_t* numels,
    int n, void* workspace, void* out_sq_norm, bool large_kernel_args, cudaStream_t stream) {
  dispatch_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    auto* partials = static_cast<A*>(workspace);
    int64_t written = 0;
    dispatch_bool(adaptive, [&](auto adaptive_tag) {
      constexpr bool kAdaptive = decltype(adaptive_tag)::value;
      const std::array<const void* const*, 2> lists{grads, kAdaptive ? params : grads};
      multi_tensor_apply<2>("sq_norm partials", large_kernel_args, lists, numels, n, stream, [&](int blocks) {
        const SqNormPartials<T, kAdaptive> op{partials + written};
        written += blocks;
        return op;
      });
    });
    launch_kernel("sum_partials_kernel", sum_partials_kernel<A>, 1, kFinalizeThreads, stream,
                  static_cast<const A*>(partials), written, static_cast<A*>(out_sq_norm));
  });
}

void launch_perturb(
    ElementType type, bool adaptive, void* const* params, const void* const* grads, void* const* backups,
    const int64_t* numels, int n, const void* sq_norm, const void* rho_device, double rho, double eps,
    void* norm_out, bool large_kernel_args, cudaStream_t stream) {
  dispatch_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    dispatch_bool(adaptive, [&](auto adaptive_tag) {
      constexpr bool kAdaptive = decltype(adaptive_tag)::value;
      auto* norm_ptr = static_cast<A*>(norm_out);
      const std::array<const void* const*, 3> lists{params, grads, backups};
      multi_tensor_apply<3>("perturb", large_kernel_args, lists, numels, n, stream, [&](int) {
        const Perturb<T, kAdaptive> op{
            static_cast<const A*>(sq_norm), static_cast<const A*>(rho_device), static_cast<A>(rho),
            static_cast<A>(eps), norm_ptr};
        norm_ptr = nullptr;  // reported once
        return op;
      });
    });
  });
}

void launch_restore(
    ElementType type, void* const* params, const void* const* backups, const int64_t* numels, int n,
    bool large_kernel_args, cudaStream_t stream) {
  dispatch_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const std::array<const void* const*, 2> lists{params, backups};
    multi_tensor_apply<2>("restore", large_kernel_args, lists, numels, n, stream, [](int) { return Restore<T>{}; });
  });
}

}  // namespace bisam::cuda
