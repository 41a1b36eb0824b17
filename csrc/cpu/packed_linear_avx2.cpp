// Packed GEMM tiles for the avx2 code path (and the avx512 level on CPUs without VNNI).
//
// Prepared activations are int16 (lanes = 16 packed weight bytes per step). Weights are unpacked in registers:
// 16 packed bytes are zero/sign-extended to 16-bit lanes, and field f of a 2- or 4-bit container is moved to the
// top of the lane and arithmetically shifted back down (sign extension). _mm256_madd_epi16 multiplies int16 pairs
// and adds each pair into int32: |x| <= 255 and |w| <= 128 give pair sums of at most 65280, exact. (The faster
// _mm256_maddubs_epi16 would saturate its int16 pair sums for 8-bit weights, 255 * 128 * 2 > 32767, so it is
// not used.)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/packed_linear.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace lowbit::cpu::packed_avx2 {

#include "cpu/simd_scalar.h"
#include "cpu/simd_avx2.h"
using Vec = Avx2Vec;
#include "cpu/packed_linear_quantize.h"

namespace {

constexpr int kLanes = 16;

// 16 packed bytes widened to 16-bit lanes; past the row end the bytes read as zero.
template <int kC>
inline __m256i load_weights(const uint8_t* row, int64_t b, int64_t w_bytes) {
  __m128i raw;
  if (b + kLanes <= w_bytes) {
    raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b));
  } else {
    alignas(16) uint8_t tail[kLanes] = {};
    if (w_bytes > b) std::memcpy(tail, row + b, static_cast<size_t>(w_bytes - b));
    raw = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
  }
  return kC == 8 ? _mm256_cvtepi8_epi16(raw) : _mm256_cvtepu8_epi16(raw);
}

// Field f of each 16-bit lane (one packed byte) as a signed code.
template <int kC>
inline __m256i field(__m256i w, int f) {
  if constexpr (kC == 8) return w;
  return _mm256_srai_epi16(_mm256_slli_epi16(w, 16 - kC * (f + 1)), 16 - kC);
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// MR x rows against 4 weight rows starting at w[j0]; kPrefetch: touch the driver's next rows (t.pf) on the way
// (a template flag, so that the loop without it compiles as before: a run-time test in it cost 20% at M = 1024).
template <int kC, int MR, bool kPrefetch>
void micro(const PackedTile& t, int i0, int j0) {
  constexpr int kF = 8 / kC;
  __m256i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_si256();
  const int16_t* x[MR];
  for (int i = 0; i < MR; ++i) x[i] = static_cast<const int16_t*>(t.x[i0 + i]);
  for (int64_t b = t.b0; b < t.b1; b += kLanes) {
    if (kPrefetch && (b & 63) == 0) {  // the next weight rows the driver reads, one cache line each per 64 bytes
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(t.pf[j0 + j] + b), _MM_HINT_T0);
    }
    __m256i w[4];
    for (int j = 0; j < 4; ++j) w[j] = load_weights<kC>(t.w[j0 + j], b, t.w_bytes);
    for (int f = 0; f < kF; ++f) {
      __m256i xv[MR];
      for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i] + b * kF + f * kLanes));
      for (int j = 0; j < 4; ++j) {
        const __m256i wf = field<kC>(w[j], f);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv[i], wf));
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < 4 && j0 + j < t.nr; ++j) {
      int32_t* out = t.acc + (i0 + i) * t.acc_stride + j0 + j;
      *out = static_cast<int32_t>(static_cast<uint32_t>(*out) + static_cast<uint32_t>(hsum(acc[i][j])));
    }
  }
}

template <int kC, bool kPrefetch>
void tile_impl(const PackedTile& t) {
  for (int j0 = 0; j0 < t.nr; j0 += 4) {
    int i0 = 0;
    for (; i0 + 2 <= t.mr; i0 += 2) micro<kC, 2, kPrefetch>(t, i0, j0);
    if (i0 < t.mr) micro<kC, 1, kPrefetch>(t, i0, j0);
  }
}

template <bool kPrefetch>
void tile_for(const PackedTile& t) {
  switch (t.container_bits) {
    case 2: return tile_impl<2, kPrefetch>(t);
    case 4: return tile_impl<4, kPrefetch>(t);
    default: return tile_impl<8, kPrefetch>(t);
  }
}

void tile(const PackedTile& t) { return t.pf ? tile_for<true>(t) : tile_for<false>(t); }

// ---- byte tiles for 2- and 4-bit containers (issue 17) ------------------------------------------------------
//
// Prepared activations are bytes (lanes = 32 packed weight bytes per step). The weights' sign bits are flipped
// (one xor per packed byte), so field f is code + 2^(container-1): unsigned and at most 15. _mm256_maddubs_epi16
// multiplies unsigned by signed bytes and adds pairs into int16: x_u8 activations (0..255) are the unsigned side,
// int8 activations the signed side, and the pair sums stay far below 2^15 (2 * 255 * 15). The driver subtracts
// 2^(container-1) * rowsum(x) (PackedLinearKernels::offset_all). Twice the products per instruction of the
// int16 tiles above, whose 8-bit containers keep them.

constexpr int kByteLanes = 32;

template <int kC>
inline __m256i load_flipped(const uint8_t* row, int64_t b, int64_t w_bytes) {
  constexpr int kSign = kC == 4 ? 0x88 : 0xAA;
  __m256i raw;
  if (b + kByteLanes <= w_bytes) {
    raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b));
  } else {
    alignas(32) uint8_t tail[kByteLanes];
    for (int i = 0; i < kByteLanes; ++i) tail[i] = 0;
    for (int64_t i = 0; b + i < w_bytes; ++i) tail[i] = row[b + i];
    raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
  }
  return _mm256_xor_si256(raw, _mm256_set1_epi8(static_cast<char>(kSign)));
}

// Field f of each flipped byte, as an unsigned byte code + 2^(kC-1).
template <int kC>
inline __m256i byte_field(__m256i w, int f) {
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << kC) - 1));
  return _mm256_and_si256(f ? _mm256_srli_epi16(w, kC * f) : w, mask);
}

template <int kC, int MR, bool kXu8, bool kPrefetch>
void micro_bytes(const PackedTile& t, int i0, int j0) {
  constexpr int kF = 8 / kC;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_si256();
  const uint8_t* x[MR];
  for (int i = 0; i < MR; ++i) x[i] = static_cast<const uint8_t*>(t.x[i0 + i]);
  for (int64_t b = t.b0; b < t.b1; b += kByteLanes) {
    if (kPrefetch && (b & 63) == 0) {  // the next weight rows the driver reads, one cache line each per 64 bytes
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(t.pf[j0 + j] + b), _MM_HINT_T0);
    }
    __m256i xv[MR][kF];
    for (int i = 0; i < MR; ++i)
      for (int f = 0; f < kF; ++f)
        xv[i][f] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i] + b * kF + f * kByteLanes));
    for (int j = 0; j < 4; ++j) {
      const __m256i w = load_flipped<kC>(t.w[j0 + j], b, t.w_bytes);
      __m256i sums[MR];
      for (int f = 0; f < kF; ++f) {
        const __m256i wf = byte_field<kC>(w, f);
        for (int i = 0; i < MR; ++i) {
          const __m256i prod = kXu8 ? _mm256_maddubs_epi16(xv[i][f], wf) : _mm256_maddubs_epi16(wf, xv[i][f]);
          sums[i] = f ? _mm256_add_epi16(sums[i], prod) : prod;
        }
      }
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(sums[i], ones));
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < 4 && j0 + j < t.nr; ++j) {
      int32_t* out = t.acc + (i0 + i) * t.acc_stride + j0 + j;
      *out = static_cast<int32_t>(static_cast<uint32_t>(*out) + static_cast<uint32_t>(hsum(acc[i][j])));
    }
  }
}

template <int kC, bool kXu8, bool kPrefetch>
void tile_bytes_impl(const PackedTile& t) {
  for (int j0 = 0; j0 < t.nr; j0 += 4) {
    int i0 = 0;
    for (; i0 + 2 <= t.mr; i0 += 2) micro_bytes<kC, 2, kXu8, kPrefetch>(t, i0, j0);
    if (i0 < t.mr) micro_bytes<kC, 1, kXu8, kPrefetch>(t, i0, j0);
  }
}

template <bool kPrefetch>
void tile_bytes_for(const PackedTile& t) {
  if (t.container_bits == 2) {
    return t.x_u8 ? tile_bytes_impl<2, true, kPrefetch>(t) : tile_bytes_impl<2, false, kPrefetch>(t);
  }
  return t.x_u8 ? tile_bytes_impl<4, true, kPrefetch>(t) : tile_bytes_impl<4, false, kPrefetch>(t);
}

void tile_bytes(const PackedTile& t) { return t.pf ? tile_bytes_for<true>(t) : tile_bytes_for<false>(t); }

}  // namespace

PackedLinearKernels kernels() {
  return {kLanes, 2, false, &tile, nullptr, nullptr, &quantize_f32, &quantize_f16, &quantize_bf16, nullptr, nullptr};
}

PackedLinearKernels byte_kernels() {
  PackedLinearKernels k{kByteLanes, 1, false, &tile_bytes, nullptr, nullptr, &quantize_f32, &quantize_f16,
                        &quantize_bf16, nullptr, nullptr};
  k.offset_all = true;
  return k;
}

}  // namespace lowbit::cpu::packed_avx2

#pragma GCC pop_options
