// The element math of the fake-quant CUDA kernels (fake_quant.cu), SPEC section 1: torch-free and __host__ __device__,
// so that tests/test_cuda_host_math.py compiles this very code as host C++ (tests/cuda_host/host_math.cpp) and checks it
// against tests/reference.py on ties, clamp edges, infinities and NaN.
#pragma once

#include <cmath>
#include <type_traits>

#include "cuda/rounding.cuh"

namespace lowbit {
namespace cuda {

// v = (x - beta) / s, the unrounded quantization level.
LOWBIT_HD float lsq_level(float x, float s, float beta) { return div_rn(sub_rn(x, beta), s); }

LOWBIT_HD float fake_quant_value(float x, float s, float beta, float qmin, float qmax) {
  const float q = clamp_keep_nan(rintf(lsq_level(x, s, beta)), qmin, qmax);
  return add_rn(mul_rn(q, s), beta);
}

// Per-thread accumulator of dstep/doffset terms. float keeps the registers few; a thread adds at most 64 terms
// before the block combines them in double, which keeps the error near float epsilon of the sum of |terms|.
using Acc = float;

// acc += a * b with a single rounding (the product is not rounded before it is added).
LOWBIT_HD void accumulate(Acc& acc, float a, float b) {
  if constexpr (std::is_same_v<Acc, float>) {
    acc = fmaf(a, b, acc);
  } else {
    acc = fma(static_cast<double>(a), static_cast<double>(b), acc);
  }
}

// One element of the backward: returns dx and adds this element's terms of dstep and doffset (before grad_scale).
// dx and the offset term are selects (inside ? g : 0), as in the tests' NumPy reference, so a non-finite g outside the
// range does not leak into them as g * 0 = NaN would.
LOWBIT_HD float fake_quant_grad(float x, float g, float s, float beta, float qmin, float qmax, Acc& acc_step,
                                Acc& acc_offset) {
  const float v = lsq_level(x, s, beta);
  const bool inside = (v >= qmin) && (v <= qmax);  // false for NaN
  const float dq_ds = inside ? sub_rn(rintf(v), v) : (v < qmin ? qmin : qmax);
  accumulate(acc_step, g, dq_ds);
  acc_offset += inside ? 0.0f : g;
  return inside ? g : 0.0f;
}

}  // namespace cuda
}  // namespace lowbit
