// CPU backend of the multi-tensor SAM ops: at::parallel_for over fixed-size chunks of the
// flattened tensor list. Partial sums are per chunk and combined in chunk order, so results
// do not depend on the thread count (deterministic).
//
// The loops are written once and, on x86-64, compiled twice: for the baseline ISA and for AVX2,
// picked at run time. The lanes of every sum are fixed and the build forbids fused multiply-adds
// (-ffp-contract=off), so both give the same bits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the last-level cache size
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "multi_tensor_checks.h"
#include "perturb_scale.h"

namespace bisam {
namespace {

constexpr int64_t kChunkElements = 16384;
constexpr int kLanes = 32;  // independent accumulators: lets the compiler vectorise a fixed-order sum
// A read-only pass is bound by the misses one core keeps in flight; prefetching this far ahead
// keeps more in flight (the norm pass 1.15x faster).
constexpr int64_t kPrefetchBytes = 8192;
// Backups are copied in blocks this size, each followed by the update of the same block: streaming
// stores then alternate with the loads instead of saturating the write-combining buffers (1.3x).
constexpr int64_t kStreamBlockBytes = 1024;

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

// Lists too large to stay cached are written with non-temporal (streaming) stores, which skip the
// read-for-ownership of a cached store: a fifth of the perturbation's memory traffic and a third of
// the restore's. A backup is read only after a forward and backward pass, and the optimizer step that
// follows a restore reads the weights with the gradients and its own state (about four times the
// weights' bytes), so neither is still cached by then unless that fits in the last-level cache.
// BISAM_CPU_STREAMING_BYTES overrides the threshold (0: always stream), for tests and tuning.
bool streams_past_cache(int64_t bytes) {
  static const int64_t threshold = [] {
    if (const char* env = std::getenv("BISAM_CPU_STREAMING_BYTES")) return static_cast<int64_t>(std::atoll(env));
#if defined(_SC_LEVEL3_CACHE_SIZE)
    const long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (llc > 0) return static_cast<int64_t>(llc) / 4;
#endif
    return int64_t{8} << 20;
  }();
  return bytes > threshold;
}

int64_t total_bytes(const TensorLists& tl) {
  int64_t elements = 0;
  for (int64_t n : tl.numels) elements += n;
  return elements * static_cast<int64_t>(at::elementSize(tl.dtype));
}

// Streaming stores exist on every x86-64 CPU; elsewhere this is memcpy. Callers issue
// fence_streaming_stores before other threads may read dst.
void copy_block(void* dst, const void* src, size_t bytes, bool stream) {
#if defined(__SSE2__)
  if (stream) {
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    const size_t head = std::min(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
    std::memcpy(d, s, head);
    size_t i = head;
    for (; i + 16 <= bytes; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    }
    std::memcpy(d + i, s + i, bytes - i);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

void fence_streaming_stores() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define BISAM_CPU_AVX2 1
#define BISAM_INLINE __attribute__((always_inline)) inline
// An integer address: the prefetch may point past the end of the tensor (harmless; no pointer arithmetic).
#define BISAM_PREFETCH(address) __builtin_prefetch(reinterpret_cast<const void*>(address))
#else
#define BISAM_INLINE inline
#define BISAM_PREFETCH(address)
#endif

template <typename scalar_t, bool Adaptive>
BISAM_INLINE at::opmath_type<scalar_t> chunk_sq_sum(const scalar_t* g, const scalar_t* w, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t line = 0; line < kLanes * int64_t{sizeof(scalar_t)}; line += 64) {
      BISAM_PREFETCH(reinterpret_cast<uintptr_t>(g + i) + kPrefetchBytes + line);
      if (Adaptive) BISAM_PREFETCH(reinterpret_cast<uintptr_t>(w + i) + kPrefetchBytes + line);
    }
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

template <typename scalar_t, bool Adaptive>
BISAM_INLINE void chunk_perturb(
    scalar_t* w, const scalar_t* g, scalar_t* backup, int64_t n, at::opmath_type<scalar_t> scale, bool stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kBlock = kStreamBlockBytes / sizeof(scalar_t);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    copy_block(backup + start, w + start, (end - start) * sizeof(scalar_t), stream);
    for (int64_t i = start; i < end; ++i) {
      const acc_t wa = static_cast<acc_t>(w[i]);
      acc_t step = scale * static_cast<acc_t>(g[i]);
      if (Adaptive) step *= wa * wa;
      w[i] = static_cast<scalar_t>(wa + step);
    }
  }
}

#if BISAM_CPU_AVX2
template <typename scalar_t, bool Adaptive>
__attribute__((target("avx2"))) at::opmath_type<scalar_t> chunk_sq_sum_avx2(const scalar_t* g, const scalar_t* w, int64_t n) {
  return chunk_sq_sum<scalar_t, Adaptive>(g, w, n);
}

template <typename scalar_t, bool Adaptive>
__attribute__((target("avx2"))) void chunk_perturb_avx2(
    scalar_t* w, const scalar_t* g, scalar_t* backup, int64_t n, at::opmath_type<scalar_t> scale, bool stream) {
  chunk_perturb<scalar_t, Adaptive>(w, g, backup, n, scale, stream);
}

// __builtin_cpu_init first: this initialiser may run before the one that fills the CPU model.
// BISAM_CPU_CAPABILITY=default keeps the baseline build (the tests compare the two bit for bit).
const bool cpu_has_avx2 = [] {
  const char* env = std::getenv("BISAM_CPU_CAPABILITY");
  if (env && std::strcmp(env, "default") == 0) return false;
  __builtin_cpu_init();
  return static_cast<bool>(__builtin_cpu_supports("avx2"));
}();
#endif

template <typename scalar_t, bool Adaptive>
at::opmath_type<scalar_t> dispatch_sq_sum(const scalar_t* g, const scalar_t* w, int64_t n) {
#if BISAM_CPU_AVX2
  if (cpu_has_avx2) return chunk_sq_sum_avx2<scalar_t, Adaptive>(g, w, n);
#endif
  return chunk_sq_sum<scalar_t, Adaptive>(g, w, n);
}

template <typename scalar_t, bool Adaptive>
void dispatch_perturb(
    scalar_t* w, const scalar_t* g, scalar_t* backup, int64_t n, at::opmath_type<scalar_t> scale, bool stream) {
#if BISAM_CPU_AVX2
  if (cpu_has_avx2) return chunk_perturb_avx2<scalar_t, Adaptive>(w, g, backup, n, scale, stream);
#endif
  chunk_perturb<scalar_t, Adaptive>(w, g, backup, n, scale, stream);
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
      partials[k] = params ? dispatch_sq_sum<scalar_t, true>(g, data_at<scalar_t>((*params)[c.tensor], c), c.length)
                           : dispatch_sq_sum<scalar_t, false>(g, nullptr, c.length);
    }
  });
  acc_t total = 0;
  for (acc_t p : partials) total += p;
  return total;
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
  const bool stream = streams_past_cache(total_bytes(tl));
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
          copy_block(bp, wp, c.length * sizeof(scalar_t), stream);  // skipped step: weights stay bit-identical
        } else if (adaptive) {
          dispatch_perturb<scalar_t, true>(wp, gp, bp, c.length, scale, stream);
        } else {
          dispatch_perturb<scalar_t, false>(wp, gp, bp, c.length, scale, stream);
        }
      }
      fence_streaming_stores();
    });
  });
  return norm_out;
}

void sam_restore_cpu(at::TensorList params, at::TensorList backups) {
  const TensorLists tl = check_tensor_lists({params, backups}, {"params", "backups"}, {true, false});
  const auto chunks = split_into_chunks(tl.numels);
  const size_t element_size = at::elementSize(tl.dtype);
  const bool stream = streams_past_cache(total_bytes(tl));
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Chunk& c = chunks[k];
      void* dst = static_cast<char*>(tl.lists[0][c.tensor].data_ptr()) + c.start * element_size;
      const void* src = static_cast<const char*>(tl.lists[1][c.tensor].data_ptr()) + c.start * element_size;
      copy_block(dst, src, c.length * element_size, stream);
    }
    fence_streaming_stores();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(bisam, CPU, m) {
  m.impl("grad_sq_norm", &grad_sq_norm_cpu);
  m.impl("sam_perturb_", &sam_perturb_cpu);
  m.impl("sam_restore_", &sam_restore_cpu);
}

}  // namespace bisam
