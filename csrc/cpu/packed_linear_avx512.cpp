// Packed GEMM tiles for the avx512 code path on CPUs with AVX-512 VNNI (vpdpbusd: unsigned bytes times signed
// bytes, four products summed into each int32 lane).
//
// Prepared activations are bytes (lanes = 64 packed weight bytes per step). Weights are unpacked in registers
// without sign extension: field f of a 2- or 4-bit container is shifted to the top of its byte and masked, so
// the byte holds code * 2^(8 - container) as a signed byte; the int32 sums are shifted back down by
// 8 - container bits after the horizontal reduction (exact: every lane is a multiple of the scale, and a tile's
// lane sums stay far below 2^31 for the driver's K chunks).
//
// vpdpbusd needs one unsigned operand:
//   x_u8 (unsigned 8-bit activations, 0..255):  x unsigned, weights signed as above.
//   otherwise (activations fit int8):            x signed; the weights' sign bits are flipped (one xor on the
//     packed byte flips every field), making each field code + 2^(container-1) unsigned; the driver subtracts
//     2^(container-1) * rowsum(x) afterwards (PackedLinearKernels::offset_weights).
// Every product is at most 255 * 128 in magnitude, so the int16 intermediates of vpdpbusd never overflow.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/packed_linear.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")
// gcc 12 false positive inside its own _mm512_cast*/extract intrinsics (the undefined upper lanes)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace lowbit::cpu::packed_avx512 {

#include "cpu/simd_scalar.h"
#include "cpu/simd_avx512.h"
using Vec = Avx512Vec;
#include "cpu/packed_linear_quantize.h"

namespace {

constexpr int kLanes = 64;

template <int kC>
constexpr int kSignBits = kC == 8 ? 0x80 : kC == 4 ? 0x88 : 0xAA;

// Field f of each packed byte, times 2^(8 - kC), in the byte's top bits.
template <int kC>
inline __m512i field(__m512i w, int f) {
  if constexpr (kC == 8) {
    return w;
  } else {
    const __m512i top = _mm512_set1_epi8(static_cast<char>((0xFF << (8 - kC)) & 0xFF));
    const int shift = 8 - kC * (f + 1);
    return _mm512_and_si512(shift ? _mm512_slli_epi16(w, shift) : w, top);
  }
}

// acc += u8 x s8 dot products (vpdpbusd), as an in-place asm update: gcc 12's register allocator copies (and
// spills) accumulators around the intrinsic in loops with many of them.
inline __attribute__((always_inline)) void dpbusd(__m512i& acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
}

// Four int32 vectors to the four sums (lane i of the result: sum of vector i).
inline __m128i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

inline void add_out(int32_t* out, __m128i sums, int count) {
  alignas(16) int32_t v[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(v), sums);
  for (int j = 0; j < count; ++j) out[j] = static_cast<int32_t>(static_cast<uint32_t>(out[j]) + static_cast<uint32_t>(v[j]));
}

// MR x rows against NR weight rows starting at w[j0].
template <int kC, bool kXu8, int MR, int NR>
void micro(const PackedTile& t, int i0, int j0) {
  constexpr int kF = 8 / kC;
  __m512i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  const uint8_t* x[MR];
  for (int i = 0; i < MR; ++i) x[i] = static_cast<const uint8_t*>(t.x[i0 + i]);
  const uint8_t* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = t.w[j0 + j];
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(kSignBits<kC>));
  const uint8_t* pf[NR];
  for (int j = 0; j < NR; ++j) pf[j] = t.pf ? t.pf[j0 + j] : nullptr;
  for (int64_t b = t.b0; b < t.b1; b += kLanes) {
    if (t.pf) {
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf[j] + b), _MM_HINT_T0);
    }
    const int64_t left = t.w_bytes - b;
    const __mmask64 mask = left >= kLanes ? ~__mmask64{0} : left > 0 ? (__mmask64{1} << left) - 1 : 0;
    __m512i packed[NR];
    for (int j = 0; j < NR; ++j) {
      packed[j] = _mm512_maskz_loadu_epi8(mask, w[j] + b);
      if constexpr (!kXu8) packed[j] = _mm512_xor_si512(packed[j], flip);
    }
    for (int f = 0; f < kF; ++f) {
      __m512i wf[NR];
      for (int j = 0; j < NR; ++j) wf[j] = field<kC>(packed[j], f);
      for (int i = 0; i < MR; ++i) {
        const __m512i xv = _mm512_loadu_si512(x[i] + b * kF + f * kLanes);
        for (int j = 0; j < NR; ++j) {
          acc[i][j] = kXu8 ? _mm512_dpbusd_epi32(acc[i][j], xv, wf[j]) : _mm512_dpbusd_epi32(acc[i][j], wf[j], xv);
        }
      }
    }
  }
  constexpr int kShift = 8 - kC;
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; j += 4) {
      if (j0 + j >= t.nr) break;
      const __m128i sums = _mm_srai_epi32(reduce4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3]), kShift);
      const int count = t.nr - (j0 + j) < 4 ? t.nr - (j0 + j) : 4;
      add_out(t.acc + (i0 + i) * t.acc_stride + j0 + j, sums, count);
    }
  }
}

// One x row (GEMV) against 8 weight rows, activations that fit int8, 2- or 4-bit weights. The weights are the
// unsigned operand after the sign flip (code + 2^(kC-1) in every field), so fields are masked where they are
// instead of shifted to the top of the byte:
//   4-bit: field 1 = p & 0xF0 (scale 16), field 0 = p & 0x0F (scale 1);                          no shift
//   2-bit: fields 3, 2 = p & 0xC0 (scale 64), p & 0x30 (scale 16); q = p << 4 (16-bit lanes: each byte's low
//          nibble moves to its high nibble), fields 1, 0 = q & 0xC0 (scale 64), q & 0x30 (scale 16); one shift
// Each row keeps two accumulators, one per scale (`hi`, `lo`); their lanes are exact multiples of the scale and
// far below 2^31 for the driver's K chunks, so arithmetic shifts bring them back to scale 1 exactly. Fewer
// vector ops per packed byte than `micro` (no shifts for 4-bit, one instead of three for 2-bit), and the loops
// are unrolled early so that gcc keeps all 16 accumulators in registers. The next weight group (t.pf) is
// prefetched one line per row and step: the GEMV streams W from memory once.
template <int kC>
void micro_gemv(const PackedTile& t) {
  constexpr int kF = 8 / kC, NR = 8;
  constexpr int kHiShift = kC == 2 ? 6 : 4, kLoShift = kC == 2 ? 4 : 0;
  __m512i hi[NR], lo[NR];
  _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) hi[j] = lo[j] = _mm512_setzero_si512();
  const uint8_t* x = static_cast<const uint8_t*>(t.x[0]);
  const uint8_t* w[NR];
  _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) w[j] = t.w[j];
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(kSignBits<kC>));
  const __m512i mhi = _mm512_set1_epi8(static_cast<char>(kC == 2 ? 0xC0 : 0xF0));
  const __m512i mlo = _mm512_set1_epi8(static_cast<char>(kC == 2 ? 0x30 : 0x0F));
#define LOWBIT_GEMV_STEP(j, packed)                                                 \
  do {                                                                              \
    const __m512i p = _mm512_xor_si512(packed, flip);                               \
    if constexpr (kC == 4) {                                                        \
      dpbusd(hi[j], _mm512_and_si512(p, mhi), xv[1]);                               \
      dpbusd(lo[j], _mm512_and_si512(p, mlo), xv[0]);                               \
    } else {                                                                        \
      const __m512i q = _mm512_slli_epi16(p, 4);                                    \
      dpbusd(hi[j], _mm512_and_si512(p, mhi), xv[kF - 1]);                          \
      dpbusd(lo[j], _mm512_and_si512(p, mlo), xv[kF - 2]);                          \
      dpbusd(hi[j], _mm512_and_si512(q, mhi), xv[1]);                               \
      dpbusd(lo[j], _mm512_and_si512(q, mlo), xv[0]);                               \
    }                                                                               \
  } while (0)
  const int64_t b1 = t.b1, full_end = std::min(t.b1, t.w_bytes / kLanes * kLanes);
  int64_t b = t.b0;
  const uint8_t* const* pf = t.pf;
  for (; b < full_end; b += kLanes) {
    __m512i xv[kF];
    _Pragma("GCC unroll 8") for (int f = 0; f < kF; ++f) xv[f] = _mm512_loadu_si512(x + b * kF + f * kLanes);
    if (pf) {
      _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(pf[j] + b), _MM_HINT_T0);
      }
    }
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) LOWBIT_GEMV_STEP(j, _mm512_loadu_si512(w[j] + b));
  }
  for (; b < b1; b += kLanes) {  // the row's tail: bytes past w_bytes read as zero codes (x is zero there)
    const int64_t left = t.w_bytes - b;
    const __mmask64 mask = left > 0 ? (__mmask64{1} << left) - 1 : 0;
    __m512i xv[kF];
    _Pragma("GCC unroll 8") for (int f = 0; f < kF; ++f) xv[f] = _mm512_loadu_si512(x + b * kF + f * kLanes);
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) {
      LOWBIT_GEMV_STEP(j, _mm512_maskz_loadu_epi8(mask, w[j] + b));
    }
  }
#undef LOWBIT_GEMV_STEP
  __m512i total[NR];
  _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) {
    total[j] = _mm512_add_epi32(_mm512_srai_epi32(hi[j], kHiShift), _mm512_srai_epi32(lo[j], kLoShift));
  }
  add_out(t.acc, reduce4(total[0], total[1], total[2], total[3]), t.nr < 4 ? t.nr : 4);
  if (t.nr > 4) add_out(t.acc + 4, reduce4(total[4], total[5], total[6], total[7]), t.nr - 4);
}

template <int kC, bool kXu8>
void tile_impl(const PackedTile& t) {
  if constexpr (!kXu8 && kC != 8) {
    if (t.mr == 1) return micro_gemv<kC>(t);
  }
  switch (t.mr) {
    case 1: return micro<kC, kXu8, 1, 8>(t, 0, 0);
    case 2:
      micro<kC, kXu8, 2, 4>(t, 0, 0);
      if (t.nr > 4) micro<kC, kXu8, 2, 4>(t, 0, 4);
      return;
    case 3:
      micro<kC, kXu8, 3, 4>(t, 0, 0);
      if (t.nr > 4) micro<kC, kXu8, 3, 4>(t, 0, 4);
      return;
    default:
      micro<kC, kXu8, 4, 4>(t, 0, 0);
      if (t.nr > 4) micro<kC, kXu8, 4, 4>(t, 0, 4);
      return;
  }
}

template <int kC>
void tile_container(const PackedTile& t) {
  if (t.x_u8) return tile_impl<kC, true>(t);
  return tile_impl<kC, false>(t);
}

void tile(const PackedTile& t) {
  switch (t.container_bits) {
    case 2: return tile_container<2>(t);
    case 4: return tile_container<4>(t);
    default: return tile_container<8>(t);
  }
}


// ---- AMX ----------------------------------------------------------------------------------------------------
// A 32 x 32 block of the output is four int32 C tiles (tmm0-3); per 64 codes of K it loads two A tiles (x rows,
// tmm4-5) and two B tiles (tmm6-7) and issues four tile dot products. B tiles need the "VNNI layout" (row r holds
// the four codes 4r..4r+3 of each of 16 weight rows), so each 32-row weight panel of a K chunk is unpacked once
// into `panel` (field extraction as above, then a 16 x 16 dword transpose in registers) and reused by every x row
// of the block: a small L2-resident staging buffer, not an unpacked copy of W. Both operands may be signed
// (tdpbssd), so the weights need no sign flip; the prepared x layout is the VNNI tiles' one.

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void compiler_barrier() { asm volatile("" ::: "memory"); }

// 16 rows of 16 dwords to 16 columns (out[c] = dword c of every row), in place.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], lane L: rows 4i..4i+3 of column 4L + c
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // 4 x 4 transpose of 128-bit lanes of r[c], r[4 + c], r[8 + c], r[12 + c]
    const __m512i u0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), u1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i v0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(u0, v0, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(u0, v0, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(u1, v1, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(u1, v1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Panel of `cols` weight rows over packed bytes [0, span): 32-row group c, 16-row half g, 64 codes u (u = step *
// kF + field, the prepared x layout) at panel + ((c * 2 + g) * substeps + u) * 1024.
template <int kC>
void build_panel(const AmxPanel& a) {
  constexpr int kF = 8 / kC;
  const int64_t substeps = a.span / kLanes * kF;
  for (int64_t c = 0; c < a.cols / 32; ++c) {
    for (int g = 0; g < 2; ++g) {
      const uint8_t* w = a.w + (c * 32 + g * 16) * a.w_bytes;
      uint8_t* half = a.panel + (c * 2 + g) * substeps * 1024;
      for (int64_t b = 0; b < a.span; b += kLanes) {
        const int64_t left = a.w_bytes - b;
        const __mmask64 mask = left >= kLanes ? ~__mmask64{0} : left > 0 ? (__mmask64{1} << left) - 1 : 0;
        __m512i packed[16];
        for (int r = 0; r < 16; ++r) packed[r] = _mm512_maskz_loadu_epi8(mask, w + r * a.w_bytes + b);
        for (int f = 0; f < kF; ++f) {
          __m512i rows[16];
          for (int r = 0; r < 16; ++r) rows[r] = field<kC>(packed[r], f);
          transpose16(rows);
          uint8_t* out = half + (b / kLanes * kF + f) * 1024;
          for (int r = 0; r < 16; ++r) _mm512_store_si512(out + r * 64, rows[r]);
        }
      }
    }
  }
}

void amx_panel(const AmxPanel& a) {
  switch (a.container_bits) {
    case 2: return build_panel<2>(a);
    case 4: return build_panel<4>(a);
    default: return build_panel<8>(a);
  }
}

// 32 x rows by 32 weight rows per block (four int32 C tiles, 2 x 2), all of K in the tiles; per 64 codes two A
// tiles (x rows) and two B tiles (the panel), four tile dot products.
template <int kC, bool kXu8>
void amx_block_impl(const AmxBlock& a) {
  constexpr int kF = 8 / kC, kShift = 8 - kC;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  const int64_t substeps = a.span / kLanes * kF;
  const int64_t cstride = a.acc_stride * 4;
  // 2- and 4-bit fields are scaled by 2^kShift: tiles sum at most kChunkSub substeps (2048 packed bytes, like the
  // VNNI tiles' K chunks) before the shift back, so that no lane wraps; 8-bit sums wrap exactly as int32.
  constexpr int64_t kChunkSub = kShift == 0 ? std::numeric_limits<int64_t>::max() : 2048 / kLanes * kF;
  const bool chunked = substeps > kChunkSub;
  alignas(64) int32_t part[32][32];
  for (int64_t m0 = 0; m0 < a.rows; m0 += 32) {
    const uint8_t* x0 = a.x + m0 * a.x_stride;
    const uint8_t* x1 = x0 + 16 * a.x_stride;
    for (int64_t n0 = 0; n0 < a.cols; n0 += 32) {
      const uint8_t* p0 = a.panel + (n0 / 16) * substeps * 1024;
      const uint8_t* p1 = p0 + substeps * 1024;
      int32_t* c = a.acc + m0 * a.acc_stride + n0;
      for (int64_t u0 = 0; u0 < substeps; u0 += kChunkSub) {
        const int64_t u1 = std::min(substeps, u0 + kChunkSub);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t u = u0; u < u1; ++u) {
          _tile_loadd(4, x0 + u * 64, a.x_stride);
          _tile_loadd(6, p0 + u * 1024, 64);
          _tile_loadd(7, p1 + u * 1024, 64);
          _tile_loadd(5, x1 + u * 64, a.x_stride);
          if constexpr (kXu8) {
            _tile_dpbusd(0, 4, 6);
            _tile_dpbusd(1, 4, 7);
            _tile_dpbusd(2, 5, 6);
            _tile_dpbusd(3, 5, 7);
          } else {
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
          }
        }
        if (!chunked) {
          _tile_stored(0, c, cstride);
          _tile_stored(1, c + 16, cstride);
          _tile_stored(2, c + 16 * a.acc_stride, cstride);
          _tile_stored(3, c + 16 * a.acc_stride + 16, cstride);
          continue;
        }
        // scaled sums of one chunk, shifted back before they are added (exact, see the file's comment)
        _tile_stored(0, &part[0][0], 128);
        _tile_stored(1, &part[0][16], 128);
        _tile_stored(2, &part[16][0], 128);
        _tile_stored(3, &part[16][16], 128);
        compiler_barrier();
        for (int i = 0; i < 32; ++i) {
          for (int j = 0; j < 32; j += 16) {
            const __m512i sum = _mm512_srai_epi32(_mm512_load_si512(&part[i][j]), kShift);
            int32_t* out = c + i * a.acc_stride + j;
            _mm512_storeu_si512(out, u0 == 0 ? sum : _mm512_add_epi32(_mm512_loadu_si512(out), sum));
          }
        }
      }
    }
    compiler_barrier();
    if ((kShift != 0 && !chunked) || a.weight_offset != 0) {
      const int shift = chunked ? 0 : kShift;
      // the VNNI tiles' convention: sums include weight_offset * rowsum(x)
      for (int64_t i = m0; i < m0 + 32; ++i) {
        const uint32_t offset_sum = static_cast<uint32_t>(a.weight_offset) * static_cast<uint32_t>(a.rowsum[i]);
        const __m512i offset = _mm512_set1_epi32(static_cast<int32_t>(offset_sum));
        int32_t* out = a.acc + i * a.acc_stride;
        for (int64_t j = 0; j < a.cols; j += 16) {
          const __m512i sum = _mm512_srai_epi32(_mm512_loadu_si512(out + j), shift);
          _mm512_storeu_si512(out + j, _mm512_add_epi32(sum, offset));
        }
      }
    }
  }
  _tile_release();
}

void amx_block(const AmxBlock& a) {
  switch (a.container_bits) {
    case 2: return a.x_u8 ? amx_block_impl<2, true>(a) : amx_block_impl<2, false>(a);
    case 4: return a.x_u8 ? amx_block_impl<4, true>(a) : amx_block_impl<4, false>(a);
    default: return a.x_u8 ? amx_block_impl<8, true>(a) : amx_block_impl<8, false>(a);
  }
}

// ---- epilogue ----------------------------------------------------------------------------------------------
// float32(int32(acc - correction)) * scale (+ bias): cvtdq2ps, then a separate multiply and add (the build has
// -ffp-contract=off, and the intrinsics are not fused), lane for lane the scalar loop's operations.
void epilogue(const int32_t* acc, int64_t n, uint32_t correction, const float* scale, const float* bias,
              float* out) {
  const __m512i corr = _mm512_set1_epi32(static_cast<int32_t>(correction));
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t left = n - j;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512i a = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(m, acc + j), corr);
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_maskz_loadu_ps(m, scale + j));
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + j));
    _mm512_mask_storeu_ps(out + j, m, v);
  }
}


// ---- prepared activation rows ------------------------------------------------------------------------------
// Clamp, NaN check and code sum 16 values at a time into a linear byte row, then (2- and 4-bit weights) the
// field layout: per 64 packed bytes, field f of byte j is code F*j + f, so field f gathers every F-th byte
// (vpmovwb / vpmovdb narrow 16- / 32-bit lanes after shifting the wanted byte down).
bool prepare_row(const float* q, int64_t n, int fields, float lo, float hi, uint8_t* out, int64_t out_len,
                 int32_t* rowsum) {
  thread_local std::vector<uint8_t> scratch;
  if (fields != 1 && static_cast<int64_t>(scratch.size()) < out_len) scratch.resize(static_cast<size_t>(out_len));
  uint8_t* lin = fields == 1 ? out : scratch.data();
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  __m512i sum = _mm512_setzero_si512();
  __mmask16 nan = 0;
  for (int64_t i = 0; i < out_len; i += 16) {
    const int64_t left = n - i;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : __mmask16(0);
    const __m512 v = _mm512_maskz_loadu_ps(m, q + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i code = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, vlo), vhi));  // exact: integral
    const __m512i kept = _mm512_maskz_mov_epi32(m & ~_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), code);
    sum = _mm512_add_epi32(sum, kept);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lin + i), _mm512_cvtepi32_epi8(kept));
  }
  *rowsum = _mm512_reduce_add_epi32(sum);
  if (fields == 2) {
    for (int64_t b = 0; b < out_len; b += 128) {
      const __m512i a0 = _mm512_loadu_si512(lin + b), a1 = _mm512_loadu_si512(lin + b + 64);
      for (int f = 0; f < 2; ++f) {
        const __m256i lo0 = _mm512_cvtepi16_epi8(_mm512_srli_epi16(a0, 8 * f));
        const __m256i lo1 = _mm512_cvtepi16_epi8(_mm512_srli_epi16(a1, 8 * f));
        _mm512_storeu_si512(out + b + 64 * f, _mm512_inserti64x4(_mm512_castsi256_si512(lo0), lo1, 1));
      }
    }
  } else if (fields == 4) {
    for (int64_t b = 0; b < out_len; b += 256) {
      __m512i a[4];
      for (int i = 0; i < 4; ++i) a[i] = _mm512_loadu_si512(lin + b + 64 * i);
      for (int f = 0; f < 4; ++f) {
        for (int i = 0; i < 4; ++i) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b + 64 * f + 16 * i),
                           _mm512_cvtepi32_epi8(_mm512_srli_epi32(a[i], 8 * f)));
        }
      }
    }
  }
  return nan != 0;
}

}  // namespace

PackedLinearKernels kernels() {
  return {kLanes, 1, true, &tile, &amx_panel, &amx_block, &quantize_f32, &quantize_f16, &quantize_bf16, &prepare_row,
          &epilogue};
}

}  // namespace lowbit::cpu::packed_avx512

#pragma GCC pop_options
