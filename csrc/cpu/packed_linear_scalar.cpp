// Packed GEMM tiles for the scalar code path: plain C++ with int32 accumulation. Prepared activations are
// int16 in natural order (lanes = 1, so the step layout of packed_linear.h is the identity).
#include <cmath>
#include <cstdint>

#include "cpu/packed_linear.h"

namespace lowbit::cpu::packed_scalar {

#include "cpu/simd_scalar.h"
using Vec = ScalarVec;
#include "cpu/packed_linear_quantize.h"

namespace {

// Field f of a packed byte as a signed code (two's complement in `kC` bits).
template <int kC>
inline int32_t field(uint8_t byte, int f) {
  const int32_t v = (byte >> (kC * f)) & ((1 << kC) - 1);
  return v - ((v >> (kC - 1)) << kC);
}

template <int kC>
void tile_impl(const PackedTile& t) {
  constexpr int kF = 8 / kC;
  const int64_t end = t.b1 < t.w_bytes ? t.b1 : t.w_bytes;
  for (int i = 0; i < t.mr; ++i) {
    const int16_t* x = static_cast<const int16_t*>(t.x[i]);
    for (int j = 0; j < t.nr; ++j) {
      const uint8_t* w = t.w[j];
      uint32_t sum = 0;  // wrap-around int32 arithmetic without signed-overflow UB
      for (int64_t b = t.b0; b < end; ++b) {
        const uint8_t byte = w[b];
        for (int f = 0; f < kF; ++f) sum += static_cast<uint32_t>(x[b * kF + f] * field<kC>(byte, f));
      }
      int32_t* out = t.acc + i * t.acc_stride + j;
      *out = static_cast<int32_t>(static_cast<uint32_t>(*out) + sum);
    }
  }
}

void tile(const PackedTile& t) {
  switch (t.container_bits) {
    case 2: return tile_impl<2>(t);
    case 4: return tile_impl<4>(t);
    default: return tile_impl<8>(t);
  }
}

}  // namespace

PackedLinearKernels kernels() {
  return {1, 2, false, &tile, nullptr, nullptr, &quantize_f32, &quantize_f16, &quantize_bf16, nullptr, nullptr};
}

}  // namespace lowbit::cpu::packed_scalar
