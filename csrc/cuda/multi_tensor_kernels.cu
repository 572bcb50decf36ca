// Multi-tensor SAM kernels. A tensor list is one flattened vector cut into chunks; each launch
// carries up to kMaxTensors tensor addresses in its kernel arguments, and every thread block finds
// its (tensor, chunk) by a binary search over the per-tensor block counts. Lists too long for one
// launch's arguments take a few launches (O(tensors / kMaxTensors), never one per tensor).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/multi_tensor_kernels.cuh"
#include "perturb_scale.h"

namespace bisam::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kFinalizeThreads = 1024;
// Kernel parameters stay under the classic 4 KiB limit with room for the other arguments.
constexpr int kListArgBytes = 3968;

template <int Depth>
struct ListChunkArgs {
  static constexpr int kMaxTensors = kListArgBytes / (Depth * sizeof(void*) + sizeof(int64_t) + sizeof(int));
  void* ptrs[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int block_end[kMaxTensors];  // running total of blocks up to and including tensor i, in this launch
  int num_tensors;
};
static_assert(sizeof(ListChunkArgs<3>) + 64 <= 4096, "kernel arguments over 4 KiB");
static_assert(sizeof(ListChunkArgs<2>) + 64 <= 4096, "kernel arguments over 4 KiB");

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

// 16 bytes: one vector load or store.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

struct BlockChunk {
  int tensor;
  int64_t start;
  int64_t length;
};

template <int Depth>
__device__ __forceinline__ BlockChunk locate_chunk(const ListChunkArgs<Depth>& args) {
  const int block = blockIdx.x;
  int lo = 0;
  int hi = args.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (block < args.block_end[mid]) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int first_block = lo == 0 ? 0 : args.block_end[lo - 1];
  const int64_t start = static_cast<int64_t>(block - first_block) * kChunkElements;
  const int64_t remaining = args.numel[lo] - start;
  return {lo, start, remaining < kChunkElements ? remaining : kChunkElements};
}

// Fixed shuffle tree then fixed warp order: the same inputs give the same bits. Result in thread 0.
template <typename A, int Threads>
__device__ __forceinline__ A block_sum(A v) {
  static_assert(Threads % 32 == 0 && Threads <= 1024, "block size");
  __shared__ A warp_sums[Threads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < Threads / 32 ? warp_sums[lane] : A(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T, bool Adaptive>
__device__ __forceinline__ acc_t<T> squared_term(T g, T w) {
  acc_t<T> x = to_acc(g);
  if constexpr (Adaptive) x *= to_acc(w);
  return x * x;
}

// One partial sum of g^2 (or (w g)^2) per block, written to partials[blockIdx.x].
template <typename T, bool Adaptive>
__global__ void __launch_bounds__(kThreads) sq_norm_partials_kernel(ListChunkArgs<2> args, acc_t<T>* partials) {
  const BlockChunk c = locate_chunk(args);
  const T* g = static_cast<const T*>(args.ptrs[0][c.tensor]) + c.start;
  const T* w = static_cast<const T*>(args.ptrs[1][c.tensor]) + c.start;
  acc_t<T> sum = 0;
  int64_t scalar_from = 0;
  if (aligned16(g) && (!Adaptive || aligned16(w))) {
    constexpr int V = Vec<T>::kSize;
    const int64_t num_vec = c.length / V;
    const auto* gv = reinterpret_cast<const Vec<T>*>(g);
    const auto* wv = reinterpret_cast<const Vec<T>*>(w);
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < num_vec; k += kThreads) {
      const Vec<T> gk = gv[k];
      const Vec<T> wk = Adaptive ? wv[k] : gk;
#pragma unroll
      for (int j = 0; j < V; ++j) sum += squared_term<T, Adaptive>(gk.v[j], wk.v[j]);
    }
    scalar_from = num_vec * V;
  }
  for (int64_t k = scalar_from + threadIdx.x; k < c.length; k += kThreads) {
    sum += squared_term<T, Adaptive>(g[k], Adaptive ? w[k] : g[k]);
  }
  sum = block_sum<acc_t<T>, kThreads>(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

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

// backup <- w and, when scale != 0, w <- w + scale * (w^2) * g over one chunk.
// The checks reject aliasing between the lists, so the pointers may be __restrict__ (loads can be
// hoisted above stores).
template <typename T, bool Adaptive, bool Update>
__device__ __forceinline__ void perturb_chunk(
    T* __restrict__ w, const T* __restrict__ g, T* __restrict__ backup, int64_t n, acc_t<T> scale) {
  int64_t scalar_from = 0;
  if (aligned16(w) && aligned16(backup) && (!Update || aligned16(g))) {
    constexpr int V = Vec<T>::kSize;
    const int64_t num_vec = n / V;
    auto* wv = reinterpret_cast<Vec<T>*>(w);
    const auto* gv = reinterpret_cast<const Vec<T>*>(g);
    auto* bv = reinterpret_cast<Vec<T>*>(backup);
#pragma unroll 2
    for (int64_t k = threadIdx.x; k < num_vec; k += kThreads) {
      Vec<T> wk = wv[k];
      if constexpr (Update) {
        const Vec<T> gk = gv[k];  // both loads issued before the stores
        bv[k] = wk;
#pragma unroll
        for (int j = 0; j < V; ++j) wk.v[j] = perturbed<T, Adaptive>(wk.v[j], gk.v[j], scale);
        wv[k] = wk;
      } else {
        bv[k] = wk;
      }
    }
    scalar_from = num_vec * V;
  }
  for (int64_t k = scalar_from + threadIdx.x; k < n; k += kThreads) {
    const T wk = w[k];
    backup[k] = wk;
    if constexpr (Update) w[k] = perturbed<T, Adaptive>(wk, g[k], scale);
  }
}

template <typename T, bool Adaptive>
__global__ void __launch_bounds__(kThreads) perturb_kernel(
    ListChunkArgs<3> args, const acc_t<T>* sq_norm, const acc_t<T>* rho_device, acc_t<T> rho_value, acc_t<T> eps,
    acc_t<T>* norm_out) {
  using A = acc_t<T>;
  const A norm = sqrt(*sq_norm);
  const A rho = rho_device != nullptr ? *rho_device : rho_value;
  if (norm_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *norm_out = reported_norm<A>(norm, rho);
  if (args.num_tensors == 0) return;
  const A scale = perturb_scale<A>(norm, rho, eps);
  const BlockChunk c = locate_chunk(args);
  T* w = static_cast<T*>(args.ptrs[0][c.tensor]) + c.start;
  const T* g = static_cast<const T*>(args.ptrs[1][c.tensor]) + c.start;
  T* backup = static_cast<T*>(args.ptrs[2][c.tensor]) + c.start;
  if (scale == A(0)) {
    perturb_chunk<T, Adaptive, false>(w, g, backup, c.length, scale);  // skipped step: weights untouched
  } else {
    perturb_chunk<T, Adaptive, true>(w, g, backup, c.length, scale);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) restore_kernel(ListChunkArgs<2> args) {
  const BlockChunk c = locate_chunk(args);
  T* w = static_cast<T*>(args.ptrs[0][c.tensor]) + c.start;
  const T* backup = static_cast<const T*>(args.ptrs[1][c.tensor]) + c.start;
  int64_t scalar_from = 0;
  if (aligned16(w) && aligned16(backup)) {
    constexpr int V = Vec<T>::kSize;
    const int64_t num_vec = c.length / V;
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < num_vec; k += kThreads) {
      reinterpret_cast<Vec<T>*>(w)[k] = reinterpret_cast<const Vec<T>*>(backup)[k];
    }
    scalar_from = num_vec * V;
  }
  for (int64_t k = scalar_from + threadIdx.x; k < c.length; k += kThreads) w[k] = backup[k];
}

// ---- host side ----

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("bisam_kernels: launching ") + kernel + " failed: " + cudaGetErrorString(err));
  }
}

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

// Packs the lists into as few launches as the argument limits allow; launch(args, blocks) per pack.
// Empty tensors get no blocks. Returns the number of launches.
template <int Depth, typename Launch>
int for_each_launch(const std::array<const void* const*, Depth>& lists, const int64_t* numels, int n, Launch&& launch) {
  using Args = ListChunkArgs<Depth>;
  Args args{};
  int packed = 0;
  int64_t blocks = 0;
  int launches = 0;
  auto flush = [&] {
    args.num_tensors = packed;
    launch(args, static_cast<int>(blocks));
    ++launches;
    packed = 0;
    blocks = 0;
  };
  for (int i = 0; i < n; ++i) {
    const int64_t chunks = chunk_count(numels[i]);
    if (chunks == 0) continue;
    if (chunks > INT_MAX) throw std::invalid_argument("bisam_kernels: tensor too large for one grid");
    if (packed == Args::kMaxTensors || blocks + chunks > INT_MAX) flush();
    for (int d = 0; d < Depth; ++d) args.ptrs[d][packed] = const_cast<void*>(lists[d][i]);
    args.numel[packed] = numels[i];
    blocks += chunks;
    args.block_end[packed] = static_cast<int>(blocks);
    ++packed;
  }
  if (packed > 0) flush();
  return launches;
}

}  // namespace

int64_t sq_norm_workspace_size(const int64_t* numels, int n) {
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += chunk_count(numels[i]);
  return total;
}

void launch_sq_norm(
    ElementType type, bool adaptive, const void* const* grads, const void* const* params, const int64_t* numels,
    int n, void* workspace, void* out_sq_norm, cudaStream_t stream) {
  dispatch_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    auto* partials = static_cast<A*>(workspace);
    int64_t written = 0;
    dispatch_bool(adaptive, [&](auto adaptive_tag) {
      constexpr bool kAdaptive = decltype(adaptive_tag)::value;
      const std::array<const void* const*, 2> lists{grads, kAdaptive ? params : grads};
      for_each_launch<2>(lists, numels, n, [&](const ListChunkArgs<2>& args, int blocks) {
        sq_norm_partials_kernel<T, kAdaptive><<<blocks, kThreads, 0, stream>>>(args, partials + written);
        check_launch("sq_norm_partials_kernel");
        written += blocks;
      });
    });
    sum_partials_kernel<A><<<1, kFinalizeThreads, 0, stream>>>(partials, written, static_cast<A*>(out_sq_norm));
    check_launch("sum_partials_kernel");
  });
}

void launch_perturb(
    ElementType type, bool adaptive, void* const* params, const void* const* grads, void* const* backups,
    const int64_t* numels, int n, const void* sq_norm, const void* rho_device, double rho, double eps,
    void* norm_out, cudaStream_t stream) {
  dispatch_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    dispatch_bool(adaptive, [&](auto adaptive_tag) {
      constexpr bool kAdaptive = decltype(adaptive_tag)::value;
      auto* norm_ptr = static_cast<A*>(norm_out);  // written by the first launch only
      auto launch = [&](const ListChunkArgs<3>& args, int blocks) {
        perturb_kernel<T, kAdaptive><<<blocks, kThreads, 0, stream>>>(
            args, static_cast<const A*>(sq_norm), static_cast<const A*>(rho_device), static_cast<A>(rho),
            static_cast<A>(eps), norm_ptr);
        check_launch("perturb_kernel");
        norm_ptr = nullptr;
      };
      const std::array<const void* const*, 3> lists{params, grads, backups};
      if (for_each_launch<3>(lists, numels, n, launch) == 0) {
        launch(ListChunkArgs<3>{}, 1);  // only empty tensors: one block still reports the norm
      }
    });
  });
}

void launch_restore(
    ElementType type, void* const* params, const void* const* backups, const int64_t* numels, int n,
    cudaStream_t stream) {
  dispatch_type(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const std::array<const void* const*, 2> lists{params, backups};
    for_each_launch<2>(lists, numels, n, [&](const ListChunkArgs<2>& args, int blocks) {
      restore_kernel<T><<<blocks, kThreads, 0, stream>>>(args);
      check_launch("restore_kernel");
    });
  });
}

}  // namespace bisam::cuda
