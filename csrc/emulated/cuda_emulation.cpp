// The fiber scheduler behind cuda_emulation.h. One block at a time: its threads are fibers with their
// own stacks on this OS thread, switched by a few instructions (x86-64) rather than ucontext, whose
// signal-mask system call made a block of 256 threads cost milliseconds.
#include "emulated/cuda_emulation.h"

#include <sys/mman.h>
#include <xmmintrin.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA emulation switches fibers with x86-64 code"
#endif

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace {
thread_local std::string last_error;
}

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : last_error.c_str();
}

// Saves the callee-saved registers and the floating-point control words on the current stack, stores
// the stack pointer in *save, and continues on the stack `resume` (where the same was saved).
extern "C" void bisam_emulation_switch(void** save, void* resume);
asm(R"(
  .text
  .globl bisam_emulation_switch
  .hidden bisam_emulation_switch
  .type bisam_emulation_switch, @function
bisam_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size bisam_emulation_switch, .-bisam_emulation_switch
)");

namespace bisam::cuda_emulation {
namespace {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 128 << 10;  // the kernels' frames hold a copy of up to 32 KiB of arguments
constexpr size_t kGuardBytes = 4096;       // an overflow faults instead of corrupting the next stack

enum class Wait { kRunnable, kBlockBarrier, kWarpBarrier, kExited };

struct Fiber {
  void* sp = nullptr;
  Wait wait = Wait::kRunnable;
};

// Stacks for a block's fibers, mapped once per OS thread (again only for a larger block) and reused.
class StackPool {
 public:
  void reserve(size_t count) {
    if (count <= count_) return;
    if (base_ != nullptr) munmap(base_, count_ * kStride);
    void* p = mmap(nullptr, count * kStride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base_ = static_cast<char*>(p);
    count_ = count;
    for (size_t i = 0; i < count; ++i) mprotect(base_ + i * kStride, kGuardBytes, PROT_NONE);
  }
  char* top_of(size_t fiber) const { return base_ + (fiber + 1) * kStride; }

 private:
  static constexpr size_t kStride = kStackBytes + kGuardBytes;
  char* base_ = nullptr;
  size_t count_ = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<uint64_t> exchange;   // per warp: two buffers of 32 slots
  std::vector<int> exchange_parity; // per warp: the buffer the next shuffle writes
  void* scheduler_sp = nullptr;
  int current = 0;
  void (*body)(void*) = nullptr;
  void* context = nullptr;
};

thread_local Block* running = nullptr;
std::atomic<int64_t> launches{0};

void yield_to_scheduler() {
  Block& b = *running;
  bisam_emulation_switch(&b.fibers[b.current].sp, b.scheduler_sp);
}

void fiber_entry() {
  running->body(running->context);
  running->fibers[running->current].wait = Wait::kExited;
  yield_to_scheduler();  // never resumed
  __builtin_unreachable();
}

// A new fiber's stack, laid out as bisam_emulation_switch leaves a suspended one: it "returns" into
// fiber_entry with the stack aligned as after a call.
void* fresh_stack(char* top, uint32_t mxcsr, uint16_t x87_control) {
  auto** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;  // fiber_entry's return address: it never returns
  *--sp = reinterpret_cast<void*>(&fiber_entry);
  for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp, rbx, r12-r15
  --sp;
  auto* control = reinterpret_cast<uint32_t*>(sp);
  control[0] = mxcsr;  // the caller's rounding and denormal modes
  control[1] = x87_control;
  return sp;
}

// Releases the barriers every participant has reached; returns the fibers to run next.
std::vector<int> release_barriers(Block& b, bool& deadlock) {
  std::vector<int> ready;
  const int threads = static_cast<int>(b.fibers.size());
  int exited = 0;
  int at_block_barrier = 0;
  for (int warp = 0; warp < threads / kWarpSize; ++warp) {
    int at_warp_barrier = 0;
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const Wait w = b.fibers[warp * kWarpSize + lane].wait;
      at_warp_barrier += w == Wait::kWarpBarrier;
      at_block_barrier += w == Wait::kBlockBarrier;
      exited += w == Wait::kExited;
    }
    if (at_warp_barrier == kWarpSize) {
      b.exchange_parity[warp] ^= 1;
      for (int lane = 0; lane < kWarpSize; ++lane) ready.push_back(warp * kWarpSize + lane);
    }
  }
  if (at_block_barrier > 0 && at_block_barrier + exited == threads) {
    for (int t = 0; t < threads; ++t) {
      if (b.fibers[t].wait == Wait::kBlockBarrier) ready.push_back(t);
    }
  }
  for (int t : ready) b.fibers[t].wait = Wait::kRunnable;
  deadlock = ready.empty() && exited < threads;
  return ready;
}

}  // namespace

void barrier(bool warp_only) {
  running->fibers[running->current].wait = warp_only ? Wait::kWarpBarrier : Wait::kBlockBarrier;
  yield_to_scheduler();
}

uint64_t* warp_exchange_slots() {
  Block& b = *running;
  const int warp = b.current / kWarpSize;
  return &b.exchange[(2 * warp + b.exchange_parity[warp]) * kWarpSize];
}

int64_t launch_count() { return launches.load(); }

cudaError_t run_grid(const cudaLaunchConfig_t& config, void (*body)(void*), void* context) {
  const dim3 grid = config.gridDim;
  const dim3 block = config.blockDim;
  if (grid.x == 0) {
    last_error = "emulated launch: an empty grid (invalid configuration on a GPU)";
    return cudaErrorInvalidConfiguration;
  }
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1 || block.x == 0 || block.x % kWarpSize != 0 ||
      block.x > 1024 || config.dynamicSmemBytes != 0) {
    last_error = "emulated launch: 1-D grids of whole warps (up to 1024 threads), no dynamic shared memory";
    return cudaErrorInvalidValue;
  }
  ++launches;
  static thread_local StackPool stacks;
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  uint16_t x87_control = 0;
  asm volatile("fnstcw %0" : "=m"(x87_control));
  const uint32_t mxcsr = _mm_getcsr();

  const int threads = static_cast<int>(block.x);
  stacks.reserve(threads);
  Block b;
  b.fibers.resize(threads);
  b.exchange.resize(2 * threads);
  b.exchange_parity.resize(threads / kWarpSize);
  b.body = body;
  b.context = context;
  std::vector<unsigned> order(grid.x);
  std::iota(order.begin(), order.end(), 0u);
  std::shuffle(order.begin(), order.end(), rng);  // a block that relies on another's work fails

  running = &b;
  gridDim = grid;
  blockDim = block;
  cudaError_t result = cudaSuccess;
  for (const unsigned block_index : order) {
    blockIdx = dim3(block_index);
    for (int t = 0; t < threads; ++t) b.fibers[t] = {fresh_stack(stacks.top_of(t), mxcsr, x87_control), Wait::kRunnable};
    std::fill(b.exchange_parity.begin(), b.exchange_parity.end(), 0);
    std::vector<int> ready(threads);
    std::iota(ready.begin(), ready.end(), 0);
    bool deadlock = false;
    while (!ready.empty()) {
      std::shuffle(ready.begin(), ready.end(), rng);  // no thread may count on running before another
      for (const int t : ready) {
        b.current = t;
        threadIdx = dim3(t);
        bisam_emulation_switch(&b.scheduler_sp, b.fibers[t].sp);
      }
      ready = release_barriers(b, deadlock);
    }
    if (deadlock) {
      last_error = "emulated launch: a barrier that not every thread of the block (or lane of the warp) reached";
      result = cudaErrorLaunchFailure;
      break;
    }
  }
  running = nullptr;
  return result;
}

}  // namespace bisam::cuda_emulation
