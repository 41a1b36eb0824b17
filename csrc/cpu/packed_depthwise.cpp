// Driver of the integer data path's depthwise convolution and activation quantizer (issue 17):
//   packed_depthwise  codes (B, H, W, C) channels last -> exact int32 taps per channel -> the folded
//                               epilogue (packed_epilogue.h) -> float32 or codes (B, Ho, Wo, C)
//   quantize_codes    float -> clamp(rint(x / step), qmin, qmax) as uint8 / int8 codes (SPEC section 1)
//   im2col_codes      codes (B, H, W, C) -> the (B * Ho * Wo, kh * kw * C) patches of the panel GEMM
// Parallel over output rows; all arithmetic before the epilogue is integer, so results do not depend on threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bind.h"
#include "cpu/dispatch.h"
#include "cpu/isa.h"
#include "cpu/packed_depthwise.h"
#include "cpu/packed_panel.h"
#include "cpu/patches.h"

namespace lowbit::cpu {
namespace depthwise_baseline {

#include "cpu/packed_depthwise_kernels.h"

bool row(const void* args, int64_t b, int64_t oh, int32_t* acc, float* v) {
  return depthwise_row(*static_cast<const DepthwiseArgs*>(args), b, oh, acc, v);
}

}  // namespace depthwise_baseline

namespace {

using depthwise_baseline::DepthwiseArgs;
using depthwise_baseline::EpilogueSpec;

EpilogueSpec make_spec(double lo, double hi, double out_step, int64_t out_qmin, int64_t out_qmax) {
  TORCH_CHECK(out_step == 0 || (out_qmin >= -128 && out_qmax <= 255 && out_qmin <= out_qmax &&
                                (out_qmin >= 0 || out_qmax <= 127)),
              "lowbit._C.cpu: [out_qmin, out_qmax] must be a signed or unsigned 8-bit-or-less range");
  return {static_cast<float>(lo), static_cast<float>(hi), static_cast<float>(out_step),
          static_cast<int32_t>(out_qmin), static_cast<int32_t>(out_qmax)};
}

// Whether taps * max|x| * max|w| fits int16, so the AVX2 rows may sum the products in int16.
bool fits_int16(const at::Tensor& w, int64_t taps, int64_t x_max) {
  const int8_t* p = w.const_data_ptr<int8_t>();
  int64_t w_max = 0;
  for (int64_t i = 0; i < w.numel(); ++i) w_max = std::max<int64_t>(w_max, p[i] < 0 ? -int64_t{p[i]} : p[i]);
  return taps * x_max * w_max <= 32767;
}

at::Tensor packed_depthwise(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias, const std::vector<int64_t>& kernel,
                            const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                            const std::vector<int64_t>& dilation, double lo, double hi, double out_step,
                            int64_t out_qmin, int64_t out_qmax) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && (x.scalar_type() == at::kByte || x.scalar_type() == at::kChar),
              "lowbit._C.cpu: x must be contiguous (B, H, W, C) uint8 or int8 codes");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "lowbit._C.cpu: kernel, stride, padding and dilation must have 2 entries");
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous() && w.dim() == 2 &&
                  w.size(0) == kernel[0] * kernel[1] && w.size(1) == channels,
              "lowbit._C.cpu: w must be contiguous int8 (KH * KW, C)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == channels,
              "lowbit._C.cpu: scale must be a contiguous float32 (C,) tensor");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == channels),
              "lowbit._C.cpu: bias must be None or a contiguous float32 (C,) tensor");
  const int64_t out_h = (height + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) / stride[0] + 1;
  const int64_t out_w = (width + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "lowbit._C.cpu: the input is smaller than the kernel span");
  const EpilogueSpec spec = make_spec(lo, hi, out_step, out_qmin, out_qmax);
  const int out_kind = out_step > 0 ? (out_qmin >= 0 ? 1 : 2) : 0;
  const auto out_type = out_kind == 1 ? at::kByte : out_kind == 2 ? at::kChar : at::kFloat;
  at::Tensor y = at::empty({batch, out_h, out_w, channels}, x.options().dtype(out_type));
  if (y.numel() == 0) return y;
  const DepthwiseArgs args{x.const_data_ptr(), x.scalar_type() == at::kByte, batch, height, width, channels,
                           w.const_data_ptr<int8_t>(), kernel[0], kernel[1], stride[0], stride[1], padding[0],
                           padding[1], dilation[0], dilation[1], out_h, out_w, scale.const_data_ptr<float>(),
                           bias ? bias->const_data_ptr<float>() : nullptr, spec, y.mutable_data_ptr(), out_kind,
                           fits_int16(w, kernel[0] * kernel[1], x.scalar_type() == at::kByte ? 255 : 128)};
  auto* row = active_isa() == Isa::kScalar ? &depthwise_baseline::row : &depthwise_avx2::row;
  std::atomic<bool> nan{false};
  // at least 2^17 multiply-adds per thread: waking a thread costs more than a small layer's rows
  const int64_t grain = std::max<int64_t>(1, 131072 / std::max<int64_t>(1, out_w * channels * kernel[0] * kernel[1]));
  at::parallel_for(0, batch * out_h, grain, [&](int64_t first, int64_t last) {
    std::vector<int32_t> acc(channels);
    std::vector<float> v(channels);
    for (int64_t r = first; r < last; ++r) {
      if (row(&args, r / out_h, r % out_h, acc.data(), v.data())) nan = true;
    }
  });
  TORCH_CHECK_VALUE(!nan, "the depthwise output holds NaN, which no activation code can represent");
  return y;
}

template <class T, class C>
bool quantize_span(const T* x, C* out, int64_t n, float step, float lo, float hi) {
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    float q = static_cast<float>(x[i]) / step;
    if (q != q) {
      nan = true;
      q = 0.f;
    }
    q = depthwise_baseline::round_even_clamped(q);
    q = q < lo ? lo : (q > hi ? hi : q);
    out[i] = static_cast<C>(static_cast<int32_t>(q));
  }
  return nan;
}

at::Tensor quantize_codes(const at::Tensor& x, double step, int64_t qmin, int64_t qmax) {
  TORCH_CHECK(x.is_contiguous(), "lowbit._C.cpu: x must be contiguous");
  TORCH_CHECK(qmin >= -128 && qmax <= 255 && qmin <= qmax && (qmin >= 0 || qmax <= 127),
              "lowbit._C.cpu: [qmin, qmax] must be a signed or unsigned 8-bit-or-less range");
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(qmin >= 0 ? at::kByte : at::kChar));
  const int64_t n = x.numel();
  const float s = static_cast<float>(step), lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  std::atomic<bool> nan{false};
  if (x.scalar_type() == at::kFloat && active_isa() != Isa::kScalar) {  // the AVX2 quantizer of packed_panel.h
    const float* src = x.const_data_ptr<float>();
    uint8_t* out = static_cast<uint8_t*>(y.mutable_data_ptr());
    at::parallel_for(0, n, 65536, [&](int64_t b, int64_t e) {
      if (panel_avx2::quantize_codes(src + b, e - b, s, static_cast<int32_t>(qmin), static_cast<int32_t>(qmax),
                                     out + b)) {
        nan = true;
      }
    });
    TORCH_CHECK_VALUE(!nan, "x holds NaN, which no activation code can represent");
    return y;
  }
  LOWBIT_DISPATCH_FLOAT(x.scalar_type(), "lowbit_quantize_codes", [&] {
    const scalar_t* src = data<scalar_t>(x);
    at::parallel_for(0, n, 65536, [&](int64_t b, int64_t e) {
      const bool found = qmin >= 0 ? quantize_span(src + b, y.mutable_data_ptr<uint8_t>() + b, e - b, s, lo, hi)
                                   : quantize_span(src + b, y.mutable_data_ptr<int8_t>() + b, e - b, s, lo, hi);
      if (found) nan = true;
    });
  });
  TORCH_CHECK_VALUE(!nan, "x holds NaN, which no activation code can represent");
  return y;
}

}  // namespace

// Patches of channels-last codes (B, H, W, C) -> (B * Ho * Wo, kh * kw * C) (patches.h), parallel over rows.
at::Tensor im2col_codes(const at::Tensor& x, const std::vector<int64_t>& kernel, const std::vector<int64_t>& stride,
                        const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.element_size() == 1,
              "lowbit._C.cpu: x must be contiguous (B, H, W, C) uint8 or int8 codes");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "lowbit._C.cpu: kernel, stride, padding and dilation must have 2 entries");
  const PatchGeometry g = patch_geometry(x.size(1), x.size(2), x.size(3), kernel.data(), stride.data(),
                                         padding.data(), dilation.data());
  TORCH_CHECK(g.out_h >= 1 && g.out_w >= 1, "lowbit._C.cpu: the input is smaller than the kernel span");
  const int64_t rows = x.size(0) * g.out_h * g.out_w, k_len = g.row_bytes();
  at::Tensor y = at::empty({rows, k_len}, x.options());
  const auto* src = static_cast<const uint8_t*>(x.const_data_ptr());
  auto* dst = static_cast<uint8_t*>(y.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, k_len));
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) gather_patch_row(src, g, r, dst + r * k_len);
  });
  return y;
}

void bind_packed_depthwise(pybind11::module_& m) {
  using lowbit::ReleaseGil;
  using namespace pybind11::literals;  // "x"_a: argument names for help() and keyword calls
  m.def("packed_depthwise", &packed_depthwise, ReleaseGil(),
        "x"_a, "w"_a, "scale"_a, "bias"_a, "kernel"_a, "stride"_a, "padding"_a, "dilation"_a, "lo"_a, "hi"_a,
        "out_step"_a, "out_qmin"_a, "out_qmax"_a);
  m.def("quantize_codes", &quantize_codes, ReleaseGil(), "x"_a, "step"_a, "qmin"_a, "qmax"_a);
  m.def("im2col_codes", &im2col_codes, ReleaseGil(), "x"_a, "kernel"_a, "stride"_a, "padding"_a, "dilation"_a);
}

}  // namespace lowbit::cpu
