// Patch rows of channels-last codes for the kxk convolutions of the integer data path (issue 17): output pixel r
// of a (B, H, W, C) code tensor as one GEMM row of kh * kw * C bytes in (kh, kw, C) order, code 0 for the padding.
// Shared by im2col_codes (every row into one tensor) and packed_patches_gemm (a task's rows into a small buffer,
// so that the patches never cross memory whole).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace lowbit::cpu {

struct PatchGeometry {
  int64_t height, width, channels;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t out_h, out_w;
  int64_t row_bytes() const { return kh * kw * channels; }
};

// Row r (r = (b * out_h + oh) * out_w + ow) of the patches: one copy of kw * C bytes per kernel row when its taps
// are all inside and adjacent (dilation 1), else one copy of C bytes per tap.
inline void gather_patch_row(const uint8_t* src, const PatchGeometry& g, int64_t r, uint8_t* out) {
  const int64_t b = r / (g.out_h * g.out_w), oh = (r / g.out_w) % g.out_h, ow = r % g.out_w;
  const size_t c_bytes = static_cast<size_t>(g.channels);
  const int64_t iw0 = ow * g.sw - g.pw;
  const bool row_inside = g.dw == 1 && iw0 >= 0 && iw0 + g.kw <= g.width;
  for (int64_t i = 0; i < g.kh; ++i, out += g.kw * g.channels) {
    const int64_t ih = oh * g.sh - g.ph + i * g.dh;
    if (ih < 0 || ih >= g.height) {
      std::memset(out, 0, static_cast<size_t>(g.kw) * c_bytes);
      continue;
    }
    const uint8_t* in_row = src + (b * g.height + ih) * g.width * g.channels;
    if (row_inside) {
      std::memcpy(out, in_row + iw0 * g.channels, static_cast<size_t>(g.kw) * c_bytes);
      continue;
    }
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t iw = iw0 + j * g.dw;
      if (iw < 0 || iw >= g.width) {
        std::memset(out + j * g.channels, 0, c_bytes);
      } else {
        std::memcpy(out + j * g.channels, in_row + iw * g.channels, c_bytes);
      }
    }
  }
}

// The geometry of x (B, H, W, C) under a kxk convolution; out_h or out_w below 1 when the input is too small.
inline PatchGeometry patch_geometry(int64_t height, int64_t width, int64_t channels, const int64_t* kernel,
                                    const int64_t* stride, const int64_t* padding, const int64_t* dilation) {
  PatchGeometry g{height, width, channels, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1],
                  dilation[0], dilation[1], 0, 0};
  g.out_h = (height + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.out_w = (width + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  return g;
}

// All rows into one (B * Ho * Wo, kh * kw * C) tensor (packed_depthwise.cpp; lowbit._C.cpu.im2col_codes).
at::Tensor im2col_codes(const at::Tensor& x, const std::vector<int64_t>& kernel, const std::vector<int64_t>& stride,
                        const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation);

}  // namespace lowbit::cpu
