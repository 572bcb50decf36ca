// Test-only entry points of the emulated build: the harness's index arithmetic on the host, for
// tensors far too large to allocate, and the number of grids launched.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cuda/multi_tensor_apply.cuh"

namespace bisam {
namespace {

// For numels (no data behind them) packed as `depth` lists: one row per packed tensor and launch for
// its first and its last block, (launch, block, tensor, start, length), from the kernels' own
// for_each_launch and locate_chunk. The tensor index travels as a fake address.
template <int Depth>
at::Tensor chunk_map_of(const std::vector<int64_t>& numels, bool large_kernel_args) {
  std::vector<const void*> fake_addresses(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) fake_addresses[i] = reinterpret_cast<const void*>(16 * (i + 1));
  std::array<const void* const*, Depth> lists;
  lists.fill(fake_addresses.data());
  std::vector<int64_t> rows;
  int64_t launch = 0;
  cuda::dispatch_arg_bytes(large_kernel_args, [&](auto arg_bytes) {
    constexpr int kArgBytes = decltype(arg_bytes)::value;
    cuda::for_each_launch<Depth, kArgBytes>(
        lists, numels.data(), static_cast<int>(numels.size()), false,
        [&](const cuda::TensorListArgs<Depth, kArgBytes>& args, int blocks) {
          TORCH_CHECK(blocks == args.block_end[args.num_tensors - 1], "block count");
          for (int t = 0; t < args.num_tensors; ++t) {
            const int first = t == 0 ? 0 : args.block_end[t - 1];
            for (const int block : {first, args.block_end[t] - 1}) {
              blockIdx = dim3(block);
              const cuda::Chunk<Depth> c = cuda::locate_chunk(args);
              const auto address = reinterpret_cast<int64_t>(c.base[Depth - 1]);
              rows.insert(rows.end(), {launch, block, address / 16 - 1, c.start, c.length});
            }
          }
          ++launch;
        });
  });
  return at::tensor(rows, at::kLong).view({-1, 5});
}

at::Tensor chunk_map(std::vector<int64_t> numels, int64_t depth, bool large_kernel_args) {
  TORCH_CHECK(depth == 2 || depth == 3, "depth is 2 or 3");
  return depth == 2 ? chunk_map_of<2>(numels, large_kernel_args) : chunk_map_of<3>(numels, large_kernel_args);
}

int64_t launch_count() { return cuda_emulation::launch_count(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(bisam_cuda_emulated, m) {
  m.def("chunk_map", TORCH_FN(chunk_map));
  m.def("launch_count", TORCH_FN(launch_count));
}

}  // namespace bisam
