// Host-side launch helpers shared by the CUDA ops.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

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

}  // namespace cuda
}  // namespace lowbit
