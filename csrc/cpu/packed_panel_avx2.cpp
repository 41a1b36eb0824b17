// The panel GEMM's AVX2 kernel (packed_panel.h): 4 x rows by 16 channels per micro-tile, the folded epilogue.
#include <immintrin.h>

#include <algorithm>
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

// The 16 channel sums of MR rows over `quads` quads and then the tail bytes (k % 4 < 4, read zero-filled, never
// past the row), handed to sink(row, channels 0-7, channels 8-15). Signed codes (kFlip) are flipped to unsigned
// (x + 128: xor of the sign bit); the epilogue subtracts 128 * the weights' column sums. Groups of G quads add
// their int16 pair sums before widening to int32 (one _mm256_madd_epi16 per G quads): G * 2 * 255 * 2^(w_bits-1)
// must stay below 2^15.
template <int MR, int G, bool kFlip, class Sink>
void micro(const uint8_t* const* x, const uint8_t* panel, int64_t quads, int tail, const Sink& sink) {
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  // rows' codes q0 .. q0 + count - 1 (count <= G) from `bytes(i, q)`, into acc
  auto group = [&](int64_t q0, int count, auto bytes) {
    for (int i = 0; i < MR; ++i) {
      __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
      for (int g = 0; g < count; ++g) {
        __m256i xb = bytes(i, q0 + g);
        if constexpr (kFlip) xb = _mm256_xor_si256(xb, flip);
        const __m256i* w = reinterpret_cast<const __m256i*>(panel + 64 * (q0 + g));
        s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(xb, _mm256_loadu_si256(w)));
        s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(xb, _mm256_loadu_si256(w + 1)));
      }
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(s0, ones));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(s1, ones));
    }
  };
  auto row_bytes = [&](int i, int64_t q) { return broadcast4(x[i] + 4 * q); };
  int64_t q = 0;
  for (; q + G <= quads; q += G) group(q, G, row_bytes);
  if (q < quads) group(q, static_cast<int>(quads - q), row_bytes);
  if (tail) {
    group(quads, 1, [&](int i, int64_t) {
      uint8_t bytes[4] = {0, 0, 0, 0};
      std::memcpy(bytes, x[i] + 4 * quads, static_cast<size_t>(tail));
      return broadcast4(bytes);
    });
  }
  for (int i = 0; i < MR; ++i) sink(i, acc[i][0], acc[i][1]);
}

// The epilogue of one whole 16-channel block applied to the sums in registers, straight into y: for NaN-free
// values (finite scale and bias, no NaN input row), with the operations of epilogue_avx2 / codes32 in their order.
template <class O>
struct BlockEpilogue {
  __m256i corr[2];  // 128 * column sums (flipped int8 codes), else 0
  __m256 scale[2], bias[2];
  bool has_bias;
  __m256 lo, hi, step, lower, upper;

  BlockEpilogue(const PanelArgs& a, int64_t c0) : has_bias(a.bias != nullptr) {
    for (int h = 0; h < 2; ++h) {
      corr[h] = _mm256_setzero_si256();
      if (a.colsum) {
        const auto* colsum = reinterpret_cast<const __m256i*>(a.colsum + c0 + 8 * h);
        corr[h] = _mm256_slli_epi32(_mm256_loadu_si256(colsum), 7);
      }
      scale[h] = _mm256_loadu_ps(a.scale + c0 + 8 * h);
      bias[h] = has_bias ? _mm256_loadu_ps(a.bias + c0 + 8 * h) : _mm256_setzero_ps();
    }
    const EpilogueSpec spec{a.lo, a.hi, a.out_step, a.out_qmin, a.out_qmax};
    lo = _mm256_set1_ps(a.lo), hi = _mm256_set1_ps(a.hi), step = _mm256_set1_ps(a.out_step);
    const CodeBounds b = std::is_same_v<O, float> ? CodeBounds{0.f, 0.f} : code_bounds(spec);
    lower = _mm256_set1_ps(b.lower), upper = _mm256_set1_ps(b.upper);
  }

  void store(O* y, __m256i a0, __m256i a1) const {
    const __m256i sums[2] = {_mm256_sub_epi32(a0, corr[0]), _mm256_sub_epi32(a1, corr[1])};
    __m256i q[2];
    for (int h = 0; h < 2; ++h) {
      __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(sums[h]), scale[h]);
      if (has_bias) x = _mm256_add_ps(x, bias[h]);  // not + 0.f without a bias: -0.f would turn +0.f
      if constexpr (std::is_same_v<O, float>) {
        _mm256_storeu_ps(y + 8 * h, _mm256_min_ps(hi, _mm256_max_ps(lo, x)));
      } else {
        x = _mm256_round_ps(_mm256_div_ps(x, step), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q[h] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(x, lower), upper));
      }
    }
    if constexpr (!std::is_same_v<O, float>) {
      // 16 int32 -> 16 int16 in order (packs works per 128-bit lane; the permute restores the order) -> bytes
      const __m256i i16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
      const __m128i lo16 = _mm256_castsi256_si128(i16), hi16 = _mm256_extracti128_si256(i16, 1);
      const __m128i bytes = std::is_signed_v<O> ? _mm_packs_epi16(lo16, hi16) : _mm_packus_epi16(lo16, hi16);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y), bytes);
    }
  }
};

// Channels [n0, n1) of rows [m0, m1): O = int32_t stores the sums to acc (row i - m0 at acc + (i - m0) *
// kPanelBlockN, channel c at c - n0); a float / code O applies BlockEpilogue and writes y (whole 16-channel blocks
// only).
template <int G, bool kFlip, class O>
void sums(const PanelArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* acc) {
  const int64_t quads = a.k / 4, panel_bytes = (a.k + 3) / 4 * 64;
  const int tail = static_cast<int>(a.k % 4);
  for (int64_t c0 = n0; c0 < n1; c0 += 16) {  // one panel block stays in L1 while the rows pass it
    const uint8_t* panel = a.panel + (c0 / 16) * panel_bytes;
    auto run = [&](int64_t i, const auto& micro_rows) {
      if constexpr (std::is_same_v<O, int32_t>) {
        int32_t* out = acc + (i - m0) * kPanelBlockN + (c0 - n0);
        micro_rows([&](int r, __m256i a0, __m256i a1) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * kPanelBlockN), a0);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * kPanelBlockN + 8), a1);
        });
      } else {
        const BlockEpilogue<O> epi(a, c0);
        O* y = static_cast<O*>(a.y) + i * a.n + c0;
        micro_rows([&](int r, __m256i a0, __m256i a1) { epi.store(y + r * a.n, a0, a1); });
      }
    };
    int64_t i = m0;
    for (; i + kRows <= m1; i += kRows) {
      const uint8_t* rows[kRows];
      for (int r = 0; r < kRows; ++r) rows[r] = a.x + (i + r) * a.x_stride;
      run(i, [&](const auto& sink) { micro<kRows, G, kFlip>(rows, panel, quads, tail, sink); });
    }
    for (; i < m1; ++i) {
      const uint8_t* row = a.x + i * a.x_stride;
      run(i, [&](const auto& sink) { micro<1, G, kFlip>(&row, panel, quads, tail, sink); });
    }
  }
}

// 8-bit weights (|w| <= 128, whose byte products could overflow the int16 pair sums): int16 x int16 pairs
// (_mm256_madd_epi16) on the same panel. A quad's 16 bytes of 4 channels widen to (channel, k0..k3) int16; the
// row's 4 codes, widened, repeat in every 64 bits; each int32 lane sums 2 of a channel's 4 products, and the two
// lanes of a channel are added once at the end.
template <int MR, bool kSignedX>
void micro16(const uint8_t* const* x, const uint8_t* panel, int64_t quads, int tail, int32_t* out,
             int64_t out_stride) {
  __m256i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = _mm256_setzero_si256();
  auto quad = [&](int64_t q, const __m256i* xb) {
    __m256i w[4];
    for (int v = 0; v < 4; ++v) {
      w[v] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + 64 * q + 16 * v)));
    }
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < 4; ++v) acc[i][v] = _mm256_add_epi32(acc[i][v], _mm256_madd_epi16(xb[i], w[v]));
  };
  auto widen4 = [](const uint8_t* p) {  // 4 codes -> 4 int16, repeated in each 64 bits
    int32_t v;
    std::memcpy(&v, p, 4);
    const __m128i raw = _mm_cvtsi32_si128(v);
    return _mm256_broadcastq_epi64(kSignedX ? _mm_cvtepi8_epi16(raw) : _mm_cvtepu8_epi16(raw));
  };
  __m256i xb[MR];
  for (int64_t q = 0; q < quads; ++q) {
    for (int i = 0; i < MR; ++i) xb[i] = widen4(x[i] + 4 * q);
    quad(q, xb);
  }
  if (tail) {
    for (int i = 0; i < MR; ++i) {
      uint8_t bytes[4] = {0, 0, 0, 0};
      std::memcpy(bytes, x[i] + 4 * quads, static_cast<size_t>(tail));
      xb[i] = widen4(bytes);
    }
    quad(quads, xb);
  }
  for (int i = 0; i < MR; ++i) {
    // hadd of the 4-channel vectors (0, 1) gives channels 0 1 4 5 | 2 3 6 7; the permute puts them in order
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][0], acc[i][1]), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][2], acc[i][3]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * out_stride), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * out_stride + 8), hi);
  }
}

template <bool kSignedX>
void sums16(const PanelArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* acc) {
  constexpr int kRows16 = 2;  // 8 accumulators and 4 weight vectors per micro-tile
  const int64_t quads = a.k / 4, panel_bytes = (a.k + 3) / 4 * 64;
  const int tail = static_cast<int>(a.k % 4);
  for (int64_t c0 = n0; c0 < n1; c0 += 16) {
    const uint8_t* panel = a.panel + (c0 / 16) * panel_bytes;
    int32_t* out = acc + (c0 - n0);
    int64_t i = m0;
    for (; i + kRows16 <= m1; i += kRows16) {
      const uint8_t* rows[kRows16] = {a.x + i * a.x_stride, a.x + (i + 1) * a.x_stride};
      micro16<kRows16, kSignedX>(rows, panel, quads, tail, out + (i - m0) * kPanelBlockN, kPanelBlockN);
    }
    if (i < m1) {
      const uint8_t* row = a.x + i * a.x_stride;
      micro16<1, kSignedX>(&row, panel, quads, tail, out + (i - m0) * kPanelBlockN, kPanelBlockN);
    }
  }
}

// The largest group of quads whose int16 sums cannot overflow: G * 2 * 255 * 2^(w_bits-1) <= 32767.
template <bool kFlip, class O = int32_t>
void sums_grouped(const PanelArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* acc) {
  const int64_t pair_max = 2 * 255 * (int64_t{1} << (a.w_bits - 1));
  if (8 * pair_max <= 32767) return sums<8, kFlip, O>(a, m0, m1, n0, n1, acc);
  if (4 * pair_max <= 32767) return sums<4, kFlip, O>(a, m0, m1, n0, n1, acc);
  if (2 * pair_max <= 32767) return sums<2, kFlip, O>(a, m0, m1, n0, n1, acc);
  return sums<1, kFlip, O>(a, m0, m1, n0, n1, acc);
}

// Whole 16-channel blocks with the epilogue in registers (byte kernel, NaN-free values).
template <class O>
void fused_blocks(const PanelArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  a.x_signed ? sums_grouped<true, O>(a, m0, m1, n0, n1, nullptr) : sums_grouped<false, O>(a, m0, m1, n0, n1, nullptr);
}

template <class O>
bool epilogue(const PanelArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* acc, float* v) {
  const EpilogueSpec spec{a.lo, a.hi, a.out_step, a.out_qmin, a.out_qmax};
  const int64_t count = n1 - n0;
  if (a.x_signed && a.w_bits < 8) {  // undo the flip: the byte sums hold sum (x + 128) * w
    for (int64_t i = m0; i < m1; ++i) {
      int32_t* arow = acc + (i - m0) * kPanelBlockN;
      for (int64_t j = 0; j < count; ++j) {
        arow[j] = static_cast<int32_t>(static_cast<uint32_t>(arow[j]) - 128u * static_cast<uint32_t>(a.colsum[n0 + j]));
      }
    }
  }
  const float *scale = a.scale + n0, *bias = a.bias ? a.bias + n0 : nullptr;
  const bool may_nan = affine_may_nan(scale, bias, count);
  bool nan = false;
  for (int64_t i = m0; i < m1; ++i) {
    O* y = static_cast<O*>(a.y) + i * a.n + n0;
    if (a.nan_rows && a.nan_rows[i]) {  // a NaN input row: NaN out, or no code for it
      const O fill = spec.out_step > 0.f ? O(0) : static_cast<O>(std::numeric_limits<float>::quiet_NaN());
      for (int64_t j = 0; j < count; ++j) y[j] = fill;
      nan |= spec.out_step > 0.f;
      continue;
    }
    const int32_t* arow = acc + (i - m0) * kPanelBlockN;
    nan |= may_nan ? epilogue_avx2<O, true>(arow, count, scale, bias, spec, v, y)
                   : epilogue_avx2<O, false>(arow, count, scale, bias, spec, v, y);
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
  // whole 16-channel blocks of the byte kernel take the epilogue in registers when no value can be NaN
  const bool fused = a.w_bits < 8 && a.nan_rows == nullptr &&
                     !affine_may_nan(a.scale + n0, a.bias ? a.bias + n0 : nullptr, n1 - n0);
  if (fused) {
    const int64_t blocks_end = n0 + (n1 - n0) / 16 * 16;
    if (blocks_end > n0) {
      if (a.out_step <= 0.f) {
        fused_blocks<float>(a, m0, m1, n0, blocks_end);
      } else if (a.out_qmin >= 0) {
        fused_blocks<uint8_t>(a, m0, m1, n0, blocks_end);
      } else {
        fused_blocks<int8_t>(a, m0, m1, n0, blocks_end);
      }
    }
    if (blocks_end == n1) return false;
    n0 = blocks_end;  // the last, partial block: sums, then the row epilogue
  }
  if (a.w_bits == 8) {
    a.x_signed ? sums16<true>(a, m0, m1, n0, n1, acc) : sums16<false>(a, m0, m1, n0, n1, acc);
  } else if (a.x_signed) {
    sums_grouped<true>(a, m0, m1, n0, n1, acc);
  } else {
    sums_grouped<false>(a, m0, m1, n0, n1, acc);
  }
  if (a.out_step <= 0.f) return epilogue<float>(a, m0, m1, n0, n1, acc, v);
  if (a.out_qmin >= 0) return epilogue<uint8_t>(a, m0, m1, n0, n1, acc, v);
  return epilogue<int8_t>(a, m0, m1, n0, n1, acc, v);
}

}  // namespace lowbit::cpu::panel_avx2

#pragma GCC pop_options
