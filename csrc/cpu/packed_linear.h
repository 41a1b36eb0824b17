// Packed inference GEMM (SPEC section 4): the per-ISA kernel table used by packed_linear.cpp.
//
// The driver quantizes each row of x once into a "prepared" buffer whose layout matches how the ISA's tile
// kernel unpacks weights in registers, then runs tiles of (up to 4 x rows) x (up to 8 weight rows) over a
// range of packed weight bytes. Layout of a prepared row (`lanes` = V packed weight bytes per step, F codes per
// packed byte = 8 / container bits): step s covers the F*V codes k in [s*F*V, (s+1)*F*V); the code of packed
// byte s*V + j, field f (k = s*F*V + j*F + f) sits at element s*F*V + f*V + j, so that one vector of field f
// lines up with one vector of x. The row is zero-padded to whole steps.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cpu/isa.h"

namespace lowbit::cpu {

// Tile arguments. x[i] (i < mr <= 4) point at prepared rows, w[j] (j < 8) at canonical packed weight rows of
// `w_bytes` bytes (rows j >= nr repeat a valid row and are ignored). Adds, for every i < mr and j < nr,
//   acc[i * acc_stride + j] += sum over packed bytes [b0, b1) of x_i . (w_j + weight_offset)
// with int32 wrap-around. b0 and b1 are multiples of `lanes` (b1 may pass w_bytes: the rest reads as zero codes).
struct PackedTile {
  const void* const* x;
  int mr;
  const uint8_t* const* w;
  int nr;
  int64_t b0, b1, w_bytes;
  int container_bits;  // 2, 4 or 8
  bool x_u8;           // activations span 0..255 (unsigned 8-bit): codes do not fit int8
  int32_t* acc;
  int64_t acc_stride;
  // Optional (nullptr: none): 8 row pointers of the weight bytes the driver visits next, offset so that pf[j] + b
  // for b in [b0, b1) covers them; tiles may prefetch them (a hint only, they never read them).
  const uint8_t* const* pf = nullptr;
};

// AMX GEMM path (packed_linear.cpp's AMX tasks): a task stages its weight columns once into the AMX B-tile
// layout over the whole K span (`amx_panel`), then runs blocks of 32 x rows against the staged columns with the
// sums kept in tile registers over all of K (`amx_block`).
//
// amx_panel: `cols` (a multiple of 32) canonical weight rows from w, packed bytes [0, span) (span a multiple of
// lanes; bytes past w_bytes read as zero codes) into `panel` (64-byte aligned, cols * span * 8 / container_bits
// bytes).
struct AmxPanel {
  const uint8_t* w;
  int64_t w_bytes, cols, span;
  int container_bits;
  uint8_t* panel;
};

// amx_block: for i < rows and j < cols (both multiples of 32), with the prepared x rows and the panel above,
//   acc[i * acc_stride + j] = sum over packed bytes [0, span) of x_i . w_j + weight_offset * rowsum[i]
// (int32 wrap-around; assigns, the PackedTile convention without the +=).
struct AmxBlock {
  const uint8_t* x;  // first x row
  int64_t x_stride, rows;
  const uint8_t* panel;
  int64_t cols, span;
  int container_bits;
  bool x_u8;
  int32_t weight_offset;
  const int32_t* rowsum;  // of the block's x rows
  int32_t* acc;
  int64_t acc_stride;
};

struct PackedLinearKernels {
  int lanes;       // V, packed weight bytes per step
  int elem_bytes;  // 1: int8/uint8 prepared codes; 2: int16
  // True when tiles return sum x * (w + 2^(container-1)) for activations that fit int8 (VNNI multiplies
  // unsigned by signed bytes); the driver subtracts 2^(container-1) * rowsum(x).
  bool offset_weights;
  void (*tile)(const PackedTile& t);
  // Optional (nullptr when absent, both or neither): AMX int8 tiles for the GEMM path.
  void (*amx_panel)(const AmxPanel& p);
  void (*amx_block)(const AmxBlock& b);
  // q[i] = round-half-even(float32(x[i]) / step) for i < n, IEEE division, no clamp (NaN stays NaN).
  void (*quantize_f32)(const float* x, float* q, int64_t n, float step);
  void (*quantize_f16)(const c10::Half* x, float* q, int64_t n, float step);
  void (*quantize_bf16)(const c10::BFloat16* x, float* q, int64_t n, float step);
  // Optional fast path of the driver's clamp / NaN / rowsum / layout pass for one row (1-byte layouts): reads
  // q (n values from quantize_*), writes the prepared row `out` (zero padding included, `out_len` bytes).
  // Returns true when the row holds a NaN.
  bool (*prepare_row)(const float* q, int64_t n, int fields, float lo, float hi, uint8_t* out, int64_t out_len,
                      int32_t* rowsum);
  // Optional (nullptr: the driver's scalar loop): out[j] = float32(int32(acc[j] - correction)) * scale[j]
  // (+ bias[j] when bias is not nullptr) for j < n, float32 multiply then add (never fused), as the scalar loop.
  void (*epilogue)(const int32_t* acc, int64_t n, uint32_t correction, const float* scale, const float* bias,
                   float* out);
  // True when tiles return sum x * (w + 2^(container-1)) for every activation range (the AVX2 byte tiles); the
  // driver subtracts 2^(container-1) * rowsum(x).
  bool offset_all = false;
};

namespace packed_avx512 {
PackedLinearKernels kernels();  // needs AVX-512 VNNI
}
namespace packed_avx2 {
PackedLinearKernels kernels();
PackedLinearKernels byte_kernels();  // 2- and 4-bit containers only
}
namespace packed_scalar {
PackedLinearKernels kernels();
}

// The avx512 level uses VNNI (vpdpbusd) when the CPU has it, else the AVX2 tiles (which every AVX-512 CPU runs);
// with AMX-INT8 (and the kernel's permission to use it), the GEMM path runs its 32x32 blocks on AMX tiles.
inline PackedLinearKernels packed_linear_kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: {
      if (!cpu_has_avx512_vnni()) return packed_avx2::kernels();
      PackedLinearKernels k = packed_avx512::kernels();
      if (!cpu_has_amx_int8()) k.amx_panel = nullptr, k.amx_block = nullptr;
      return k;
    }
    case Isa::kAvx2: return packed_avx2::kernels();
    default: return packed_scalar::kernels();
  }
}

// The kernels for one weight container: the AVX2 tiles take their byte variant for 2- and 4-bit containers.
inline PackedLinearKernels packed_linear_kernels(Isa isa, int container_bits) {
  PackedLinearKernels k = packed_linear_kernels(isa);
  const bool avx2_tiles = isa != Isa::kScalar && k.elem_bytes == 2;
  return avx2_tiles && container_bits <= 4 ? packed_avx2::byte_kernels() : k;
}

}  // namespace lowbit::cpu
