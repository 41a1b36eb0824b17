// The panel GEMM's AVX2 kernel (packed_panel.h): 4 x rows by 16 channels per micro-tile, the folded epilogue.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/packed_panel.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace lowbit::cpu::panel_avx2 {

#include "cpu/packed_epilogue.h"
#include "cpu/packed_epilogue_avx2.h"

namespace {

constexpr int kRows = 4;  // x rows per micro-tile: 8 int32 accumulators of 16 channels, 2 weight vectors

inline __m256i broadcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// acc (+)= the 16 channel sums of MR rows over `quads` quads, then the tail bytes (k % 4 < 4, read safely).
template <int MR, bool kSigned>
void micro(const uint8_t* const* x, const uint8_t* panel, int64_t quads, int tail, __m256i offset, int32_t* out,
           int64_t out_stride) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  auto step = [&](const uint8_t* w, const __m256i* xb) {
    __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
    if constexpr (kSigned) w0 = _mm256_add_epi8(w0, offset), w1 = _mm256_add_epi8(w1, offset);
    for (int i = 0; i < MR; ++i) {
      const __m256i p0 = kSigned ? _mm256_maddubs_epi16(w0, xb[i]) : _mm256_maddubs_epi16(xb[i], w0);
      const __m256i p1 = kSigned ? _mm256_maddubs_epi16(w1, xb[i]) : _mm256_maddubs_epi16(xb[i], w1);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(p0, ones));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(p1, ones));
    }
  };
  __m256i xb[MR];
  for (int64_t q = 0; q < quads; ++q) {
    for (int i = 0; i < MR; ++i) xb[i] = broadcast4(x[i] + 4 * q);
    step(panel + 64 * q, xb);
  }
  if (tail) {  // the last k % 4 codes, zero-filled: never read past the row
    for (int i = 0; i < MR; ++i) {
      uint8_t bytes[4] = {0, 0, 0, 0};
      std::memcpy(bytes, x[i] + 4 * quads, static_cast<size_t>(tail));
      xb[i] = broadcast4(bytes);
    }
    step(panel + 64 * quads, xb);
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * out_stride), acc[i][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * out_stride + 8), acc[i][1]);
  }
}

template <bool kSigned>
void sums(const PanelArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* acc) {
  const int64_t quads = a.k / 4, panel_bytes = (a.k + 3) / 4 * 64;
  const int tail = static_cast<int>(a.k % 4);
  const __m256i offset = _mm256_set1_epi8(static_cast<char>(1 << (a.w_bits - 1)));
  for (int64_t c0 = n0; c0 < n1; c0 += 16) {  // one panel block stays in L1 while the rows pass it
    const uint8_t* panel = a.panel + (c0 / 16) * panel_bytes;
    int32_t* out = acc + (c0 - n0);
    int64_t i = m0;
    for (; i + kRows <= m1; i += kRows) {
      const uint8_t* rows[kRows];
      for (int r = 0; r < kRows; ++r) rows[r] = a.x + (i + r) * a.x_stride;
      micro<kRows, kSigned>(rows, panel, quads, tail, offset, out + (i - m0) * kPanelBlockN, kPanelBlockN);
    }
    for (; i < m1; ++i) {
      const uint8_t* row = a.x + i * a.x_stride;
      micro<1, kSigned>(&row, panel, quads, tail, offset, out + (i - m0) * kPanelBlockN, kPanelBlockN);
    }
  }
}

template <class O>
bool epilogue_row(const PanelArgs& a, const int32_t* acc, int64_t n0, int64_t count, uint32_t correction, float* v,
                  O* y) {
  const EpilogueSpec spec{a.lo, a.hi, a.out_step, a.out_qmin, a.out_qmax};
  return epilogue_avx2(acc, count, correction, a.scale + n0, a.bias ? a.bias + n0 : nullptr, spec, v, y);
}

template <class O>
bool epilogue(const PanelArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const int32_t* acc, float* v) {
  const EpilogueSpec spec{a.lo, a.hi, a.out_step, a.out_qmin, a.out_qmax};
  const int64_t count = n1 - n0;
  const int32_t offset = a.x_signed ? 1 << (a.w_bits - 1) : 0;
  bool nan = false;
  for (int64_t i = m0; i < m1; ++i) {
    O* y = static_cast<O*>(a.y) + i * a.n + n0;
    if (a.nan_rows && a.nan_rows[i]) {  // a NaN input row: NaN out, or no code for it
      const O fill = spec.out_step > 0.f ? O(0) : static_cast<O>(std::numeric_limits<float>::quiet_NaN());
      for (int64_t j = 0; j < count; ++j) y[j] = fill;
      nan |= spec.out_step > 0.f;
      continue;
    }
    const uint32_t correction = a.x_signed ? static_cast<uint32_t>(offset) * static_cast<uint32_t>(a.rowsum[i]) : 0u;
    nan |= epilogue_row(a, acc + (i - m0) * kPanelBlockN, n0, count, correction, v, y);
  }
  return nan;
}

}  // namespace

bool quantize_codes(const float* x, int64_t n, float step, int32_t qmin, int32_t qmax, uint8_t* out) {
  const __m256 vstep = _mm256_set1_ps(step);
  const __m256 qlo = _mm256_set1_ps(static_cast<float>(qmin)), qhi = _mm256_set1_ps(static_cast<float>(qmax));
  bool nan = false;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    if (qmin < 0) {
      store_codes8<true>(_mm256_loadu_ps(x + i), vstep, qlo, qhi, out + i, &nan);
    } else {
      store_codes8<false>(_mm256_loadu_ps(x + i), vstep, qlo, qhi, out + i, &nan);
    }
  }
  const EpilogueSpec spec{-std::numeric_limits<float>::infinity(), std::numeric_limits<float>::infinity(), step,
                          qmin, qmax};
  if (qmin < 0) return finish_values(x + i, n - i, spec, reinterpret_cast<int8_t*>(out + i)) || nan;
  return finish_values(x + i, n - i, spec, out + i) || nan;
}

bool gemm_block(const PanelArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* acc, float* v) {
  if (a.x_signed) {
    sums<true>(a, m0, m1, n0, n1, acc);
  } else {
    sums<false>(a, m0, m1, n0, n1, acc);
  }
  if (a.out_step <= 0.f) return epilogue<float>(a, m0, m1, n0, n1, acc, v);
  if (a.out_qmin >= 0) return epilogue<uint8_t>(a, m0, m1, n0, n1, acc, v);
  return epilogue<int8_t>(a, m0, m1, n0, n1, acc, v);
}

}  // namespace lowbit::cpu::panel_avx2

#pragma GCC pop_options
