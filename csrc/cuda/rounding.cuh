// Float32 element math shared by the CUDA kernels: one IEEE rounding per operation and a NaN-keeping clamp.
//
// On the device the _rn intrinsics pin the rounding whatever -use_fast_math / -prec-div / -fmad flags the build
// uses; in particular no multiply-add is ever contracted into an FMA, since SPEC's q * s + beta is two roundings.
// Everything is __host__ __device__ so a host-side test can run the very same code.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif

namespace lowbit {
namespace cuda {

LOWBIT_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

LOWBIT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

LOWBIT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

LOWBIT_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Comparisons rather than fminf/fmaxf, which return the non-NaN operand and would turn NaN into qmin or qmax:
// NaN in x must reach y (SPEC section 6), as on the CPU (x86 min/max operand order) and in torch.clamp. Same result
// as the CPU's min(hi, max(lo, v)) for every input, signed zeros included.
LOWBIT_HD float clamp_keep_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The quantization level of x at step s: clamp(rint(x / s), lo, hi) with the IEEE quotient, round half to even
// (rintf, the default rounding mode on the host) and NaN kept; infinities land on lo or hi.
LOWBIT_HD float quantize_level(float x, float s, float lo, float hi) {
  return clamp_keep_nan(rintf(div_rn(x, s)), lo, hi);
}

}  // namespace cuda
}  // namespace lowbit
