// Activation quantization of the packed GEMM, written once against the vector type `Vec` (simd_*.h); included
// inside each ISA namespace by packed_linear_<isa>.cpp. q = round-half-even(x / step) with IEEE float32
// division (never a multiplication by 1 / step); the driver clamps and records NaN rows.
#pragma once

template <class T>
void quantize_codes(const T* x, float* q, int64_t n, float step) {
  const typename Vec::Reg s = Vec::set1(step);
  int64_t i = 0;
  for (; i + Vec::kWidth <= n; i += Vec::kWidth) Vec::store(q + i, Vec::round(Vec::div(Vec::load(x + i), s)));
  for (; i < n; ++i) q[i] = ScalarVec::round(ScalarVec::div(ScalarVec::load(x + i), step));
}

inline void quantize_f32(const float* x, float* q, int64_t n, float step) { quantize_codes(x, q, n, step); }
inline void quantize_f16(const c10::Half* x, float* q, int64_t n, float step) { quantize_codes(x, q, n, step); }
inline void quantize_bf16(const c10::BFloat16* x, float* q, int64_t n, float step) { quantize_codes(x, q, n, step); }
