// The integer depthwise rows (packed_depthwise_kernels.h) compiled for AVX2.
#include <cmath>
#include <cstdint>

#include "cpu/packed_depthwise.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace lowbit::cpu::depthwise_avx2 {

#include "cpu/packed_depthwise_kernels.h"

bool row(const void* args, int64_t b, int64_t oh, int32_t* acc, float* v) {
  return depthwise_row(*static_cast<const DepthwiseArgs*>(args), b, oh, acc, v);
}

}  // namespace lowbit::cpu::depthwise_avx2

#pragma GCC pop_options
