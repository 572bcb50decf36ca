// Just enough of the CUDA runtime and device language to compile csrc/cuda's kernels with the host
// compiler and run them on the CPU (docs/design.md section 9). Each block's threads run as cooperative
// fibers: a thread runs until it reaches __syncthreads() or a warp shuffle, so a barrier waits for
// every thread of the block (a shuffle for every lane of the warp), and between barriers the threads
// of a block run in a freshly shuffled order, as do the blocks of a grid. Code that reads shared
// memory without the barrier, exchanges lanes wrongly or depends on the order of blocks then gives
// wrong results here, as it could on a GPU. Speed, the memory model and races between blocks (they
// run one after another) are out of its reach.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <math.h>  // sqrt(float) and sqrt(double) in the global namespace, as CUDA's device library has

#define CUDART_VERSION 13000
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One variable per kernel instantiation; blocks run one after another, so it is the block's own.
#define __shared__ static

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running fiber's coordinates; the scheduler sets them before resuming a thread.
extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

// The same storage and round-to-nearest-even conversions as CUDA's types (and PyTorch's CPU kernels).
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half x) { return static_cast<float>(x); }
inline __half __float2half_rn(float x) { return __half(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
};
const char* cudaGetErrorString(cudaError_t error);

namespace bisam::cuda_emulation {

// CUDA 12.1+ on Volta and newer: a kernel's parameters may take up to 32764 bytes.
constexpr size_t kMaxKernelParamBytes = 32764;

// Runs body(context) once per thread of every block (1-D grids and blocks), blocks in a shuffled order.
cudaError_t run_grid(const cudaLaunchConfig_t& config, void (*body)(void*), void* context);

// Grids run since the library was loaded (the tests count launches with it).
int64_t launch_count();

// The running thread waits until every thread of its block (warp_only: of its warp) has arrived.
void barrier(bool warp_only);

// The exchange buffer of the running thread's warp for the next shuffle (two alternate, so a lane
// still reading one shuffle's values cannot see the next one's): 32 slots of 8 bytes.
uint64_t* warp_exchange_slots();

}  // namespace bisam::cuda_emulation

// The launch the kernels' launch helper makes (the runtime's C++ template of the same name).
template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel argument count");
  if ((0 + ... + sizeof(Params)) > bisam::cuda_emulation::kMaxKernelParamBytes) {
    return cudaErrorInvalidValue;
  }
  struct Launch {
    void (*kernel)(Params...);
    std::tuple<Params...> params;
  } launch{kernel, std::tuple<Params...>(std::forward<Args>(args)...)};
  return bisam::cuda_emulation::run_grid(*config, [](void* p) {
    auto* l = static_cast<Launch*>(p);
    std::apply(l->kernel, l->params);  // each thread gets the same arguments, by value
  }, &launch);
}

inline void __syncthreads() { bisam::cuda_emulation::barrier(false); }

// Every lane publishes its value, the warp meets, each lane reads its source lane's (its own when the
// source is past the warp). Only full warps take part in this code's shuffles.
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  if (mask != 0xffffffffu) __builtin_trap();  // the kernels shuffle full warps only
  uint64_t* slots = bisam::cuda_emulation::warp_exchange_slots();
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(&slots[lane], &value, sizeof(T));
  bisam::cuda_emulation::barrier(true);
  const unsigned source = lane + delta < 32 ? lane + delta : lane;
  T out;
  std::memcpy(&out, &slots[source], sizeof(T));
  return out;
}
