// The integer data path's epilogue (issue 17), shared by the packed GEMM driver and the depthwise kernels.
//
// A packed layer whose batch-norm (and bias) is folded into it computes, per output value,
//   v = float32(acc) * scale[n] + bias[n]        (float32 multiply, then add; never fused)
//   v = min(max(v, lo), hi)                      (the folded ReLU / ReLU6; lo = -inf, hi = +inf for none)
// and then either stores v (float32 output) or, when the next layer's activation quantizer is fused too,
//   code = clamp(rint(v / out_step), out_qmin, out_qmax)   (IEEE division, round-half-even: SPEC section 1)
// as uint8 (out_qmin >= 0) or int8 codes. A NaN v gives code 0 and sets `nan` (the driver raises ValueError).
// Header-only, and included inside each ISA's namespace, so every instantiation is compiled for its ISA.
#pragma once

#include <cmath>
#include <cstdint>

struct EpilogueSpec {
  float lo, hi;      // clamp of v (the folded activation)
  float out_step;    // > 0: emit codes at this step; 0: emit float32
  int32_t out_qmin, out_qmax;
  bool clamps() const { return !(std::isinf(lo) && lo < 0 && std::isinf(hi) && hi > 0); }
};

// rint(q) (round-half-even) for q first limited to [-4096, 4096], which the code clamp that follows makes
// harmless: adding 1.5 * 2^23 puts q where the float32 spacing is 1, so the addition rounds it to an integer,
// ties to even, and the subtraction is exact. Vectorises without SSE4.1's roundps (the driver's baseline build).
inline float round_even_clamped(float q) {
  q = q < -4096.f ? -4096.f : (q > 4096.f ? 4096.f : q);
  return (q + 12582912.f) - 12582912.f;
}

// v[j] (j < n, float32 values of the folded affine map) to out[j] under spec; returns true if a NaN was coded.
template <class O>
inline bool finish_values(const float* v, int64_t n, const EpilogueSpec& spec, O* out) {
  if (spec.out_step > 0.f) {
    // branch-free, so the compiler vectorises it: NaN is counted, not branched on
    const float qlo = static_cast<float>(spec.out_qmin), qhi = static_cast<float>(spec.out_qmax);
    const float lo = spec.lo, hi = spec.hi, step = spec.out_step;
    int32_t nans = 0;
    for (int64_t j = 0; j < n; ++j) {
      float x = v[j];
      x = x < lo ? lo : x;
      x = x > hi ? hi : x;
      float q = x / step;
      nans += q != q;
      q = q == q ? q : 0.f;
      q = round_even_clamped(q);
      q = q < qlo ? qlo : (q > qhi ? qhi : q);
      out[j] = static_cast<O>(static_cast<int32_t>(q));
    }
    return nans != 0;
  }
  for (int64_t j = 0; j < n; ++j) {
    float x = v[j];
    x = x < spec.lo ? spec.lo : x;  // NaN stays NaN (both comparisons are false)
    x = x > spec.hi ? spec.hi : x;
    out[j] = static_cast<O>(x);
  }
  return false;
}
