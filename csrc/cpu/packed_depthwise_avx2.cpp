// The integer depthwise rows for AVX2: 16 channels a vector, products in int16 (|x| <= 255 and |w| <= 128 give
// |x * w| <= 32640), summed in int16 when every tap sum fits (DepthwiseArgs::acc16), else widened to int32 per
// tap; the channels past the last 16 run the generic taps of packed_depthwise_kernels.h; the AVX2 epilogue.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/packed_depthwise.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace lowbit::cpu::depthwise_avx2 {

#include "cpu/packed_depthwise_kernels.h"
#include "cpu/packed_epilogue_avx2.h"

namespace {

template <class X>
inline __m256i widen16(const X* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return std::is_signed_v<X> ? _mm256_cvtepi8_epi16(raw) : _mm256_cvtepu8_epi16(raw);
}

// acc[c .. c + 16) = the exact tap sums over the `taps` valid taps of one output pixel: tap t reads x at
// xs[t] + c and the weights at ws[t] + c.
template <class X, bool kAcc16>
inline void taps16(const X* const* xs, const int8_t* const* ws, int taps, int64_t c, int32_t* acc) {
  __m256i s16 = _mm256_setzero_si256(), lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
  for (int t = 0; t < taps; ++t) {
    const __m256i p = _mm256_mullo_epi16(widen16(xs[t] + c), widen16(ws[t] + c));
    if constexpr (kAcc16) {
      s16 = _mm256_add_epi16(s16, p);
    } else {
      lo = _mm256_add_epi32(lo, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(p)));
      hi = _mm256_add_epi32(hi, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(p, 1)));
    }
  }
  if constexpr (kAcc16) {
    lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16));
    hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16, 1));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + c), lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + c + 8), hi);
}

template <class X, class O, bool kAcc16>
bool row_impl(const DepthwiseArgs& a, int64_t b, int64_t oh, int32_t* acc, float* v) {
  const X* x = static_cast<const X*>(a.x);
  O* y = static_cast<O*>(a.y) + (b * a.out_h + oh) * a.out_w * a.channels;
  const int64_t vec_channels = a.channels / 16 * 16;
  const bool may_nan = affine_may_nan(a.scale, a.bias, a.channels);
  bool nan = false;
  constexpr int kMaxTaps = 64;  // larger kernels take the generic taps for all channels
  const X* xs[kMaxTaps];
  const int8_t* ws[kMaxTaps];
  for (int64_t ow = 0; ow < a.out_w; ++ow) {
    int taps = 0;
    for (int64_t i = 0; i < a.kh && a.kh * a.kw <= kMaxTaps; ++i) {
      const int64_t ih = oh * a.sh - a.ph + i * a.dh;
      if (ih < 0 || ih >= a.height) continue;  // padding: code 0 adds nothing
      for (int64_t j = 0; j < a.kw; ++j) {
        const int64_t iw = ow * a.sw - a.pw + j * a.dw;
        if (iw < 0 || iw >= a.width) continue;
        xs[taps] = x + ((b * a.height + ih) * a.width + iw) * a.channels;
        ws[taps++] = a.w + (i * a.kw + j) * a.channels;
      }
    }
    if (a.kh * a.kw > kMaxTaps) {
      depthwise_taps(a, x, b, oh, ow, acc);
    } else {
      for (int64_t c = 0; c < vec_channels; c += 16) taps16<X, kAcc16>(xs, ws, taps, c, acc);
      if (vec_channels < a.channels) depthwise_taps(a, x, b, oh, ow, acc, vec_channels);
    }
    O* out = y + ow * a.channels;
    nan |= may_nan ? epilogue_avx2<O, true>(acc, a.channels, a.scale, a.bias, a.spec, v, out)
                   : epilogue_avx2<O, false>(acc, a.channels, a.scale, a.bias, a.spec, v, out);
  }
  return nan;
}

template <class X, class O>
bool row_for(const DepthwiseArgs& a, int64_t b, int64_t oh, int32_t* acc, float* v) {
  return a.acc16 ? row_impl<X, O, true>(a, b, oh, acc, v) : row_impl<X, O, false>(a, b, oh, acc, v);
}

}  // namespace

bool row(const void* args, int64_t b, int64_t oh, int32_t* acc, float* v) {
  const DepthwiseArgs& a = *static_cast<const DepthwiseArgs*>(args);
  if (a.x_u8) {
    if (a.out_kind == 1) return row_for<uint8_t, uint8_t>(a, b, oh, acc, v);
    if (a.out_kind == 2) return row_for<uint8_t, int8_t>(a, b, oh, acc, v);
    return row_for<uint8_t, float>(a, b, oh, acc, v);
  }
  if (a.out_kind == 1) return row_for<int8_t, uint8_t>(a, b, oh, acc, v);
  if (a.out_kind == 2) return row_for<int8_t, int8_t>(a, b, oh, acc, v);
  return row_for<int8_t, float>(a, b, oh, acc, v);
}

}  // namespace lowbit::cpu::depthwise_avx2

#pragma GCC pop_options
