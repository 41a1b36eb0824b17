// Host-side launch helpers shared by the CUDA ops.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace lowbit {
namespace cuda {

// 16-byte aligned: the kernels then load and store whole vectors.
inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count > 0 ? count : 1;
}

// A 1-D grid of `blocks`, or a clear error when it does not fit a CUDA grid.
inline unsigned int grid_size(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks >= 1 && blocks <= std::numeric_limits<int32_t>::max(), "lowbit._C.cuda: ", what, " needs ",
              blocks, " blocks, more than a CUDA grid holds");
  return static_cast<unsigned int>(blocks);
}

// The grid of a grid-stride elementwise kernel over `vectors` vectors, `threads` a block: one vector a thread
// while that fills `blocks_per_sm` blocks on every multiprocessor, then capped there (the threads loop).
inline unsigned int elementwise_grid(int64_t vectors, int threads, int blocks_per_sm, int device, const char* what) {
  const int64_t wanted = (std::max<int64_t>(vectors, 1) + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(multiprocessor_count(device)) * blocks_per_sm;
  return grid_size(std::min(wanted, cap), what);
}

}  // namespace cuda
}  // namespace lowbit
