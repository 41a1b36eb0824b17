// Packed inference GEMM (SPEC section 4) on CUDA tensors, lowbit._C.cuda.packed_linear:
//
//   y[m, n] = float32(acc[m, n]) * float32(x_step * w_scale[n]) + bias[n],   acc = sum_k qx[m, k] * qw[n, k]
//
// bit for bit as the reference backend (lowbit/ops/packed_linear.py has the contract). Three steps:
//
// 1. quantize_kernel: x (M, K) -> activation codes, one byte each, and one NaN flag per row. Codes are
//    clamp(rint(x / x_step), qmin, qmax) with IEEE division and round half to even (cuda/rounding.cuh); unsigned
//    codes (0..255) stay unsigned bytes, because dp4a multiplies u8 x s8 directly (no shift and correction needed).
//    The buffer is laid out for the weight format, so that the GEMMs never shuffle bytes (see "Layout").
// 2. GEMV (M <= 16) or GEMM (M > 16) on the packed weights, both with dp4a (4 byte products + int32 add per
//    instruction), weights unpacked in registers (mask, sign-extend four bytes at once with integer ops).
// 3. The float32 epilogue, inside the GEMV / GEMM (or in split_epilogue_kernel after a split-K GEMV).
//
// Layout. A 32-bit word of packed weights holds 4 bytes; byte j holds codes PB * j + g (g < PB = codes per byte,
// field g at bits g * width). Unpacking field g of all four bytes gives one dp4a operand, "group g": the codes
// PB * j + g for j = 0..3. The activation buffer stores its codes in the same groups: activation word PB * w + g
// of a row holds codes 4 * PB * w + PB * j + g (j = 0..3), i.e. codes are permuted inside each run of 4 * PB. Rows
// are padded with zero codes to a whole number of 16-byte weight vectors (KBp = round_up(KB, 16) weight bytes, so
// KBp * PB / 4 activation words per row, always 16-byte aligned). Zero activation codes past K also cancel whatever
// the padding fields of the last weight byte hold, as the reference ignores them.
//
// GEMV: one warp per output column, 8 per block; each lane walks 16-byte weight vectors of its split of K (split-K
// over blockIdx.y when there are too few columns to fill the GPU) and keeps one int32 accumulator per row; a warp
// shuffle adds the lanes. One split: the warp applies the epilogue. Several: int32 partials (splits, M, N), summed
// by split_epilogue_kernel. Integer sums are exact, so every split count gives the same bits.
//
// GEMM: 64 x 64 output tiles per 256-thread block, 4 x 4 per thread; per step of 32 weight bytes per column, the
// activation words and the unpacked weight groups go to shared memory, then each thread runs its dp4a's.
// (A tensor-core path, mma.sync m16n8k32 s8/u8 x s8, is future work.)
//
// Never run on a GPU so far: `make cuda-check` compiles it for sm_90 and sm_80 (dp4a needs sm_61+).
// LOWBIT_PACKED_LINEAR_HOST_EMULATION leaves out the torch parts (launchers, op entry point, binding), so a
// host program can include this file and run the __host__ __device__ helpers the kernels are built from.
#if !defined(LOWBIT_PACKED_LINEAR_HOST_EMULATION)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "bind.h"
#include "checks.h"
#include "cuda/launch.cuh"
#endif
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "cuda/rounding.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;          // threads of every block
constexpr int kWarps = kThreads / 32;  // GEMV: columns per block
constexpr int kVecBytes = 16;          // weight bytes per vector load
constexpr int kMaxSplits = 16;         // GEMV split-K
constexpr int kGemvMaxRows = 16;
// GEMM tiling: 64 x 64 outputs per block, 16 x 16 threads with 4 x 4 outputs each, kStepVecs weight vectors
// (kStepVecs * 16 bytes) per column per step.
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kThreadTile = 4;
constexpr int kStepVecs = 2;
static_assert(kTileM / kThreadTile * (kTileN / kThreadTile) == kThreads, "one thread per 4 x 4 outputs");

// ---------------------------------------------------------------------------------------------------------------
// Element and word math (__host__ __device__, free of memory access: a host emulation can run it).

template <typename T>
LOWBIT_HD T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Field g of each byte of the packed word p, sign-extended from the container width to a whole byte: the dp4a
// operand "group g" (codes PB * j + g of the word for bytes j = 0..3).
template <int kWidth>
LOWBIT_HD uint32_t unpack_group(uint32_t p, int g) {
  if constexpr (kWidth == 8) {
    (void)g;
    return p;
  } else {
    constexpr uint32_t kLow = kWidth == 4 ? 0x0F0F0F0Fu : 0x03030303u;
    constexpr uint32_t kFill = kWidth == 4 ? 0xF0u : 0xFCu;  // the bits above the field, per byte
    const uint32_t v = (p >> (g * kWidth)) & kLow;
    // The sign bit of each byte's field, moved to bit 0 of its byte (bits from the next byte are masked off), times
    // the fill: no byte carries into the next.
    return v | (((v >> (kWidth - 1)) & 0x01010101u) * kFill);
  }
}

// acc + sum_j a.byte[j] * b.byte[j], a unsigned or signed bytes (activation codes), b signed bytes (weights).
template <bool kSignedX>
LOWBIT_HD int32_t dot4(uint32_t a, uint32_t b, int32_t acc) {
#if defined(__CUDA_ARCH__)
  if constexpr (kSignedX) {
    return __dp4a(static_cast<int>(a), static_cast<int>(b), acc);
  } else {
    int32_t d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(acc));
    return d;
  }
#else
  // Host emulation: the same products, wrapping int32 sum like the instruction.
  uint32_t sum = static_cast<uint32_t>(acc);
  for (int j = 0; j < 4; ++j) {
    const uint32_t ab = (a >> (8 * j)) & 0xFFu;
    const int32_t av = kSignedX ? static_cast<int32_t>(static_cast<int8_t>(ab)) : static_cast<int32_t>(ab);
    const int32_t bv = static_cast<int8_t>((b >> (8 * j)) & 0xFFu);
    sum += static_cast<uint32_t>(av * bv);
  }
  return static_cast<int32_t>(sum);
#endif
}

// The activation code of x as one byte: clamp(rint(x / step), qmin, qmax), 0 for NaN (its row is flagged).
LOWBIT_HD uint32_t activation_code(float x, float step, float qmin, float qmax) {
  const float level = quantize_level(x, step, qmin, qmax);
  if (level != level) return 0u;  // NaN
  return static_cast<uint32_t>(static_cast<int32_t>(level)) & 0xFFu;
}

// The contract's float32 epilogue, each operation rounded on its own.
LOWBIT_HD float epilogue_value(int32_t acc, float x_step, float w_scale, const float* bias, int64_t n, bool nan_row) {
  float v = mul_rn(static_cast<float>(acc), mul_rn(x_step, w_scale));
  if (bias != nullptr) v = add_rn(v, bias[n]);
  return nan_row ? NAN : v;
}

// Activation word d of a row of the buffer: the codes 4 * PB * (d / PB) + PB * j + d % PB for bytes j = 0..3, zero
// codes past K. Sets `nan` when one of those x is NaN.
template <typename scalar_t, int kPB>
LOWBIT_HD uint32_t activation_word(const scalar_t* xrow, int64_t K, int64_t d, float step, float qmin, float qmax,
                                   bool& nan) {
  const int64_t w = d / kPB;
  const int64_t g = d - w * kPB;
  uint32_t word = 0u;
  for (int j = 0; j < 4; ++j) {
    const int64_t k = 4 * kPB * w + kPB * j + g;
    if (k < K) {
      const float v = static_cast<float>(xrow[k]);
      nan = nan || v != v;
      word |= activation_code(v, step, qmin, qmax) << (8 * j);
    }
  }
  return word;
}

// Position, among the 4 * PB activation words of a 16-byte weight vector, of group g of the vector's word `word`.
template <int kPB>
LOWBIT_HD int group_slot(int word, int g) {
  return word * kPB + g;
}

// acc + the dot product of one 16-byte weight vector (4 packed words) with its 4 * PB activation words. (No
// #pragma unroll in __host__ __device__ code, which the host compiler would warn about; nvcc unrolls these
// constant-trip loops anyway.)
template <int kWidth, bool kSignedX>
LOWBIT_HD int32_t vector_dot(const uint32_t (&w)[4], const uint32_t (&x)[4 * (8 / kWidth)], int32_t acc) {
  constexpr int kPB = 8 / kWidth;
  for (int word = 0; word < 4; ++word) {
    for (int g = 0; g < kPB; ++g) acc = dot4<kSignedX>(x[group_slot<kPB>(word, g)], unpack_group<kWidth>(w[word], g), acc);
  }
  return acc;
}

// ---------------------------------------------------------------------------------------------------------------
// Device helpers.

// 16 weight bytes of row `row` from byte `byte` on, zeros past the row's kb bytes. kb % 16 == 0 with a 16-byte
// aligned base takes one vector load; other shapes assemble the vector byte by byte.
__device__ __forceinline__ uint4 load_weight_vec(const uint8_t* __restrict__ row, int64_t byte, int64_t kb,
                                                 bool vector_ok) {
  if (vector_ok) return __ldg(reinterpret_cast<const uint4*>(row + byte));
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int b = 0; b < kVecBytes; ++b) {
    if (byte + b < kb) w[b / 4] |= static_cast<uint32_t>(__ldg(row + byte + b)) << (8 * (b % 4));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

template <typename scalar_t>
__device__ __forceinline__ void store_output(scalar_t* __restrict__ y, int64_t m, int64_t n, int64_t N, int32_t acc,
                                             float x_step, const float* __restrict__ w_scale,
                                             const float* __restrict__ bias, const int32_t* __restrict__ nan_rows) {
  y[m * N + n] = static_cast<scalar_t>(epilogue_value(acc, x_step, w_scale[n], bias, n, nan_rows[m] != 0));
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Activation quantization into the permuted layout: one thread per activation word (4 codes).

template <typename scalar_t, int kPB>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const scalar_t* __restrict__ x, uint32_t* __restrict__ xq, int32_t* __restrict__ nan_rows,
                    const float* __restrict__ x_step, int64_t M, int64_t K, int64_t row_words, float qmin,
                    float qmax) {
  const float step = x_step[0];
  const int64_t words = M * row_words;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / row_words;
    bool nan = false;
    const uint32_t word = activation_word<scalar_t, kPB>(x + m * K, K, i - m * row_words, step, qmin, qmax, nan);
    xq[i] = word;
    // Every thread that meets a NaN of row m stores the same 1 into the zeroed flags: no atomics needed.
    if (nan) nan_rows[m] = 1;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 2a. GEMV, M <= kRows <= 16: a warp per column, lanes over the 16-byte weight vectors of the block's K split.

template <typename scalar_t, int kWidth, bool kSignedX, int kRows>
__global__ void __launch_bounds__(kThreads)
    gemv_kernel(const uint32_t* __restrict__ xq, const uint8_t* __restrict__ w, scalar_t* __restrict__ y,
                int32_t* __restrict__ partial, const float* __restrict__ x_step, const float* __restrict__ w_scale,
                const float* __restrict__ bias, const int32_t* __restrict__ nan_rows, int64_t M, int64_t N,
                int64_t kb, int64_t row_words, int64_t vecs_per_split, bool vector_ok) {
  constexpr int kPB = 8 / kWidth;
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= N) return;  // whole warps only; no block-wide synchronisation follows
  const int64_t split = blockIdx.y;
  const int64_t vecs = ceil_div<int64_t>(kb, kVecBytes);
  const int64_t v_begin = split * vecs_per_split;
  const int64_t v_end = v_begin + vecs_per_split < vecs ? v_begin + vecs_per_split : vecs;
  const uint8_t* row = w + n * kb;

  int32_t acc[kRows];
#pragma unroll
  for (int m = 0; m < kRows; ++m) acc[m] = 0;

  for (int64_t v = v_begin + lane; v < v_end; v += 32) {
    const uint4 wv = load_weight_vec(row, v * kVecBytes, kb, vector_ok);
    const uint32_t wwords[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      if (m < M) {
        // The vector's 4 * PB activation words: PB 16-byte loads.
        const uint4* xrow = reinterpret_cast<const uint4*>(xq + m * row_words) + v * kPB;
        uint32_t xwords[4 * kPB];
#pragma unroll
        for (int q = 0; q < kPB; ++q) {
          const uint4 xv = __ldg(xrow + q);
          xwords[4 * q] = xv.x;
          xwords[4 * q + 1] = xv.y;
          xwords[4 * q + 2] = xv.z;
          xwords[4 * q + 3] = xv.w;
        }
        acc[m] = vector_dot<kWidth, kSignedX>(wwords, xwords, acc[m]);
      }
    }
  }

#pragma unroll
  for (int m = 0; m < kRows; ++m) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], offset);
  }
  if (lane != 0) return;
  if (gridDim.y == 1) {
    const float s = x_step[0];
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      if (m < M) store_output(y, m, n, N, acc[m], s, w_scale, bias, nan_rows);
    }
  } else {
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      if (m < M) partial[(split * M + m) * N + n] = acc[m];
    }
  }
}

// Sums the splits' partials (exact integers: any order gives the same) and applies the epilogue.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    split_epilogue_kernel(const int32_t* __restrict__ partial, scalar_t* __restrict__ y,
                          const float* __restrict__ x_step, const float* __restrict__ w_scale,
                          const float* __restrict__ bias, const int32_t* __restrict__ nan_rows, int64_t M, int64_t N,
                          int64_t splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  int32_t acc = 0;
  for (int64_t s = 0; s < splits; ++s) acc += partial[s * M * N + i];
  const int64_t m = i / N;
  store_output(y, m, i - m * N, N, acc, x_step[0], w_scale, bias, nan_rows);
}

// ---------------------------------------------------------------------------------------------------------------
// 2b. GEMM: 64 x 64 tiles, dp4a from shared memory.

template <typename scalar_t, int kWidth, bool kSignedX>
__global__ void __launch_bounds__(kThreads)
    gemm_kernel(const uint32_t* __restrict__ xq, const uint8_t* __restrict__ w, scalar_t* __restrict__ y,
                const float* __restrict__ x_step, const float* __restrict__ w_scale, const float* __restrict__ bias,
                const int32_t* __restrict__ nan_rows, int64_t M, int64_t N, int64_t kb, int64_t row_words,
                int64_t n_tiles, bool vector_ok) {
  constexpr int kPB = 8 / kWidth;
  constexpr int kStepWords = kStepVecs * 4 * kPB;  // activation words (= weight groups) per row per step
  constexpr int kStride = kStepWords + 1;          // odd: a warp's 16 different rows fall in 16 different banks
  __shared__ uint32_t xs[kTileM][kStride];
  __shared__ uint32_t ws[kTileN][kStride];

  const int64_t tile_m = blockIdx.x / n_tiles;
  const int64_t tile_n = blockIdx.x - tile_m * n_tiles;
  const int64_t m0 = tile_m * kTileM;
  const int64_t n0 = tile_n * kTileN;
  const int tx = threadIdx.x % 16;  // columns tx + 16 * j
  const int ty = threadIdx.x / 16;  // rows ty + 16 * i

  int32_t acc[kThreadTile][kThreadTile];
#pragma unroll
  for (int i = 0; i < kThreadTile; ++i) {
#pragma unroll
    for (int j = 0; j < kThreadTile; ++j) acc[i][j] = 0;
  }

  const int64_t vecs = ceil_div<int64_t>(kb, kVecBytes);
  for (int64_t v0 = 0; v0 < vecs; v0 += kStepVecs) {
    // Activations: kTileM rows x kStepWords words, as 16-byte loads (rows past M and vectors past the row: 0).
    constexpr int kXLoads = kTileM * kStepWords / 4;
    for (int l = threadIdx.x; l < kXLoads; l += kThreads) {
      const int r = l / (kStepWords / 4);
      const int c = l - r * (kStepWords / 4);  // 16-byte unit inside the step
      const int64_t m = m0 + r;
      const int64_t vec = v0 + c / kPB;  // each weight vector has PB activation units
      uint4 xv = make_uint4(0u, 0u, 0u, 0u);
      if (m < M && vec < vecs) xv = __ldg(reinterpret_cast<const uint4*>(xq + m * row_words) + v0 * kPB + c);
      xs[r][4 * c] = xv.x;
      xs[r][4 * c + 1] = xv.y;
      xs[r][4 * c + 2] = xv.z;
      xs[r][4 * c + 3] = xv.w;
    }
    // Weights: kTileN columns x kStepVecs vectors, unpacked into groups in the activation words' order.
    for (int l = threadIdx.x; l < kTileN * kStepVecs; l += kThreads) {
      const int r = l / kStepVecs;
      const int c = l - r * kStepVecs;
      const int64_t n = n0 + r;
      const int64_t vec = v0 + c;
      uint4 wv = make_uint4(0u, 0u, 0u, 0u);
      if (n < N && vec < vecs) wv = load_weight_vec(w + n * kb, vec * kVecBytes, kb, vector_ok);
#pragma unroll
      for (int word = 0; word < 4; ++word) {
#pragma unroll
        for (int g = 0; g < kPB; ++g) {
          ws[r][c * 4 * kPB + group_slot<kPB>(word, g)] = unpack_group<kWidth>(word_of(wv, word), g);
        }
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int kw = 0; kw < kStepWords; ++kw) {
      uint32_t a[kThreadTile];
      uint32_t b[kThreadTile];
#pragma unroll
      for (int i = 0; i < kThreadTile; ++i) a[i] = xs[ty + 16 * i][kw];
#pragma unroll
      for (int j = 0; j < kThreadTile; ++j) b[j] = ws[tx + 16 * j][kw];
#pragma unroll
      for (int i = 0; i < kThreadTile; ++i) {
#pragma unroll
        for (int j = 0; j < kThreadTile; ++j) acc[i][j] = dot4<kSignedX>(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

  const float s = x_step[0];
#pragma unroll
  for (int i = 0; i < kThreadTile; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < kThreadTile; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n < N) store_output(y, m, n, N, acc[i][j], s, w_scale, bias, nan_rows);
    }
  }
}

#if !defined(LOWBIT_PACKED_LINEAR_HOST_EMULATION)
// ---------------------------------------------------------------------------------------------------------------
// Launchers.

struct Problem {
  const uint32_t* xq;
  const uint8_t* w;
  const float* x_step;
  const float* w_scale;
  const float* bias;  // nullptr without bias
  const int32_t* nan_rows;
  int64_t M;
  int64_t N;
  int64_t kb;
  int64_t row_words;
  bool vector_ok;
  int device;
  cudaStream_t stream;
};

template <typename scalar_t, int kWidth, bool kSignedX, int kRows>
void launch_gemv(const Problem& p, scalar_t* y, const at::Tensor& like) {
  const int64_t vecs = ceil_div<int64_t>(p.kb, kVecBytes);
  const int64_t col_blocks = ceil_div<int64_t>(p.N, kWarps);
  // Split K when the columns alone leave the GPU short of warps (2048 threads per SM resident), but keep at least
  // two vectors per lane in each split. The result does not depend on the split.
  const int64_t target = 2LL * multiprocessor_count(p.device) * (2048 / kThreads);
  int64_t splits = ceil_div<int64_t>(target, col_blocks);
  const int64_t by_work = vecs / 64;
  splits = splits < by_work ? splits : by_work;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  splits = splits < 1 ? 1 : splits;
  const int64_t vecs_per_split = ceil_div<int64_t>(vecs, splits);
  splits = ceil_div<int64_t>(vecs, vecs_per_split);  // no empty split
  at::Tensor partial;
  int32_t* partial_ptr = nullptr;
  if (splits > 1) {
    partial = at::empty({splits, p.M, p.N}, like.options().dtype(at::kInt));
    partial_ptr = partial.data_ptr<int32_t>();
  }
  const dim3 grid(grid_size(col_blocks, "packed_linear GEMV"), static_cast<unsigned int>(splits));
  gemv_kernel<scalar_t, kWidth, kSignedX, kRows><<<grid, kThreads, 0, p.stream>>>(
      p.xq, p.w, y, partial_ptr, p.x_step, p.w_scale, p.bias, p.nan_rows, p.M, p.N, p.kb, p.row_words,
      vecs_per_split, p.vector_ok);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const unsigned int blocks = grid_size(ceil_div<int64_t>(p.M * p.N, kThreads), "packed_linear split-K epilogue");
    split_epilogue_kernel<scalar_t><<<blocks, kThreads, 0, p.stream>>>(partial_ptr, y, p.x_step, p.w_scale, p.bias,
                                                                       p.nan_rows, p.M, p.N, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // `partial` is freed here while the kernels may still run: the caching allocator only reuses the block for work
  // queued later on this stream.
}

template <typename scalar_t, int kWidth, bool kSignedX>
void launch_matmul(const Problem& p, scalar_t* y, const at::Tensor& like) {
  if (p.M == 1) {
    launch_gemv<scalar_t, kWidth, kSignedX, 1>(p, y, like);
  } else if (p.M <= 4) {
    launch_gemv<scalar_t, kWidth, kSignedX, 4>(p, y, like);
  } else if (p.M <= kGemvMaxRows) {
    launch_gemv<scalar_t, kWidth, kSignedX, kGemvMaxRows>(p, y, like);
  } else {
    const int64_t n_tiles = ceil_div<int64_t>(p.N, kTileN);
    const unsigned int blocks = grid_size(ceil_div<int64_t>(p.M, kTileM) * n_tiles, "packed_linear GEMM");
    gemm_kernel<scalar_t, kWidth, kSignedX><<<blocks, kThreads, 0, p.stream>>>(
        p.xq, p.w, y, p.x_step, p.w_scale, p.bias, p.nan_rows, p.M, p.N, p.kb, p.row_words, n_tiles, p.vector_ok);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, int kWidth>
void run(const at::Tensor& x, Problem& p, uint32_t* xq, int32_t* nan_rows, scalar_t* y, int64_t qmin, int64_t qmax) {
  constexpr int kPB = 8 / kWidth;
  const int64_t words = p.M * p.row_words;
  const int64_t wanted = ceil_div<int64_t>(words, kThreads);
  const int64_t cap = static_cast<int64_t>(multiprocessor_count(p.device)) * 8;
  const unsigned int blocks = grid_size(wanted < cap ? wanted : cap, "packed_linear quantize");
  quantize_kernel<scalar_t, kPB><<<blocks, kThreads, 0, p.stream>>>(x.data_ptr<scalar_t>(), xq, nan_rows, p.x_step,
                                                                    p.M, x.size(1), p.row_words,
                                                                    static_cast<float>(qmin), static_cast<float>(qmax));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (qmin < 0) {
    launch_matmul<scalar_t, kWidth, true>(p, y, x);
  } else {
    launch_matmul<scalar_t, kWidth, false>(p, y, x);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Op entry point: check the invariants the Python layer guarantees, then dispatch.

at::Tensor packed_linear_cuda(const at::Tensor& x, const at::Tensor& packed_w, const at::Tensor& w_scale,
                              int64_t w_bits, const at::Tensor& x_step, int64_t qmin, int64_t qmax,
                              const std::optional<at::Tensor>& bias) {
  constexpr const char* kOp = "lowbit._C.cuda.packed_linear";
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), kOp, ": x must be a contiguous 2-d CUDA tensor");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              ": x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(w_bits >= 2 && w_bits <= 8, kOp, ": w_bits must be in 2..8, got ", w_bits);
  const int width = w_bits == 2 ? 2 : (w_bits <= 4 ? 4 : 8);
  const int64_t per_byte = 8 / width;
  const int64_t M = x.size(0);
  const int64_t K = x.size(1);
  TORCH_CHECK(packed_w.device() == x.device() && packed_w.scalar_type() == at::kByte && packed_w.dim() == 2 &&
                  packed_w.is_contiguous(),
              kOp, ": packed_w must be a contiguous 2-d uint8 tensor on x's device");
  const int64_t N = packed_w.size(0);
  const int64_t kb = packed_w.size(1);
  TORCH_CHECK(kb == ceil_div<int64_t>(K, per_byte), kOp, ": packed_w has ", kb, " bytes per row, K=", K, " needs ",
              ceil_div<int64_t>(K, per_byte));
  TORCH_CHECK(w_scale.device() == x.device() && w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() &&
                  w_scale.numel() == N,
              kOp, ": w_scale must be a contiguous float32 tensor of N=", N, " elements on x's device");
  TORCH_CHECK(x_step.device() == x.device() && x_step.scalar_type() == at::kFloat && x_step.numel() == 1, kOp,
              ": x_step must be one float32 element on x's device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == N,
                kOp, ": bias must be a contiguous float32 tensor of N=", N, " elements on x's device");
  }
  TORCH_CHECK(qmin <= qmax && qmin >= -128 && qmax <= 255 && (qmin >= 0 || qmax <= 127), kOp,
              ": [qmin, qmax] must be an 8-bit signed or unsigned range, got [", qmin, ", ", qmax, "]");
  check_values("x_step", x_step, /*positive=*/true);  // a host copy: one synchronisation
  check_values("w_scale", w_scale, /*positive=*/true);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) {
    // No products: acc = 0, then the same float32 epilogue (no row can hold a NaN).
    at::Tensor out = at::zeros({M, N}, x.options().dtype(at::kFloat)).mul(x_step.mul(w_scale));
    if (bias.has_value()) out = out.add(*bias);
    return out.to(dtype);
  }

  // Rows padded to whole 16-byte weight vectors: kb_padded * PB codes, a quarter as many words.
  const int64_t kb_padded = ceil_div<int64_t>(kb, kVecBytes) * kVecBytes;
  Problem p{};
  p.M = M;
  p.N = N;
  p.kb = kb;
  p.row_words = kb_padded * per_byte / 4;
  p.device = x.device().index();
  p.stream = c10::cuda::getCurrentCUDAStream(p.device).stream();
  at::Tensor xq = at::empty({M, p.row_words}, x.options().dtype(at::kInt));
  at::Tensor nan_rows = at::zeros({M}, x.options().dtype(at::kInt));
  p.xq = reinterpret_cast<const uint32_t*>(xq.data_ptr<int32_t>());
  p.w = packed_w.data_ptr<uint8_t>();
  p.vector_ok = kb % kVecBytes == 0 && is_aligned16(p.w);
  p.x_step = x_step.data_ptr<float>();
  p.w_scale = w_scale.data_ptr<float>();
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  p.nan_rows = nan_rows.data_ptr<int32_t>();
  uint32_t* xq_ptr = reinterpret_cast<uint32_t*>(xq.data_ptr<int32_t>());
  int32_t* nan_ptr = nan_rows.data_ptr<int32_t>();

  // Only the three dtypes the op takes (no double instantiations), then the weight container width.
  auto dispatch = [&](auto* y_ptr) {
    using scalar_t = std::remove_pointer_t<decltype(y_ptr)>;
    if (width == 2) {
      run<scalar_t, 2>(x, p, xq_ptr, nan_ptr, y_ptr, qmin, qmax);
    } else if (width == 4) {
      run<scalar_t, 4>(x, p, xq_ptr, nan_ptr, y_ptr, qmin, qmax);
    } else {
      run<scalar_t, 8>(x, p, xq_ptr, nan_ptr, y_ptr, qmin, qmax);
    }
  };
  if (dtype == at::kFloat) {
    dispatch(y.data_ptr<float>());
  } else if (dtype == at::kHalf) {
    dispatch(y.data_ptr<at::Half>());
  } else {
    dispatch(y.data_ptr<at::BFloat16>());
  }
  return y;
}

#endif  // !LOWBIT_PACKED_LINEAR_HOST_EMULATION

}  // namespace
}  // namespace cuda
}  // namespace lowbit

#if !defined(LOWBIT_PACKED_LINEAR_HOST_EMULATION)
namespace lowbit::cuda {
void bind_packed_linear(pybind11::module_& m) {
  using lowbit::ReleaseGil;
  using namespace pybind11::literals;  // "x"_a: argument names for help() and keyword calls
  m.def("packed_linear", &packed_linear_cuda, ReleaseGil(),
        "x"_a, "packed_w"_a, "w_scale"_a, "w_bits"_a, "x_step"_a, "qmin"_a, "qmax"_a, "bias"_a);
}
}  // namespace lowbit::cuda
#endif
