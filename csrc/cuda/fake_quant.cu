// Fused LSQ fake quantization (SPEC section 1) on CUDA tensors: lowbit._C.cuda.fake_quant_forward / _backward.
//
// x is viewed as (outer, C, inner); step[c] and offset[c] belong to channel c = (i / inner) % C of flat index i.
//
// Forward: one grid-stride pass that reads x and writes only y, 16-byte vectors where the pointers allow it.
//
// Backward: one pass over x and grad that writes dx and leaves one float64 partial sum of dstep and doffset per
// (block, channel it owns); a second tiny kernel adds each channel's partials in a fixed order. No atomics, no
// element-sized temporaries, no host synchronisation. Which thread adds which terms depends only on the shape and on
// whether the pointers are 16-byte aligned (never on the GPU model or on scheduling), so repeated runs give the same
// bits. Two block layouts cover the shapes:
//
//   positions  C == 1, or inner long enough to fill memory sectors: a block owns one channel and a chunk of that
//              channel's outer * inner positions, so a thread's loads are contiguous runs inside one channel.
//   columns    inner == 1 (channels last) or short inner: view x as rows of C * inner columns; a thread owns
//              fixed columns (so fixed channels) and walks down rows, a warp's loads span neighbouring columns.
//
// Precision: each thread adds at most 64 terms in float (fmaf, one rounding per term); a warp combines in float over
// 5 shuffle levels, everything after that is double, partials included. The element math (cuda/fake_quant_math.cuh)
// runs on the host in tests/test_cuda_host_math.py; the summation has not run anywhere yet (no GPU so far), so its
// error is not measured: make gpu-check's tests hold it to tests/test_fake_quant.py's bound.
//
// Element math matches the reference (and torch) rounding for rounding: true IEEE division, rint (half to even),
// a clamp that keeps NaN, and y = q * s + beta as a rounded multiply then a rounded add (no FMA contraction).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "bind.h"
#include "checks.h"
#include "cuda/launch.cuh"
#include "cuda/fake_quant_math.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;        // threads of every 1-D block
constexpr int kPositionUnroll = 4;   // vectors each thread of a positions block loads before computing
constexpr int kColumnThreadsX = 32;  // one warp across columns ...
constexpr int kColumnThreadsY = 8;   // ... times 8 rows in flight: 256 threads
constexpr int kColumnRowUnroll = 4;  // rows each thread loads before computing
constexpr int kColumnRowStep = kColumnThreadsY * kColumnRowUnroll;
constexpr int64_t kColumnMinRows = 64;   // rows per block: at least 2 passes of the unrolled loop ...
constexpr int64_t kColumnMaxRows = 512;  // ... and at most 64 float terms per thread and column
// Blocks the columns layout aims for when picking rows per block. A constant rather than the SM count so that the
// partials, and hence the rounding of dstep/doffset, are the same on every GPU.
constexpr int64_t kColumnTargetBlocks = 1024;
// Shorter channel runs than this many bytes leave memory sectors half used by a positions block; such shapes go to
// the columns layout instead.
constexpr int64_t kMinRunBytes = 32;
// Channels with at most this many partials are summed by one thread each, otherwise by a block each.
constexpr int64_t kSerialPartials = 32;
// Forward grid: enough resident blocks to fill every SM (8 x 256 threads = 2048), then grid-stride.
constexpr int kForwardBlocksPerSm = 8;

static_assert(kColumnThreadsX * kColumnThreadsY == kThreads, "the columns block has kThreads threads");
static_assert(kColumnMinRows % kColumnRowStep == 0 && kColumnMaxRows % kColumnRowStep == 0,
              "rows per block are a multiple of the rows one loop pass covers");

// Element math (lsq_level, fake_quant_value, Acc, accumulate, fake_quant_grad): cuda/fake_quant_math.cuh.

// ---------------------------------------------------------------------------------------------------------------
// Index helpers, all __host__ __device__ and free of memory access so that a host-side test can check that the
// kernels visit every element exactly once, with its right channel, and write every partial exactly once.

template <typename T>
LOWBIT_HD T min_of(T a, T b) {
  return a < b ? a : b;
}

template <typename T>
LOWBIT_HD T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Position of flat index i inside its row of `inner` elements, and its channel.
struct ChannelCursor {
  int64_t r;
  int64_t c;
};

LOWBIT_HD ChannelCursor cursor_at(int64_t i, int64_t inner, int64_t channels) {
  const int64_t row = i / inner;
  return {i - row * inner, row % channels};
}

// Moves the cursor forward by `stride` flat elements given stride's own decomposition `by` (from cursor_at), with
// no division: by.r < inner and by.c < channels, so each wrap needs at most one subtraction.
LOWBIT_HD void cursor_advance(ChannelCursor& cur, const ChannelCursor& by, int64_t inner, int64_t channels) {
  cur.r += by.r;
  int64_t carry = 0;
  if (cur.r >= inner) {
    cur.r -= inner;
    carry = 1;
  }
  cur.c += by.c + carry;
  if (cur.c >= channels) cur.c -= channels;
}

LOWBIT_HD void cursor_next(ChannelCursor& cur, int64_t inner, int64_t channels) {
  if (++cur.r == inner) {
    cur.r = 0;
    if (++cur.c == channels) cur.c = 0;
  }
}

// Positions layout: block b owns channel b % C and chunk b / C of that channel's `positions` = outer * inner
// elements. Position p of channel c sits at flat ((p / inner) * C + c) * inner + p % inner, which is c * positions
// + p when the channel is one contiguous run (C == 1 or outer == 1).
struct PositionPlan {
  int64_t positions;  // elements per channel, outer * inner
  int64_t inner;
  int64_t channels;
  int64_t chunk_elems;  // positions per block: kThreads * vec * kPositionUnroll
  int64_t chunks;       // blocks per channel; the partials of channel c are [k * C + c for k < chunks]
};

struct Slot {
  int64_t flat;  // flat index of the slot's first element
  int count;     // elements in the slot: vec, fewer at the end of a run, 0 past it
};

// Slot u of thread tid: consecutive threads take consecutive vectors, so a warp's loads are contiguous.
template <bool kContiguous>
LOWBIT_HD Slot position_slot(const PositionPlan& plan, int64_t chunk, int64_t c, int tid, int u, int vec) {
  const int64_t pos = chunk * plan.chunk_elems + (static_cast<int64_t>(u) * kThreads + tid) * vec;
  if (pos >= plan.positions) return {0, 0};
  const int count = static_cast<int>(min_of<int64_t>(vec, plan.positions - pos));
  if (kContiguous) return {c * plan.positions + pos, count};
  const int64_t row = pos / plan.inner;  // vec divides inner here, so a vector never crosses a row
  return {(row * plan.channels + c) * plan.inner + (pos - row * plan.inner), count};
}

// Columns layout: x as rows of row_width = fold * C * inner columns (fold > 1 packs several short rows into one so
// that a warp has enough columns). Column j always holds channel (j / inner) % C. A block owns a tile of
// tile_width columns, chosen to hold whole channels, and a chunk of rows_per_chunk rows; it writes one partial per
// channel of the tile: partial[row_chunk * C + c].
struct ColumnPlan {
  int64_t numel;
  int64_t channels;
  int64_t inner;
  int64_t width;           // C * inner, one row of the (outer, C * inner) view
  int64_t fold;            // rows packed into one
  int64_t row_width;       // fold * width
  int64_t rows;            // ceil(numel / row_width); the last row may be partial
  int64_t rows_per_chunk;  // multiple of kColumnRowStep
  int64_t row_chunks;
  int64_t tile_width;  // columns per block, a multiple of inner and of the vector width
  int64_t tiles;
  int64_t chans_per_tile;  // channels whose columns a tile holds
};

// First column of thread tx's vector in the given tile, or -1 when the thread has no columns.
LOWBIT_HD int64_t column_of_thread(const ColumnPlan& plan, int64_t tile, int tx, int vec) {
  const int64_t local = static_cast<int64_t>(tx) * vec;
  const int64_t col = tile * plan.tile_width + local;
  return (local < plan.tile_width && col < plan.row_width) ? col : -1;
}

LOWBIT_HD int64_t channel_of_column(const ColumnPlan& plan, int64_t col) { return (col / plan.inner) % plan.channels; }

// Flat index of (row, col), or -1 past the end (the last row may be partial). numel, row_width and col are all
// multiples of the vector width, so a vector is either wholly inside or wholly outside.
LOWBIT_HD int64_t column_flat(const ColumnPlan& plan, int64_t row, int64_t col) {
  const int64_t flat = row * plan.row_width + col;
  return flat < plan.numel ? flat : -1;
}

// Local column (inside the tile) of term m * inner + r of channel slot `slot`: the tile holds, for each packed row
// m < fold, the `inner` columns of each of its chans_per_tile channels side by side.
LOWBIT_HD int64_t tile_column_of_channel(const ColumnPlan& plan, int64_t slot, int64_t m, int64_t r) {
  return m * plan.width + slot * plan.inner + r;
}

// ---------------------------------------------------------------------------------------------------------------
// Vector memory access.

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t, int VEC, bool kPerTensor>
__global__ void __launch_bounds__(kThreads)
    fake_quant_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const float* __restrict__ step,
                              const float* __restrict__ offset, int64_t numel, int64_t inner, int64_t channels,
                              float qmin, float qmax) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t vectors = numel / VEC;
  // Per tensor: one step for everything, read once. Per channel: a cursor follows the channel of the thread's
  // vector through the grid-stride loop without a division per element.
  const float s0 = step[0];
  const float b0 = offset != nullptr ? offset[0] : 0.0f;
  ChannelCursor cur{0, 0};
  ChannelCursor by{0, 0};
  if constexpr (!kPerTensor) {
    cur = cursor_at(t * VEC, inner, channels);
    by = cursor_at(threads * VEC, inner, channels);
  }
  for (int64_t i = t; i < vectors; i += threads) {
    const Pack<scalar_t, VEC> in = load_pack<VEC>(x + i * VEC);
    Pack<scalar_t, VEC> out;
    ChannelCursor e = cur;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float s = s0;
      float b = b0;
      if constexpr (!kPerTensor) {
        s = step[e.c];
        b = offset != nullptr ? offset[e.c] : 0.0f;
        cursor_next(e, inner, channels);
      }
      out.v[j] = static_cast<scalar_t>(fake_quant_value(static_cast<float>(in.v[j]), s, b, qmin, qmax));
    }
    store_pack<VEC>(y + i * VEC, out);
    if constexpr (!kPerTensor) cursor_advance(cur, by, inner, channels);
  }
  // The last numel % VEC elements, one per thread (VEC <= 8 < threads of block 0).
  const int64_t i = vectors * VEC + t;
  if (i < numel) {
    const int64_t c = kPerTensor ? 0 : cursor_at(i, inner, channels).c;
    const float b = offset != nullptr ? offset[c] : 0.0f;
    y[i] = static_cast<scalar_t>(fake_quant_value(static_cast<float>(x[i]), step[c], b, qmin, qmax));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward, positions layout (1-D blocks of kThreads).

// Sums a and b over the block and thread 0 stores them. Fixed order: shuffle tree in each warp, then the warps'
// sums in index order in double.
__device__ __forceinline__ void block_sum_store(Acc a, Acc b, double* out_a, double* out_b) {
  constexpr int kWarps = kThreads / 32;
  __shared__ Acc warp_a[kWarps];
  __shared__ Acc warp_b[kWarps];
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_a[warp] = a;
    warp_b[warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum_a = 0.0;
    double sum_b = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sum_a += warp_a[w];
      sum_b += warp_b[w];
    }
    *out_a = sum_a;
    *out_b = sum_b;
  }
}

template <typename scalar_t, int VEC, bool kContiguous>
__global__ void __launch_bounds__(kThreads)
    fake_quant_backward_positions_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                         scalar_t* __restrict__ dx, const float* __restrict__ step,
                                         const float* __restrict__ offset, double* __restrict__ partial_step,
                                         double* __restrict__ partial_offset, PositionPlan plan, float qmin,
                                         float qmax) {
  const int64_t block = blockIdx.x;
  const int64_t chunk = block / plan.channels;
  const int64_t c = block - chunk * plan.channels;
  const float s = step[c];
  const float beta = offset != nullptr ? offset[c] : 0.0f;

  // All loads first, then all math, so that each thread has 2 * kPositionUnroll loads in flight.
  Slot slot[kPositionUnroll];
  Pack<scalar_t, VEC> xv[kPositionUnroll];
  Pack<scalar_t, VEC> gv[kPositionUnroll];
#pragma unroll
  for (int u = 0; u < kPositionUnroll; ++u) {
    slot[u] = position_slot<kContiguous>(plan, chunk, c, threadIdx.x, u, VEC);
    if (slot[u].count == VEC) {
      xv[u] = load_pack<VEC>(x + slot[u].flat);
      gv[u] = load_pack<VEC>(grad + slot[u].flat);
    }
  }
  Acc acc_step = 0;
  Acc acc_offset = 0;
#pragma unroll
  for (int u = 0; u < kPositionUnroll; ++u) {
    if (slot[u].count == VEC) {
      Pack<scalar_t, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = fake_quant_grad(static_cast<float>(xv[u].v[j]), static_cast<float>(gv[u].v[j]), s, beta, qmin,
                                        qmax, acc_step, acc_offset);
        out.v[j] = static_cast<scalar_t>(d);
      }
      store_pack<VEC>(dx + slot[u].flat, out);
    } else {
      // Only the end of a per-tensor run whose length is not a multiple of VEC gets here with count > 0.
      for (int j = 0; j < slot[u].count; ++j) {
        const int64_t i = slot[u].flat + j;
        const float d = fake_quant_grad(static_cast<float>(x[i]), static_cast<float>(grad[i]), s, beta, qmin, qmax,
                                        acc_step, acc_offset);
        dx[i] = static_cast<scalar_t>(d);
      }
    }
  }
  block_sum_store(acc_step, acc_offset, partial_step + block, partial_offset + block);
}

// ---------------------------------------------------------------------------------------------------------------
// Backward, columns layout (blocks of kColumnThreadsX x kColumnThreadsY).

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    fake_quant_backward_columns_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                       scalar_t* __restrict__ dx, const float* __restrict__ step,
                                       const float* __restrict__ offset, double* __restrict__ partial_step,
                                       double* __restrict__ partial_offset, ColumnPlan plan, float qmin, float qmax) {
  constexpr int kTile = kColumnThreadsX * VEC;  // most columns a block can hold
  static_assert(kTile <= kThreads, "one thread per column in the block reduction");
  const int64_t block = blockIdx.x;
  const int64_t row_chunk = block / plan.tiles;
  const int64_t tile = block - row_chunk * plan.tiles;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t col0 = column_of_thread(plan, tile, tx, VEC);

  // The thread's columns keep their channels for the whole block: read their steps once.
  float s[VEC];
  float beta[VEC];
  Acc acc_step[VEC];
  Acc acc_offset[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int64_t c = col0 >= 0 ? channel_of_column(plan, col0 + j) : 0;
    s[j] = step[c];
    beta[j] = offset != nullptr ? offset[c] : 0.0f;
    acc_step[j] = 0;
    acc_offset[j] = 0;
  }

  const int64_t row_begin = row_chunk * plan.rows_per_chunk;
  const int64_t row_end = col0 >= 0 ? min_of(plan.rows, row_begin + plan.rows_per_chunk) : row_begin;
  for (int64_t base = row_begin + ty; base < row_end; base += kColumnRowStep) {
    int64_t flat[kColumnRowUnroll];
    Pack<scalar_t, VEC> xv[kColumnRowUnroll];
    Pack<scalar_t, VEC> gv[kColumnRowUnroll];
#pragma unroll
    for (int u = 0; u < kColumnRowUnroll; ++u) {
      const int64_t row = base + static_cast<int64_t>(u) * kColumnThreadsY;
      flat[u] = row < row_end ? column_flat(plan, row, col0) : -1;
      if (flat[u] >= 0) {
        xv[u] = load_pack<VEC>(x + flat[u]);
        gv[u] = load_pack<VEC>(grad + flat[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kColumnRowUnroll; ++u) {
      if (flat[u] < 0) continue;
      Pack<scalar_t, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = fake_quant_grad(static_cast<float>(xv[u].v[j]), static_cast<float>(gv[u].v[j]), s[j], beta[j],
                                        qmin, qmax, acc_step[j], acc_offset[j]);
        out.v[j] = static_cast<scalar_t>(d);
      }
      store_pack<VEC>(dx + flat[u], out);
    }
  }

  // Block reduction in a fixed order: each column over the 8 thread rows (float terms, double sum), then each
  // channel over its columns in the tile. Threads without columns contribute zeros that nobody reads.
  __shared__ Acc red_step[kColumnThreadsY][kTile];
  __shared__ Acc red_offset[kColumnThreadsY][kTile];
  __shared__ double col_step[kTile];
  __shared__ double col_offset[kTile];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    red_step[ty][tx * VEC + j] = acc_step[j];
    red_offset[ty][tx * VEC + j] = acc_offset[j];
  }
  __syncthreads();
  const int tid = ty * kColumnThreadsX + tx;
  if (tid < kTile) {
    double a = 0.0;
    double b = 0.0;
#pragma unroll
    for (int y = 0; y < kColumnThreadsY; ++y) {
      a += red_step[y][tid];
      b += red_offset[y][tid];
    }
    col_step[tid] = a;
    col_offset[tid] = b;
  }
  __syncthreads();
  if (tid < plan.chans_per_tile) {
    const int64_t c = tile * plan.chans_per_tile + tid;
    if (c < plan.channels) {
      double a = 0.0;
      double b = 0.0;
      for (int64_t m = 0; m < plan.fold; ++m) {
        for (int64_t r = 0; r < plan.inner; ++r) {
          const int64_t j = tile_column_of_channel(plan, tid, m, r);
          a += col_step[j];
          b += col_offset[j];
        }
      }
      partial_step[row_chunk * plan.channels + c] = a;
      partial_offset[row_chunk * plan.channels + c] = b;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward, final reduction: channel c owns partial[k * C + c] for k < runs. Both variants add in a fixed order.

__global__ void __launch_bounds__(kThreads)
    reduce_partials_per_thread_kernel(const double* __restrict__ partial_step,
                                      const double* __restrict__ partial_offset, float* __restrict__ dstep,
                                      float* __restrict__ doffset, int64_t runs, int64_t channels, double grad_scale) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double a = 0.0;
  double b = 0.0;
  for (int64_t k = 0; k < runs; ++k) {
    a += partial_step[k * channels + c];
    b += partial_offset[k * channels + c];
  }
  dstep[c] = static_cast<float>(a * grad_scale);
  doffset[c] = static_cast<float>(b * grad_scale);
}

__global__ void __launch_bounds__(kThreads)
    reduce_partials_per_block_kernel(const double* __restrict__ partial_step, const double* __restrict__ partial_offset,
                                     float* __restrict__ dstep, float* __restrict__ doffset, int64_t runs,
                                     int64_t channels, double grad_scale) {
  __shared__ double sum_step[kThreads];
  __shared__ double sum_offset[kThreads];
  const int64_t c = blockIdx.x;
  double a = 0.0;
  double b = 0.0;
  for (int64_t k = threadIdx.x; k < runs; k += kThreads) {
    a += partial_step[k * channels + c];
    b += partial_offset[k * channels + c];
  }
  sum_step[threadIdx.x] = a;
  sum_offset[threadIdx.x] = b;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      sum_step[threadIdx.x] += sum_step[threadIdx.x + width];
      sum_offset[threadIdx.x] += sum_offset[threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    dstep[c] = static_cast<float>(sum_step[0] * grad_scale);
    doffset[c] = static_cast<float>(sum_offset[0] * grad_scale);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host-side planning (pure functions of the shape, no CUDA calls).

enum class BackwardLayout { kPositions, kColumns };

BackwardLayout choose_backward_layout(int64_t numel, int64_t channels, int64_t inner, int64_t elem_bytes) {
  if (channels == 1) return BackwardLayout::kPositions;
  if (inner == 1) return BackwardLayout::kColumns;
  const int64_t outer = numel / (channels * inner);
  if (outer == 1) return BackwardLayout::kPositions;  // each channel is one contiguous run
  return inner * elem_bytes < kMinRunBytes ? BackwardLayout::kColumns : BackwardLayout::kPositions;
}

// contiguous: every channel is one run of `positions` elements (C == 1 or outer == 1).
PositionPlan make_position_plan(int64_t numel, int64_t channels, int64_t inner, int vec) {
  PositionPlan plan{};
  plan.positions = numel / channels;
  plan.inner = inner;
  plan.channels = channels;
  plan.chunk_elems = static_cast<int64_t>(kThreads) * vec * kPositionUnroll;
  plan.chunks = ceil_div(plan.positions, plan.chunk_elems);
  return plan;
}

bool position_is_contiguous(int64_t numel, int64_t channels, int64_t inner) {
  return channels == 1 || numel == channels * inner;
}

// Whether the positions kernel may use vectors of `vec` elements (pointers already known to be 16-byte aligned):
// every vector must start at a multiple of vec and stay in one channel run (one row of inner when strided).
bool position_vec_ok(int64_t numel, int64_t channels, int64_t inner, int vec) {
  if (channels == 1) return true;  // one run from flat 0; its short end is done element by element
  const int64_t run = position_is_contiguous(numel, channels, inner) ? numel / channels : inner;
  return run % vec == 0;
}

// Columns layout for vectors of `vec` elements; returns false when that vector width cannot be used.
bool make_column_plan(int64_t numel, int64_t channels, int64_t inner, int vec, ColumnPlan* out) {
  const int64_t tile_max = static_cast<int64_t>(kColumnThreadsX) * vec;
  ColumnPlan plan{};
  plan.numel = numel;
  plan.channels = channels;
  plan.inner = inner;
  plan.width = channels * inner;
  if (plan.width % vec != 0 || inner > tile_max) return false;
  if (2 * plan.width <= tile_max) {
    // Short rows: pack several into one tile-wide row; the single tile then holds every channel.
    plan.fold = tile_max / plan.width;
    plan.tile_width = plan.fold * plan.width;
    plan.chans_per_tile = channels;
  } else {
    // Whole channels per tile, and a tile width that keeps every thread's vector aligned.
    plan.fold = 1;
    plan.chans_per_tile = tile_max / inner;
    while (plan.chans_per_tile > 1 && (plan.chans_per_tile * inner) % vec != 0) --plan.chans_per_tile;
    plan.tile_width = plan.chans_per_tile * inner;
    if (plan.tile_width % vec != 0) return false;
  }
  plan.tiles = ceil_div(plan.width, plan.tile_width);
  plan.row_width = plan.fold * plan.width;
  plan.rows = ceil_div(numel, plan.row_width);
  // Rows per block: enough blocks to fill the GPU, few enough partials, at most 64 float terms per thread.
  const int64_t wanted = ceil_div(plan.rows * plan.tiles, kColumnTargetBlocks);
  const int64_t clamped = wanted < kColumnMinRows ? kColumnMinRows : min_of(wanted, kColumnMaxRows);
  plan.rows_per_chunk = ceil_div<int64_t>(clamped, kColumnRowStep) * kColumnRowStep;
  plan.row_chunks = ceil_div(plan.rows, plan.rows_per_chunk);
  *out = plan;
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers (is_aligned16, multiprocessor_count, grid_size: cuda/launch.cuh).

struct Problem {
  const void* grad;  // nullptr in the forward
  const void* x;
  void* out;  // y or dx
  const float* step;
  const float* offset;  // nullptr without offset
  int64_t numel;
  int64_t channels;
  int64_t inner;
  float qmin;
  float qmax;
  int device;
  cudaStream_t stream;
};

template <typename scalar_t, int VEC, bool kPerTensor>
void launch_forward(const Problem& p) {
  const int64_t vectors = p.numel / VEC;
  const unsigned int blocks = elementwise_grid(vectors, kThreads, kForwardBlocksPerSm, p.device, "fake_quant_forward");
  fake_quant_forward_kernel<scalar_t, VEC, kPerTensor>
      <<<blocks, kThreads, 0, p.stream>>>(static_cast<const scalar_t*>(p.x), static_cast<scalar_t*>(p.out), p.step,
                                          p.offset, p.numel, p.inner, p.channels, p.qmin, p.qmax);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void forward(const Problem& p) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec = is_aligned16(p.x) && is_aligned16(p.out);
  const bool per_tensor = p.channels == 1;
  if (vec && per_tensor) {
    launch_forward<scalar_t, kVec, true>(p);
  } else if (vec) {
    launch_forward<scalar_t, kVec, false>(p);
  } else if (per_tensor) {
    launch_forward<scalar_t, 1, true>(p);
  } else {
    launch_forward<scalar_t, 1, false>(p);
  }
}

template <typename scalar_t, int VEC, bool kContiguous>
void launch_positions(const Problem& p, const PositionPlan& plan, double* partial_step, double* partial_offset) {
  const unsigned int blocks = grid_size(plan.chunks * plan.channels, "fake_quant_backward");
  fake_quant_backward_positions_kernel<scalar_t, VEC, kContiguous><<<blocks, kThreads, 0, p.stream>>>(
      static_cast<const scalar_t*>(p.grad), static_cast<const scalar_t*>(p.x), static_cast<scalar_t*>(p.out), p.step,
      p.offset, partial_step, partial_offset, plan, p.qmin, p.qmax);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_columns(const Problem& p, const ColumnPlan& plan, double* partial_step, double* partial_offset) {
  const unsigned int blocks = grid_size(plan.row_chunks * plan.tiles, "fake_quant_backward");
  const dim3 threads(kColumnThreadsX, kColumnThreadsY);
  fake_quant_backward_columns_kernel<scalar_t, VEC><<<blocks, threads, 0, p.stream>>>(
      static_cast<const scalar_t*>(p.grad), static_cast<const scalar_t*>(p.x), static_cast<scalar_t*>(p.out), p.step,
      p.offset, partial_step, partial_offset, plan, p.qmin, p.qmax);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_reduce_partials(const Problem& p, const double* partial_step, const double* partial_offset, int64_t runs,
                            float* dstep, float* doffset, double grad_scale) {
  if (runs <= kSerialPartials) {
    const unsigned int blocks = grid_size(ceil_div<int64_t>(p.channels, kThreads), "fake_quant_backward reduction");
    reduce_partials_per_thread_kernel<<<blocks, kThreads, 0, p.stream>>>(partial_step, partial_offset, dstep, doffset,
                                                                         runs, p.channels, grad_scale);
  } else {
    const unsigned int blocks = grid_size(p.channels, "fake_quant_backward reduction");
    reduce_partials_per_block_kernel<<<blocks, kThreads, 0, p.stream>>>(partial_step, partial_offset, dstep, doffset,
                                                                        runs, p.channels, grad_scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Partial buffer: [0, runs * C) for dstep, then as many for doffset; every entry is written by the main kernel.
at::Tensor empty_partials(const at::Tensor& like, int64_t runs, int64_t channels) {
  return at::empty({2 * runs * channels}, like.options().dtype(at::kDouble));
}

template <typename scalar_t>
void backward(const Problem& p, const at::Tensor& x, float* dstep, float* doffset, double grad_scale) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = is_aligned16(p.grad) && is_aligned16(p.x) && is_aligned16(p.out);
  const auto layout = choose_backward_layout(p.numel, p.channels, p.inner, sizeof(scalar_t));
  int64_t runs = 0;
  at::Tensor partials;
  if (layout == BackwardLayout::kPositions) {
    const int vec = aligned && position_vec_ok(p.numel, p.channels, p.inner, kVec) ? kVec : 1;
    const PositionPlan plan = make_position_plan(p.numel, p.channels, p.inner, vec);
    runs = plan.chunks;
    partials = empty_partials(x, runs, p.channels);
    double* ps = partials.data_ptr<double>();
    double* po = ps + runs * p.channels;
    const bool contiguous = position_is_contiguous(p.numel, p.channels, p.inner);
    if (vec == kVec && contiguous) {
      launch_positions<scalar_t, kVec, true>(p, plan, ps, po);
    } else if (vec == kVec) {
      launch_positions<scalar_t, kVec, false>(p, plan, ps, po);
    } else if (contiguous) {
      launch_positions<scalar_t, 1, true>(p, plan, ps, po);
    } else {
      launch_positions<scalar_t, 1, false>(p, plan, ps, po);
    }
  } else {
    ColumnPlan plan{};
    const bool vec = aligned && make_column_plan(p.numel, p.channels, p.inner, kVec, &plan);
    if (!vec) {
      TORCH_CHECK(make_column_plan(p.numel, p.channels, p.inner, 1, &plan),
                  "lowbit._C.cuda: internal error, no columns plan for inner=", p.inner);
    }
    runs = plan.row_chunks;
    partials = empty_partials(x, runs, p.channels);
    double* ps = partials.data_ptr<double>();
    double* po = ps + runs * p.channels;
    if (vec) {
      launch_columns<scalar_t, kVec>(p, plan, ps, po);
    } else {
      launch_columns<scalar_t, 1>(p, plan, ps, po);
    }
  }
  const double* ps = partials.data_ptr<double>();
  launch_reduce_partials(p, ps, ps + runs * p.channels, runs, dstep, doffset, grad_scale);
  // `partials` is freed here while the kernels may still run: the caching allocator only hands the block out again
  // to work queued later on this same stream, so that is safe.
}

// ---------------------------------------------------------------------------------------------------------------
// Op entry points: check the invariants the Python layer guarantees, then dispatch on x's dtype.

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& step, const std::optional<at::Tensor>& offset,
                  int64_t qmin, int64_t qmax, int64_t inner) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(step.device() == x.device(), op, ": step must be on x's device ", x.device(), ", got ", step.device());
  TORCH_CHECK(step.scalar_type() == at::kFloat, op, ": step must be float32, got ", step.scalar_type());
  TORCH_CHECK(step.is_contiguous(), op, ": step must be contiguous");
  if (offset.has_value()) {
    TORCH_CHECK(offset->device() == x.device(), op, ": offset must be on x's device ", x.device(), ", got ",
                offset->device());
    TORCH_CHECK(offset->scalar_type() == at::kFloat, op, ": offset must be float32, got ", offset->scalar_type());
    TORCH_CHECK(offset->is_contiguous() && offset->numel() == step.numel(), op,
                ": offset must be contiguous with one element per step (", step.numel(), "), got ", offset->numel());
  }
  TORCH_CHECK(qmin <= qmax, op, ": qmin (", qmin, ") must not exceed qmax (", qmax, ")");
  TORCH_CHECK(inner >= 1, op, ": inner must be at least 1, got ", inner);
  if (x.numel() == 0) return;  // nothing to index; the shape of step does not matter (it may even be empty)
  const int64_t channels = step.numel();
  TORCH_CHECK(channels >= 1, op, ": step must have at least one element");
  TORCH_CHECK(x.numel() % (channels * inner) == 0, op, ": x has ", x.numel(),
              " elements, not a multiple of channels * inner = ", channels, " * ", inner);
}

Problem make_problem(const at::Tensor& x, const at::Tensor& step, const std::optional<at::Tensor>& offset, int64_t qmin,
                     int64_t qmax, int64_t inner) {
  Problem p{};
  p.x = x.data_ptr();
  p.step = step.data_ptr<float>();
  p.offset = offset.has_value() ? offset->data_ptr<float>() : nullptr;
  p.numel = x.numel();
  p.channels = step.numel();
  p.inner = inner;
  p.qmin = static_cast<float>(qmin);
  p.qmax = static_cast<float>(qmax);
  p.device = x.device().index();
  p.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  return p;
}

at::Tensor fake_quant_forward_cuda(const at::Tensor& x, const at::Tensor& step, const std::optional<at::Tensor>& offset,
                                   int64_t qmin, int64_t qmax, int64_t inner) {
  constexpr const char* kOp = "lowbit._C.cuda.fake_quant_forward";
  check_inputs(kOp, x, step, offset, qmin, qmax, inner);
  // The value rules, once per forward (a host copy of step/offset: one synchronisation); the backward gets the
  // values this forward accepted.
  check_values("step", step, /*positive=*/true);
  if (offset) check_values("offset", *offset, /*positive=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  Problem p = make_problem(x, step, offset, qmin, qmax, inner);
  p.out = y.data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "lowbit_fake_quant_forward_cuda", [&] { forward<scalar_t>(p); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                        const at::Tensor& step,
                                                                        const std::optional<at::Tensor>& offset,
                                                                        int64_t qmin, int64_t qmax, int64_t inner,
                                                                        double grad_scale) {
  constexpr const char* kOp = "lowbit._C.cuda.fake_quant_backward";
  check_inputs(kOp, x, step, offset, qmin, qmax, inner);
  TORCH_CHECK(grad.device() == x.device(), kOp, ": grad must be on x's device ", x.device(), ", got ", grad.device());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), kOp, ": grad must have x's dtype ", x.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.sizes() == x.sizes(), kOp, ": grad must have x's shape ", x.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.is_contiguous(), kOp, ": grad must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dstep = at::empty({step.numel()}, step.options());
  at::Tensor doffset = at::empty({step.numel()}, step.options());
  if (x.numel() == 0) {
    dstep.zero_();
    doffset.zero_();
    return {dx, dstep, doffset};
  }
  Problem p = make_problem(x, step, offset, qmin, qmax, inner);
  p.grad = grad.data_ptr();
  p.out = dx.data_ptr();
  float* ds = dstep.data_ptr<float>();
  float* doff = doffset.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "lowbit_fake_quant_backward_cuda",
                                  [&] { backward<scalar_t>(p, x, ds, doff, grad_scale); });
  return {dx, dstep, doffset};
}

}  // namespace

void bind_fake_quant(pybind11::module_& m) {
  using lowbit::ReleaseGil;
  using namespace pybind11::literals;  // "x"_a: argument names for help() and keyword calls
  m.def("fake_quant_forward", &fake_quant_forward_cuda, ReleaseGil(),
        "x"_a, "step"_a, "offset"_a, "qmin"_a, "qmax"_a, "inner"_a);
  m.def("fake_quant_backward", &fake_quant_backward_cuda, ReleaseGil(),
        "grad"_a, "x"_a, "step"_a, "offset"_a, "qmin"_a, "qmax"_a, "inner"_a, "grad_scale"_a);
}

}  // namespace cuda
}  // namespace lowbit
