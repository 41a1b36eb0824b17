// Element-span kernels of the fused LSQ quantizer, one table per ISA and dtype.
//
// The driver (fake_quant.cpp) splits a tensor into spans and threads; the kernels only see contiguous spans:
//   *_shared:   n elements that share one step and offset (per-tensor, or one row of a channel)
//   *_channels: n elements with their own step/offset arrays (channel axis innermost, params expanded)
// Backward kernels add their step/offset gradient sums (before grad_scale) into caller-owned accumulators.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>

#include "cpu/isa.h"

namespace lowbit::cpu {

// [lo, hi]: the integer range Qn..Qp. [clip_lo, clip_hi]: a hardtanh folded in front of the quantizer (a ReLU6
// whose only reader is this quantizer): x is clamped into it first and the gradient to x is zero outside
// (clip_lo, clip_hi), as hardtanh's. The infinite default leaves every value and gradient unchanged.
struct QuantRange {
  float lo;
  float hi;
  float clip_lo = -std::numeric_limits<float>::infinity();
  float clip_hi = std::numeric_limits<float>::infinity();
};

template <class T>
struct FakeQuantKernels {
  void (*forward_shared)(const T* x, T* y, int64_t n, float step, float offset, QuantRange range);
  void (*forward_channels)(const T* x, T* y, int64_t n, const float* step, const float* offset, QuantRange range);
  // sums[0] += sum g * dq/ds, sums[1] += sum g * dq/doffset (double: the caller combines many spans)
  void (*backward_shared)(const T* g, const T* x, T* dx, int64_t n, float step, float offset, QuantRange range,
                          double* sums);
  // acc_step[i] += g_i * dq/ds_i, acc_offset[i] += g_i * dq/doffset_i (float, flushed often by the caller)
  void (*backward_channels)(const T* g, const T* x, T* dx, int64_t n, const float* step, const float* offset,
                            QuantRange range, float* acc_step, float* acc_offset);
};

namespace avx512 {
template <class T>
FakeQuantKernels<T> fake_quant_kernels();
}
namespace avx2 {
template <class T>
FakeQuantKernels<T> fake_quant_kernels();
}
namespace scalar {
template <class T>
FakeQuantKernels<T> fake_quant_kernels();
}

template <class T>
FakeQuantKernels<T> fake_quant_kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return avx512::fake_quant_kernels<T>();
    case Isa::kAvx2: return avx2::fake_quant_kernels<T>();
    default: return scalar::fake_quant_kernels<T>();
  }
}

}  // namespace lowbit::cpu
