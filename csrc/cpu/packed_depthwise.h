// Per-ISA entry points of the integer depthwise convolution (packed_depthwise.cpp is the driver). `args` points
// at the DepthwiseArgs of packed_depthwise_kernels.h; returns true when a NaN was coded.
#pragma once

#include <cstdint>

namespace lowbit::cpu {
namespace depthwise_avx2 {
bool row(const void* args, int64_t b, int64_t oh, int32_t* acc, float* v);
}
namespace depthwise_baseline {
bool row(const void* args, int64_t b, int64_t oh, int32_t* acc, float* v);
}
}  // namespace lowbit::cpu
