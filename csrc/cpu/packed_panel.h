// The panel GEMM of the integer data path (issue 17): codes (M, K) times weights prepacked once into panels.
//
// Panel layout (lowbit.core.packing.gemm_panel builds it at convert / load): the signed weight codes (N, K) as
// int8, in blocks of 16 output channels; block p is ceil(K / 4) quads of 64 bytes, and byte
//   (c / 8) * 32 + (c % 8) * 4 + t   of quad q   holds   code[16 p + c, 4 q + t]   (0 past N or K).
// One quad is two 32-byte vectors of 8 channels x 4 consecutive k, so the kernel broadcasts 4 codes of one x row
// and multiplies them into 16 channels at once: there is no horizontal sum, and K is padded to 4, not to a
// 32-byte step (small-K 1x1 convolutions were slow for that reason in the packed_linear tiles).
//
// Products (AVX2 _mm256_maddubs_epi16, unsigned x signed bytes into int16 pair sums): the codes are the unsigned
// side (int8 codes flipped to x + 128, and 128 * the weights' column sum subtracted after) and the weights the
// signed one. For w_bits <= 7 every pair sum stays within int16 for any code (2 * 255 * 64 < 2^15). 8-bit weights
// take int16 x int16 pairs (_mm256_madd_epi16) on the same panel, half the products per instruction. The results
// are the exact int32 sums, as the other paths'.
#pragma once

#include <cstdint>

namespace lowbit::cpu {

struct PanelArgs {
  const uint8_t* x;  // first row of codes (uint8, or int8 when x_signed)
  int64_t x_stride;  // bytes between rows
  int64_t m, k;
  bool x_signed;
  const uint8_t* panel;  // ceil(N / 16) blocks of ceil(K / 4) * 64 bytes
  int64_t n;
  int w_bits;                // 2..8
  const int32_t* colsum;     // (N,) code sums of the weights' rows when x_signed and w_bits < 8, else nullptr
  const uint8_t* nan_rows;   // (M,) 1 for rows whose float input held NaN, or nullptr
  const float* scale;        // (N,) whole per-channel multiplier
  const float* bias;         // (N,) or nullptr
  float lo, hi;              // clamp of the folded activation
  float out_step;            // > 0: emit codes at this step; 0: float32
  int32_t out_qmin, out_qmax;
  void* y;                   // (M, N): float32, or uint8 / int8 codes (out_qmin >= 0: uint8)
};

// Rows [m0, m1) x channels [n0, n1) of y (n0 a multiple of 16, n1 - n0 <= kPanelBlockN): the sums, then the
// folded epilogue (packed_epilogue.h). `acc` is scratch of (m1 - m0) * kPanelBlockN int32, `v` of kPanelBlockN
// floats. Returns true when a NaN was coded (the driver raises ValueError).
constexpr int64_t kPanelBlockN = 64;
namespace panel_avx2 {
bool gemm_block(const PanelArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* acc, float* v);
// out[i] = clamp(rint(x[i] / step), qmin, qmax) for i < n as uint8 (qmin >= 0) or int8 codes (SPEC section 1);
// a NaN gives code 0 and the result true.
bool quantize_codes(const float* x, int64_t n, float step, int32_t qmin, int32_t qmax, uint8_t* out);
}

}  // namespace lowbit::cpu
