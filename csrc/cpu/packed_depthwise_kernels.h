// Integer depthwise convolution rows (issue 17), written once and compiled per ISA: included inside the ISA's
// namespace by packed_depthwise.cpp (baseline x86-64) and packed_depthwise_avx2.cpp (under the avx2 target), so
// the compiler vectorises the channel loops for each. No library templates are instantiated here (they would
// be shared across ISAs by the linker).
//
// Layouts: x (B, H, W, C) codes, channels last; w (KH * KW, C) int8 weight codes (prepacked at convert/load);
// y (B, Ho, Wo, C). Sums are exact int32: |x| <= 255, |w| <= 128, KH * KW taps.
#pragma once

#include <cstdint>

#include "cpu/packed_epilogue.h"

struct DepthwiseArgs {
  const void* x;
  bool x_u8;  // uint8 codes, else int8
  int64_t batch, height, width, channels;
  const int8_t* w;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t out_h, out_w;
  const float* scale;  // (C,) whole multiplier
  const float* bias;   // (C,) or nullptr
  EpilogueSpec spec;
  void* y;
  int out_kind;  // 0: float32, 1: uint8, 2: int8
  bool acc16;    // every tap sum fits int16: kh * kw * max|x| * max|w| <= 32767 (the AVX2 rows sum in int16)
};

// acc[c] for channels c in [c0, C): the exact tap sums of output pixel (b, oh, ow).
template <class X>
inline void depthwise_taps(const DepthwiseArgs& a, const X* x, int64_t b, int64_t oh, int64_t ow, int32_t* acc,
                           int64_t c0 = 0) {
  const int64_t c_len = a.channels;
  for (int64_t c = c0; c < c_len; ++c) acc[c] = 0;
  for (int64_t i = 0; i < a.kh; ++i) {
    const int64_t ih = oh * a.sh - a.ph + i * a.dh;
    if (ih < 0 || ih >= a.height) continue;
    for (int64_t j = 0; j < a.kw; ++j) {
      const int64_t iw = ow * a.sw - a.pw + j * a.dw;
      if (iw < 0 || iw >= a.width) continue;
      const X* __restrict xp = x + ((b * a.height + ih) * a.width + iw) * c_len;
      const int8_t* __restrict wp = a.w + (i * a.kw + j) * c_len;
      for (int64_t c = c0; c < c_len; ++c) acc[c] += static_cast<int32_t>(xp[c]) * static_cast<int32_t>(wp[c]);
    }
  }
}

template <class X, class O>
inline bool depthwise_row_impl(const DepthwiseArgs& a, int64_t b, int64_t oh, int32_t* acc, float* v) {
  const X* x = static_cast<const X*>(a.x);
  O* y = static_cast<O*>(a.y) + (b * a.out_h + oh) * a.out_w * a.channels;
  bool nan = false;
  for (int64_t ow = 0; ow < a.out_w; ++ow) {
    depthwise_taps(a, x, b, oh, ow, acc);
    for (int64_t c = 0; c < a.channels; ++c) v[c] = static_cast<float>(acc[c]) * a.scale[c];
    if (a.bias) {
      for (int64_t c = 0; c < a.channels; ++c) v[c] = v[c] + a.bias[c];
    }
    nan |= finish_values(v, a.channels, a.spec, y + ow * a.channels);
  }
  return nan;
}

// One output row (b, oh): all Wo pixels, all channels. acc (C int32) and v (C float) are scratch.
inline bool depthwise_row(const DepthwiseArgs& a, int64_t b, int64_t oh, int32_t* acc, float* v) {
  if (a.x_u8) {
    if (a.out_kind == 1) return depthwise_row_impl<uint8_t, uint8_t>(a, b, oh, acc, v);
    if (a.out_kind == 2) return depthwise_row_impl<uint8_t, int8_t>(a, b, oh, acc, v);
    return depthwise_row_impl<uint8_t, float>(a, b, oh, acc, v);
  }
  if (a.out_kind == 1) return depthwise_row_impl<int8_t, uint8_t>(a, b, oh, acc, v);
  if (a.out_kind == 2) return depthwise_row_impl<int8_t, int8_t>(a, b, oh, acc, v);
  return depthwise_row_impl<int8_t, float>(a, b, oh, acc, v);
}
