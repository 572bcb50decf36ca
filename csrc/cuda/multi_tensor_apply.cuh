// The multi-tensor harness: every SAM kernel is an op (a small functor) run by multi_tensor_apply.
// A tensor list is one flattened vector cut into chunks of kChunkElements; each launch carries up to
// TensorListArgs::kMaxTensors tensor addresses in its kernel arguments, and every thread block finds
// its (tensor, chunk) by a binary search over the per-tensor block counts. Lists too long for one
// launch's arguments take a few launches (O(tensors / kMaxTensors), never one per tensor).
// Compiled by nvcc, or by the host compiler against the CPU emulation (docs/design.md section 9).
#pragma once

#if defined(BISAM_CUDA_EMULATION)
#include "emulated/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <array>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace bisam::cuda {

// Each thread block owns one chunk of one tensor; reductions keep one partial per block.
constexpr int64_t kChunkElements = 16384;
constexpr int kBlockThreads = 256;

inline int64_t chunk_count(int64_t numel) {
  return (numel + kChunkElements - 1) / kChunkElements;
}

// Kernel argument budgets: the classic 4 KiB, and the 32764 bytes of CUDA 12.1+ on Volta and newer
// (sam_perturb_cuda.cpp picks one at run time, as torch's MultiTensorApply.cuh does). A build with
// an older toolkit has the classic kernels only.
constexpr int kClassicArgBytes = 4096;
constexpr int kLargeArgBytes = 32764;
constexpr bool kLargeArgsBuilt = CUDART_VERSION >= 12010;
// What an op and the launch may take besides the lists.
constexpr int kOpArgBytes = 128;

template <int Depth, int ArgBytes>
struct TensorListArgs {
  static constexpr int kMaxTensors =
      (ArgBytes - kOpArgBytes) / (Depth * sizeof(void*) + sizeof(int64_t) + sizeof(int));
  void* ptrs[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int block_end[kMaxTensors];  // running total of blocks up to and including tensor i, in this launch
  int num_tensors;
};

// One block's share of the lists: `length` elements of tensor `tensor` from element `start` (all 0,
// with null bases, in the one-block launch of an op that runs without tensors).
template <int Depth>
struct Chunk {
  void* base[Depth];
  int64_t start;
  int64_t length;

  template <typename T>
  __device__ __forceinline__ T* at(int list) const {
    return static_cast<T*>(base[list]) + start;
  }
};

template <int Depth, int ArgBytes>
__device__ __forceinline__ Chunk<Depth> locate_chunk(const TensorListArgs<Depth, ArgBytes>& args) {
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
  Chunk<Depth> c;
  for (int d = 0; d < Depth; ++d) c.base[d] = args.ptrs[d][lo];
  c.start = static_cast<int64_t>(block - first_block) * kChunkElements;
  const int64_t remaining = args.numel[lo] - c.start;
  c.length = remaining < kChunkElements ? remaining : kChunkElements;
  return c;
}

template <typename Op, int Depth, int ArgBytes>
__global__ void __launch_bounds__(kBlockThreads) multi_tensor_kernel(TensorListArgs<Depth, ArgBytes> args, Op op) {
  op(locate_chunk(args));
}

// 16 bytes: one vector load or store.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// One array an op reads (In), writes (Out) or both (InOut), with the registers for one element or
// one 16-byte vector of it.
template <typename T, bool Read, bool Write>
struct Operand {
  std::conditional_t<Write, T*, const T*> ptr;
  Vec<T> vec;
  T scalar;

  __device__ __forceinline__ bool aligned() const { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }
  __device__ __forceinline__ void load_vec(int64_t k) {
    if constexpr (Read) vec = reinterpret_cast<const Vec<T>*>(ptr)[k];
  }
  __device__ __forceinline__ void store_vec(int64_t k) {
    if constexpr (Write) reinterpret_cast<Vec<T>*>(ptr)[k] = vec;
  }
  __device__ __forceinline__ void load(int64_t k) {
    if constexpr (Read) scalar = ptr[k];
  }
  __device__ __forceinline__ void store(int64_t k) {
    if constexpr (Write) ptr[k] = scalar;
  }
};
template <typename T>
using In = Operand<T, true, false>;
template <typename T>
using Out = Operand<T, false, true>;
template <typename T>
using InOut = Operand<T, true, true>;

// f(x...) on every element of n-element arrays, the block's threads striding over them: by 16-byte
// vectors when every array is 16-byte aligned (every load of an element before any store), then
// element by element for the tail, or for all of it when some array is not aligned.
template <int Unroll, typename F, typename T, bool... Read, bool... Write>
__device__ __forceinline__ void for_each_element(int64_t n, F&& f, Operand<T, Read, Write>... x) {
  int64_t scalar_from = 0;
  if ((x.aligned() && ...)) {
    constexpr int V = Vec<T>::kSize;
    const int64_t num_vec = n / V;
#pragma unroll Unroll
    for (int64_t k = threadIdx.x; k < num_vec; k += kBlockThreads) {
      (x.load_vec(k), ...);
#pragma unroll
      for (int j = 0; j < V; ++j) f(x.vec.v[j]...);
      (x.store_vec(k), ...);
    }
    scalar_from = num_vec * V;
  }
  for (int64_t k = scalar_from + threadIdx.x; k < n; k += kBlockThreads) {
    (x.load(k), ...);
    f(x.scalar...);
    (x.store(k), ...);
  }
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

// ---- host side ----

// The one place kernels are launched (the CUDA runtime's launch, or the emulation's).
template <typename... Params, typename... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), int blocks, int threads, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("bisam_kernels: launching ") + name + " failed: " + cudaGetErrorString(err));
  }
}

// Packs the lists into as few launches as ArgBytes allows and calls launch(args, blocks) per pack.
// Empty tensors get no blocks; with no blocks at all, one empty launch when `launch_when_empty`.
template <int Depth, int ArgBytes, typename Launch>
void for_each_launch(const std::array<const void* const*, Depth>& lists, const int64_t* numels, int n,
                     bool launch_when_empty, Launch&& launch) {
  using Args = TensorListArgs<Depth, ArgBytes>;
  Args args{};
  int packed = 0;
  int64_t blocks = 0;
  auto flush = [&] {
    args.num_tensors = packed;
    launch(args, static_cast<int>(blocks));
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
  if (packed > 0) {
    flush();
  } else if (launch_when_empty) {
    launch(Args{}, 1);
  }
}

// Calls f(std::integral_constant<int, ArgBytes>) for the chosen budget.
template <typename F>
void dispatch_arg_bytes(bool large_kernel_args, F&& f) {
  if constexpr (kLargeArgsBuilt) {
    if (large_kernel_args) return f(std::integral_constant<int, kLargeArgBytes>{});
  }
  f(std::integral_constant<int, kClassicArgBytes>{});
}

// Runs an op over every chunk of the lists: next_op(blocks) gives each launch's functor (an op that
// writes per-block results learns where this launch's go). An op with kRunsWithoutTensors gets one
// block even when every tensor is empty (perturb still reports the norm).
template <int Depth, typename NextOp>
void multi_tensor_apply(const char* name, bool large_kernel_args, const std::array<const void* const*, Depth>& lists,
                        const int64_t* numels, int n, cudaStream_t stream, NextOp&& next_op) {
  dispatch_arg_bytes(large_kernel_args, [&](auto arg_bytes) {
    constexpr int kArgBytes = decltype(arg_bytes)::value;
    using Args = TensorListArgs<Depth, kArgBytes>;
    using Op = decltype(next_op(0));
    static_assert(sizeof(Args) + sizeof(Op) <= kArgBytes, "kernel arguments over the budget");
    for_each_launch<Depth, kArgBytes>(lists, numels, n, Op::kRunsWithoutTensors, [&](const Args& args, int blocks) {
      launch_kernel(name, multi_tensor_kernel<Op, Depth, kArgBytes>, blocks, kBlockThreads, stream, args,
                    next_op(blocks));
    });
  });
}

}  // namespace bisam::cuda
