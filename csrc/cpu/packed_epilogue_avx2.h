// The folded epilogue (packed_epilogue.h) in AVX2 vectors, for the AVX2 kernels of the integer data path. Include
// it inside the ISA's namespace, after <immintrin.h>, <algorithm>, <cmath>, <type_traits> and packed_epilogue.h, in
// a file compiled under the avx2 target.
#pragma once

// 8 float32 values to 8 codes: clamp(rint(v / step), qlo, qhi) (IEEE division, round-half-even), as
// finish_values; NaN lanes give code 0 and set *nan (kMayNan false: the caller knows v holds no NaN).
template <bool kSignedOut, bool kMayNan = true>
inline void store_codes8(__m256 v, __m256 step, __m256 qlo, __m256 qhi, uint8_t* out, bool* nan) {
  __m256 q = _mm256_div_ps(v, step);
  if constexpr (kMayNan) {
    const __m256 is_nan = _mm256_cmp_ps(q, q, _CMP_UNORD_Q);
    *nan |= _mm256_movemask_ps(is_nan) != 0;
    q = _mm256_andnot_ps(is_nan, q);
  }
  q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm256_min_ps(_mm256_max_ps(q, qlo), qhi);
  const __m256i i32 = _mm256_cvtps_epi32(q);
  const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
  const __m128i i8 = kSignedOut ? _mm_packs_epi16(i16, i16) : _mm_packus_epi16(i16, i16);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), i8);
}

// Whether v = float32(acc) * scale + bias can be NaN for some int32 acc: only when a scale or bias is not finite
// (a finite product may overflow to +-inf, but inf + finite, the clamps and inf / step are never NaN).
inline bool affine_may_nan(const float* scale, const float* bias, int64_t count) {
  bool finite = true;
  for (int64_t j = 0; j < count; ++j) finite &= std::isfinite(scale[j]) && (bias == nullptr || std::isfinite(bias[j]));
  return !finite;
}

// code(v) = clamp(rint(clamp(v, lo, hi) / step), qmin, qmax) with one clamp: t -> rint(t / step) is
// non-decreasing (correctly rounded division by step > 0, then rounding), so it commutes with the clamp to
// [lo, hi], and the two clamps of the integer make one, to [max(qmin, f(lo)), min(qmax, f(hi))], or to the one
// value both clamps leave when those intervals do not meet. For NaN-free v only.
struct CodeBounds {
  float lower, upper;
};
inline CodeBounds code_bounds(const EpilogueSpec& spec) {
  const float f_lo = std::nearbyint(spec.lo / spec.out_step), f_hi = std::nearbyint(spec.hi / spec.out_step);
  const float q_lo = static_cast<float>(spec.out_qmin), q_hi = static_cast<float>(spec.out_qmax);
  if (f_hi < q_lo) return {q_lo, q_lo};
  if (f_lo > q_hi) return {q_hi, q_hi};
  return {std::max(q_lo, f_lo), std::min(q_hi, f_hi)};
}

// The codes of out[j] for j below the largest multiple of 32 of count, 32 at a time (one 32-byte store); returns
// that multiple. NaN-free values only (epilogue_avx2's kMayNan false).
inline int64_t codes32(const int32_t* acc, int64_t count, const float* scale, const float* bias,
                       const EpilogueSpec& spec, uint8_t* out, bool signed_out) {
  const CodeBounds b = code_bounds(spec);
  const __m256 lower = _mm256_set1_ps(b.lower), upper = _mm256_set1_ps(b.upper);
  const __m256 step = _mm256_set1_ps(spec.out_step);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the per-lane packing
  int64_t j = 0;
  for (; j + 32 <= count; j += 32) {
    __m256i q[4];
    for (int u = 0; u < 4; ++u) {
      const int64_t o = j + 8 * u;
      __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + o))),
                               _mm256_loadu_ps(scale + o));
      if (bias) x = _mm256_add_ps(x, _mm256_loadu_ps(bias + o));
      x = _mm256_round_ps(_mm256_div_ps(x, step), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[u] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(x, lower), upper));
    }
    const __m256i a = _mm256_packs_epi32(q[0], q[1]), c = _mm256_packs_epi32(q[2], q[3]);
    const __m256i bytes = signed_out ? _mm256_packs_epi16(a, c) : _mm256_packus_epi16(a, c);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_permutevar8x32_epi32(bytes, order));
  }
  return j;
}

// out[j] for j < count from the int32 sums: float32(acc) * scale (+ bias), clamp to [lo, hi] (NaN stays NaN),
// then float32 or codes. Eight at a time, the rest through finish_values; the same operations in the same order as
// packed_epilogue.h, so every lane rounds as the scalar code does. kMayNan false (affine_may_nan is false) drops
// the NaN test of the codes and runs codes32 first.
template <class O, bool kMayNan = true>
bool epilogue_avx2(const int32_t* acc, int64_t count, const float* scale, const float* bias,
                   const EpilogueSpec& spec, float* v, O* y) {
  const __m256 lo = _mm256_set1_ps(spec.lo), hi = _mm256_set1_ps(spec.hi), step = _mm256_set1_ps(spec.out_step);
  const __m256 qlo = _mm256_set1_ps(static_cast<float>(spec.out_qmin));
  const __m256 qhi = _mm256_set1_ps(static_cast<float>(spec.out_qmax));
  bool nan = false;
  int64_t j = 0;
  if constexpr (!std::is_same_v<O, float> && !kMayNan) {
    j = codes32(acc, count, scale, bias, spec, reinterpret_cast<uint8_t*>(y), std::is_signed_v<O>);
  }
  for (; j + 8 <= count; j += 8) {
    const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j));
    __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_loadu_ps(scale + j));
    if (bias) x = _mm256_add_ps(x, _mm256_loadu_ps(bias + j));
    x = _mm256_min_ps(hi, _mm256_max_ps(lo, x));  // max(lo, NaN) and min(hi, NaN) return the NaN
    if constexpr (std::is_same_v<O, float>) {
      _mm256_storeu_ps(y + j, x);
    } else {
      store_codes8<std::is_signed_v<O>, kMayNan>(x, step, qlo, qhi, reinterpret_cast<uint8_t*>(y + j), &nan);
    }
  }
  for (int64_t t = j; t < count; ++t) {
    v[t - j] = static_cast<float>(acc[t]) * scale[t];
    if (bias) v[t - j] = v[t - j] + bias[t];
  }
  return finish_values(v, count - j, spec, y + j) || nan;
}

