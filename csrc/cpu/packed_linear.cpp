// CPU driver of the packed inference GEMM (SPEC section 4): lowbit._C.cpu.packed_linear (and packed_gemm).
//
//   1. Quantize: every row of x once (parallel over rows) into the ISA's prepared layout (packed_linear.h), with
//      its NaN flag and code sum.
//   2. Tiles: tasks of MB x rows by NB weight rows, parallel over tasks. A task walks K in chunks of kChunk
//      packed bytes; inside a chunk, for each group of 8 weight rows (kept in L1), every group of 4 x rows runs
//      the ISA tile, which unpacks the weights in registers and adds exact int32 sums into the task's tile.
//      GEMV (M <= 16): MB = M, so each weight row is read from memory once for all rows of x.
//   3. Epilogue: y = float32(acc) * float32(x_step * w_scale[n]) + bias[n] in x's dtype; NaN rows give NaN.
// All arithmetic before the epilogue is integer, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "bind.h"
#include "cpu/dispatch.h"
#include "cpu/packed_epilogue.h"
#include "cpu/packed_linear.h"
#include "cpu/packed_panel.h"
#include "cpu/patches.h"

namespace lowbit::cpu {
namespace {

constexpr int64_t kGemvRows = 16;  // M at or below this: one task row block (GEMV)
constexpr int64_t kBlockM = 64;    // x rows per task (GEMM)
constexpr int64_t kBlockN = 64;    // weight rows per task
constexpr int64_t kAmxCols = 128;  // weight rows per task with AMX (at most)
constexpr int64_t kAmxPanelBytes = 512 << 10;  // staged AMX panel per task (at most, unless 32 rows need more)
constexpr int64_t kChunk = 2048;   // packed weight bytes per K chunk (a multiple of every ISA's lanes)
constexpr int kTileM = 4, kTileN = 8;

struct Prepared {
  std::unique_ptr<uint8_t[]> store;  // M rows of `stride` bytes (+ 64 for alignment)
  uint8_t* codes = nullptr;          // 64-byte aligned
  int64_t stride = 0;
  std::vector<int32_t> rowsum;
  std::vector<uint8_t> nan;
};

const float* quantize_row(const PackedLinearKernels& k, const float* x, float* q, int64_t n, float step) {
  k.quantize_f32(x, q, n, step);
  return q;
}
const float* quantize_row(const PackedLinearKernels& k, const c10::Half* x, float* q, int64_t n, float step) {
  k.quantize_f16(x, q, n, step);
  return q;
}
const float* quantize_row(const PackedLinearKernels& k, const c10::BFloat16* x, float* q, int64_t n, float step) {
  k.quantize_bf16(x, q, n, step);
  return q;
}
// Codes never take this path (prepare's integer branch); the overload only keeps the template well-formed.
template <class C, std::enable_if_t<std::is_integral_v<C>, int> = 0>
const float* quantize_row(const PackedLinearKernels&, const C* x, float* q, int64_t n, float) {
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<float>(x[i]);
  return q;
}

template <class E>
void scatter_row(const float* q, int64_t k_len, int fields, int lanes, float lo, float hi, E* out, int32_t* rowsum,
                 uint8_t* nan) {
  int32_t sum = 0;
  bool has_nan = false;
  const int64_t step_codes = static_cast<int64_t>(fields) * lanes;
  for (int64_t base = 0; base < k_len; base += step_codes) {
    const int64_t count = std::min(step_codes, k_len - base);
    for (int64_t r = 0; r < count; ++r) {
      float v = q[base + r];
      if (v != v) {
        has_nan = true;
        v = 0.f;
      }
      v = std::min(std::max(v, lo), hi);
      const int32_t code = static_cast<int32_t>(v);
      sum += code;
      // code r of this step is packed byte j = r / fields, field f = r % fields
      out[base + (r % fields) * lanes + r / fields] = static_cast<E>(code);
    }
  }
  *rowsum = sum;
  *nan = has_nan;
}

// Codes (uint8/int8) straight into the prepared layout: integer clamp, no float round trip. F fields per byte.
template <int F, class C, class E>
void scatter_codes(const C* x, int64_t k_len, int lanes, int32_t lo, int32_t hi, E* out, int64_t out_len,
                   int32_t* rowsum) {
  int32_t sum = 0;
  const int64_t step_codes = static_cast<int64_t>(F) * lanes;
  int64_t base = 0;
  for (; base + step_codes <= k_len; base += step_codes) {
    const C* src = x + base;
    E* dst = out + base;
    for (int j = 0; j < lanes; ++j) {
      for (int f = 0; f < F; ++f) {
        int32_t v = src[j * F + f];
        v = v < lo ? lo : (v > hi ? hi : v);
        sum += v;
        dst[f * lanes + j] = static_cast<E>(v);
      }
    }
  }
  const int64_t done = base;
  for (int64_t i = done; i < out_len; ++i) out[i] = E(0);  // the last, partial step and the padding
  for (int64_t r = 0; base + r < k_len; ++r) {
    int32_t v = x[base + r];
    v = v < lo ? lo : (v > hi ? hi : v);
    sum += v;
    out[base + (r % F) * lanes + r / F] = static_cast<E>(v);
  }
  *rowsum = sum;
}

template <class C, class E>
void scatter_codes(int fields, const C* x, int64_t k_len, int lanes, int32_t lo, int32_t hi, E* out, int64_t out_len,
                   int32_t* rowsum) {
  if (fields == 4) return scatter_codes<4>(x, k_len, lanes, lo, hi, out, out_len, rowsum);
  if (fields == 2) return scatter_codes<2>(x, k_len, lanes, lo, hi, out, out_len, rowsum);
  return scatter_codes<1>(x, k_len, lanes, lo, hi, out, out_len, rowsum);
}

template <class T>
Prepared prepare(const T* x, int64_t m, int64_t k_len, int64_t steps, int fields, const PackedLinearKernels& k,
                 float step, float lo, float hi) {
  Prepared p;
  const int64_t row_bytes = steps * k.lanes * fields * k.elem_bytes;
  // GEMM: one extra cache line per row, so that the 16 rows of a tile load do not share a few L1 sets
  p.stride = row_bytes + (m > kGemvRows ? 64 : 0);
  // not zero-filled: every row is written whole (codes and zero padding up to row_bytes) below
  p.store.reset(new uint8_t[static_cast<size_t>(m * p.stride + 64)]);
  p.codes = p.store.get() + (-reinterpret_cast<uintptr_t>(p.store.get()) & 63);
  p.rowsum.assign(m, 0);
  p.nan.assign(m, 0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k_len));
  if constexpr (std::is_integral_v<T>) {  // codes from a fused previous layer
    const int32_t ilo = static_cast<int32_t>(lo), ihi = static_cast<int32_t>(hi);
    at::parallel_for(0, m, grain, [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        uint8_t* out = p.codes + row * p.stride;
        const int64_t len = row_bytes / k.elem_bytes;
        if (k.elem_bytes == 2) {
          scatter_codes(fields, x + row * k_len, k_len, k.lanes, ilo, ihi, reinterpret_cast<int16_t*>(out), len,
                        &p.rowsum[row]);
        } else {
          scatter_codes(fields, x + row * k_len, k_len, k.lanes, ilo, ihi, out, len, &p.rowsum[row]);
        }
      }
    });
    return p;
  }
  at::parallel_for(0, m, grain, [&](int64_t b, int64_t e) {
    std::vector<float> q(k_len);
    for (int64_t row = b; row < e; ++row) {
      quantize_row(k, x + row * k_len, q.data(), k_len, step);
      uint8_t* out = p.codes + row * p.stride;
      if (k.prepare_row && k.elem_bytes == 1) {
        p.nan[row] = k.prepare_row(q.data(), k_len, fields, lo, hi, out, row_bytes, &p.rowsum[row]);
      } else if (k.elem_bytes == 2) {
        std::memset(out, 0, static_cast<size_t>(row_bytes));
        scatter_row(q.data(), k_len, fields, k.lanes, lo, hi, reinterpret_cast<int16_t*>(out), &p.rowsum[row],
                    &p.nan[row]);
      } else {
        std::memset(out, 0, static_cast<size_t>(row_bytes));
        scatter_row(q.data(), k_len, fields, k.lanes, lo, hi, out, &p.rowsum[row], &p.nan[row]);
      }
    }
  });
  return p;
}

// T: x's element type (float types are quantized here, uint8/int8 are codes); O: y's element type (T for the
// plain op; float32 or uint8/int8 codes on the integer data path, under `spec`).
template <class T, class O>
void run(const at::Tensor& x, const at::Tensor& packed_w, const float* scale, const float* bias, int64_t w_bits,
         int64_t qmin, int64_t qmax, float x_step, const EpilogueSpec& spec, at::Tensor& y) {
  const int64_t m = x.size(0), k_len = x.size(1), n = packed_w.size(0), w_bytes = packed_w.size(1);
  const int container = w_bits == 2 ? 2 : w_bits <= 4 ? 4 : 8;
  const int fields = 8 / container;
  const Isa isa = active_isa();
  const PackedLinearKernels k = packed_linear_kernels(isa, container);
  // offset_weights marks the VNNI tiles (the avx512 level runs AVX2 tiles on CPUs without VNNI)
  count_packed_path(k.amx_block != nullptr && m > kGemvRows ? PackedPath::kAmx
                    : k.offset_weights                      ? PackedPath::kVnni
                    : isa == Isa::kScalar                   ? PackedPath::kScalar
                                                            : PackedPath::kAvx2);
  const int64_t steps = (w_bytes + k.lanes - 1) / k.lanes;
  const bool x_u8 = qmax > 127;
  const Prepared p = prepare(data<T>(x), m, k_len, steps, fields, k, x_step, static_cast<float>(qmin),
                             static_cast<float>(qmax));
  const int32_t weight_offset = k.offset_all || (k.offset_weights && !x_u8) ? (1 << (container - 1)) : 0;

  const int64_t span = steps * k.lanes;  // packed bytes walked per row (whole steps)
  const uint8_t* w = packed_w.const_data_ptr<uint8_t>();
  O* out = mutable_data<O>(y);
  // the plain float epilogue writes y directly; clamps and codes go through finish_values on a float row
  constexpr bool kFloatOut = std::is_floating_point_v<O> || !std::is_integral_v<O>;
  const bool plain = kFloatOut && !spec.clamps() && spec.out_step == 0.f;
  std::atomic<bool> nan_coded{false};

  // VNNI/AVX2/scalar tiles over rows [i_begin, i_end) x weight rows [j_begin, j_end), packed bytes [c0, c1), into
  // acc (row i_begin - row0, column j_begin - col0 at acc + (i - row0) * acc_stride + j - col0). The first x block
  // of each weight group gets the rows the driver reads next as a prefetch hint: the next group of the chunk,
  // else `after` (the first group of the next chunk or task, its byte offset relative to this chunk).
  struct Next {
    int64_t row;    // first weight row, or -1 for none
    int64_t delta;  // byte offset relative to the current chunk
  };
  auto tiles = [&](int32_t* acc, int64_t acc_stride, int64_t row0, int64_t col0, int64_t i_begin, int64_t i_end,
                   int64_t j_begin, int64_t j_end, int64_t c0, int64_t c1, Next after) {
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kTileN) {
      const int nr = static_cast<int>(std::min<int64_t>(kTileN, j_end - j0));
      const uint8_t* wrows[kTileN];
      for (int j = 0; j < kTileN; ++j) wrows[j] = w + (j0 + (j < nr ? j : 0)) * w_bytes;
      const Next next = j0 + kTileN < j_end ? Next{j0 + kTileN, 0} : after;
      const uint8_t* pfrows[kTileN];
      if (next.row >= 0) {
        for (int j = 0; j < kTileN; ++j) pfrows[j] = w + std::min(next.row + j, n - 1) * w_bytes + next.delta;
      }
      for (int64_t i0 = i_begin; i0 < i_end; i0 += kTileM) {
        const int mr = static_cast<int>(std::min<int64_t>(kTileM, i_end - i0));
        const void* xrows[kTileM];
        for (int i = 0; i < kTileM; ++i) xrows[i] = p.codes + (i0 + (i < mr ? i : 0)) * p.stride;
        const PackedTile t{xrows, mr, wrows, nr, c0, c1, w_bytes, container, x_u8,
                           acc + (i0 - row0) * acc_stride + (j0 - col0), acc_stride,
                           i0 == i_begin && next.row >= 0 ? pfrows : nullptr};
        k.tile(t);
      }
    }
  };
  // y rows [i_begin, i_end), columns [n0, n1) from acc (row i_begin, column n0 at acc); `row_f32` is scratch of
  // n1 - n0 floats for 16-bit outputs.
  auto epilogue = [&](const int32_t* acc, int64_t acc_stride, int64_t i_begin, int64_t i_end, int64_t n0,
                      int64_t n1, float* row_f32) {
    for (int64_t i = i_begin; i < i_end; ++i) {
      O* yrow = out + i * n;
      if (p.nan[i]) {
        if constexpr (kFloatOut) {
          for (int64_t j = n0; j < n1; ++j) yrow[j] = static_cast<O>(std::numeric_limits<float>::quiet_NaN());
        } else {
          for (int64_t j = n0; j < n1; ++j) yrow[j] = O(0);
          nan_coded = true;
        }
        continue;
      }
      const uint32_t correction = static_cast<uint32_t>(weight_offset) * static_cast<uint32_t>(p.rowsum[i]);
      const int32_t* arow = acc + (i - i_begin) * acc_stride;
      if (!plain) {
        if (k.epilogue) {
          k.epilogue(arow, n1 - n0, correction, scale + n0, bias ? bias + n0 : nullptr, row_f32);
        } else {
          for (int64_t j = n0; j < n1; ++j) {
            const int32_t a = static_cast<int32_t>(static_cast<uint32_t>(arow[j - n0]) - correction);
            float v = static_cast<float>(a) * scale[j];
            if (bias) v = v + bias[j];
            row_f32[j - n0] = v;
          }
        }
        if (finish_values(row_f32, n1 - n0, spec, yrow + n0)) nan_coded = true;
        continue;
      }
      if (k.epilogue) {
        if constexpr (std::is_same_v<O, float>) {
          k.epilogue(arow, n1 - n0, correction, scale + n0, bias ? bias + n0 : nullptr, yrow + n0);
        } else {
          k.epilogue(arow, n1 - n0, correction, scale + n0, bias ? bias + n0 : nullptr, row_f32);
          for (int64_t j = n0; j < n1; ++j) yrow[j] = static_cast<O>(row_f32[j - n0]);
        }
        continue;
      }
      for (int64_t j = n0; j < n1; ++j) {
        const int32_t a = static_cast<int32_t>(static_cast<uint32_t>(arow[j - n0]) - correction);
        float v = static_cast<float>(a) * scale[j];
        if (bias) v = v + bias[j];
        yrow[j] = static_cast<O>(v);
      }
    }
  };

  if (k.amx_block != nullptr && m > kGemvRows) {
    // AMX: a task is up to kAmxCols weight rows (the staged panel, at most kAmxPanelBytes) by a range of 32-row
    // x blocks (all of M unless there are fewer column tasks than threads). The panel is staged once per task
    // and reused by every x block; each block of 32 x rows runs its whole K in tile registers, then the
    // epilogue writes its 32 rows of y. Columns (n % 32) and rows (m % 32) outside whole 32 x 32 blocks run the
    // VNNI tiles.
    const int64_t panel_row = span * fields;  // panel bytes per weight row
    const int64_t block_n =
        std::clamp<int64_t>(kAmxPanelBytes / std::max<int64_t>(1, panel_row) / 32 * 32, 32, kAmxCols);
    const int64_t tasks_n = (n + block_n - 1) / block_n;
    const int64_t m_blocks = (m + 31) / 32;
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t tasks_m = std::min(m_blocks, (threads + tasks_n - 1) / tasks_n);
    at::parallel_for(0, tasks_m * tasks_n, 1, [&](int64_t first, int64_t last) {
      std::vector<int32_t> acc(static_cast<size_t>(32 * block_n));
      std::vector<float> row_f32(static_cast<size_t>(block_n));
      std::unique_ptr<uint8_t[]> panel_store(new uint8_t[static_cast<size_t>(block_n * panel_row + 64)]);
      uint8_t* panel = panel_store.get() + (-reinterpret_cast<uintptr_t>(panel_store.get()) & 63);
      for (int64_t task = first; task < last; ++task) {
        const int64_t tn = task % tasks_n, tm = task / tasks_n;
        const int64_t n0 = tn * block_n, n1 = std::min(n, n0 + block_n);
        const int64_t an = (n1 - n0) / 32 * 32;
        const int64_t r0 = m_blocks * tm / tasks_m * 32, r1 = std::min(m, m_blocks * (tm + 1) / tasks_m * 32);
        if (an > 0) k.amx_panel(AmxPanel{w + n0 * w_bytes, w_bytes, an, span, container, panel});
        for (int64_t i0 = r0; i0 < r1; i0 += 32) {
          const int64_t i1 = std::min(r1, i0 + 32);
          const bool whole = i1 - i0 == 32 && an > 0;
          if (whole) {
            k.amx_block(AmxBlock{p.codes + i0 * p.stride, p.stride, 32, panel, an, span, container, x_u8,
                                 weight_offset, p.rowsum.data() + i0, acc.data(), block_n});
          }
          const int64_t j_begin = whole ? n0 + an : n0;
          if (j_begin < n1) {
            for (int64_t i = 0; i < i1 - i0; ++i) {
              std::fill(acc.begin() + i * block_n + (j_begin - n0), acc.begin() + i * block_n + (n1 - n0), 0);
            }
            for (int64_t c0 = 0; c0 < span; c0 += kChunk) {
              tiles(acc.data(), block_n, i0, n0, i0, i1, j_begin, n1, c0, std::min(span, c0 + kChunk), Next{-1, 0});
            }
          }
          epilogue(acc.data(), block_n, i0, i1, n0, n1, row_f32.data());
        }
      }
    });
    TORCH_CHECK_VALUE(!nan_coded, "x holds NaN, which no activation code can represent");
    return;
  }

  const int64_t block_m = m <= kGemvRows ? m : kBlockM;
  const int64_t block_n = kBlockN;
  const int64_t tasks_m = (m + block_m - 1) / block_m, tasks_n = (n + block_n - 1) / block_n;
  at::parallel_for(0, tasks_m * tasks_n, 1, [&](int64_t first, int64_t last) {
    std::vector<int32_t> acc(static_cast<size_t>(block_m * block_n));
    std::vector<float> row_f32(static_cast<size_t>(block_n));
    for (int64_t task = first; task < last; ++task) {
      const int64_t m0 = (task / tasks_n) * block_m, m1 = std::min(m, m0 + block_m);
      const int64_t n0 = (task % tasks_n) * block_n, n1 = std::min(n, n0 + block_n);
      std::fill(acc.begin(), acc.end(), 0);
      for (int64_t c0 = 0; c0 < span; c0 += kChunk) {
        const int64_t c1 = std::min(span, c0 + kChunk);
        const Next after = c1 < span       ? Next{n0, c1 - c0}
                           : task + 1 < last ? Next{((task + 1) % tasks_n) * block_n, -c0}
                                             : Next{-1, 0};
        tiles(acc.data(), block_n, m0, n0, m0, m1, n0, n1, c0, c1, after);
      }
      epilogue(acc.data(), block_n, m0, m1, n0, n1, row_f32.data());
    }
  });
  TORCH_CHECK_VALUE(!nan_coded, "x holds NaN, which no activation code can represent");
}

// The invariants both GEMM entry points rely on: x (M, K) and packed_w (N, packed K) contiguous, packed at w_bits
// in the SPEC section 4 container.
void check_gemm_operands(const at::Tensor& x, const at::Tensor& packed_w, int64_t w_bits) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "lowbit._C.cpu: x must be a contiguous (M, K) tensor");
  TORCH_CHECK(packed_w.dim() == 2 && packed_w.is_contiguous() && packed_w.scalar_type() == at::kByte,
              "lowbit._C.cpu: packed_w must be a contiguous (N, packed K) uint8 tensor");
  TORCH_CHECK(w_bits >= 2 && w_bits <= 8, "lowbit._C.cpu: w_bits must be in 2..8");
  const int64_t k_len = x.size(1);
  const int container = w_bits == 2 ? 2 : w_bits <= 4 ? 4 : 8;
  TORCH_CHECK(packed_w.size(1) == (k_len * container + 7) / 8, "lowbit._C.cpu: packed_w has ", packed_w.size(1),
              " bytes per row, K=", k_len, " at ", w_bits, " bits needs ", (k_len * container + 7) / 8);
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed_w, const at::Tensor& w_scale, int64_t w_bits,
                         const at::Tensor& x_step, int64_t qmin, int64_t qmax, const std::optional<at::Tensor>& bias) {
  check_gemm_operands(x, packed_w, w_bits);
  const int64_t m = x.size(0), n = packed_w.size(0);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == n,
              "lowbit._C.cpu: w_scale must be a contiguous float32 (N,) tensor");
  TORCH_CHECK(x_step.scalar_type() == at::kFloat && x_step.numel() == 1, "lowbit._C.cpu: x_step must be one float32");
  TORCH_CHECK(qmin >= -128 && qmax <= 255 && qmin <= qmax && (qmin >= 0 || qmax <= 127),
              "lowbit._C.cpu: [qmin, qmax] must be a signed or unsigned 8-bit-or-less range");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n),
              "lowbit._C.cpu: bias must be None or a contiguous float32 (N,) tensor");
  const at::Tensor step = x_step.contiguous();
  check_values("x_step", step, /*positive=*/true);
  check_values("w_scale", w_scale, /*positive=*/true);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const float s = step.const_data_ptr<float>()[0];
  std::vector<float> scale(n);
  const float* ws = w_scale.const_data_ptr<float>();
  for (int64_t j = 0; j < n; ++j) scale[j] = s * ws[j];
  const float* b = bias ? bias->const_data_ptr<float>() : nullptr;
  const EpilogueSpec plain{-std::numeric_limits<float>::infinity(), std::numeric_limits<float>::infinity(), 0.f, 0, 0};
  LOWBIT_DISPATCH_FLOAT(x.scalar_type(), "lowbit_packed_linear", [&] {
    run<scalar_t, scalar_t>(x, packed_w, scale.data(), b, w_bits, qmin, qmax, s, plain, y);
  });
  return y;
}

template <class T>
void run_gemm(const at::Tensor& x, const at::Tensor& packed_w, const float* scale, const float* bias, int64_t w_bits,
              int64_t qmin, int64_t qmax, float x_step, const EpilogueSpec& spec, at::Tensor& y) {
  if (spec.out_step > 0.f) {
    if (spec.out_qmin >= 0) return run<T, uint8_t>(x, packed_w, scale, bias, w_bits, qmin, qmax, x_step, spec, y);
    return run<T, int8_t>(x, packed_w, scale, bias, w_bits, qmin, qmax, x_step, spec, y);
  }
  if constexpr (std::is_integral_v<T>) {
    return run<T, float>(x, packed_w, scale, bias, w_bits, qmin, qmax, x_step, spec, y);
  } else {
    return run<T, T>(x, packed_w, scale, bias, w_bits, qmin, qmax, x_step, spec, y);
  }
}

// Whether the panel kernel runs at the active level: AVX2, and AVX-512 CPUs without VNNI (which run the AVX2 tiles
// too). With VNNI (and AMX) the packed_linear tiles keep the GEMM: the panel kernel is AVX2 code, not measured
// against them on such a CPU, and a VNNI form of it is not written.
bool panel_level() {
  const Isa isa = active_isa();
  return isa == Isa::kAvx2 || (isa == Isa::kAvx512 && !cpu_has_avx512_vnni());
}

// The weights' column sums the byte kernel subtracts (x 128) for int8 codes (empty when it needs none).
std::vector<int32_t> panel_colsum(const at::Tensor& panel, int64_t n, int64_t k_len, bool x_signed, int64_t w_bits) {
  std::vector<int32_t> colsum;
  if (!x_signed || w_bits == 8) return colsum;
  colsum.assign(n, 0);
  const int8_t* codes_w = reinterpret_cast<const int8_t*>(panel.const_data_ptr<uint8_t>());
  const int64_t panel_bytes = panel.size(1);
  for (int64_t j = 0; j < n; ++j) {
    const int8_t* block = codes_w + (j / 16) * panel_bytes + ((j % 16) / 8) * 32 + (j % 8) * 4;
    int32_t sum = 0;
    for (int64_t kk = 0; kk < k_len; ++kk) sum += block[(kk / 4) * 64 + kk % 4];
    colsum[j] = sum;
  }
  return colsum;
}

// The panel GEMM's tasks: blocks of kPanelRows rows by kPanelBlockN channels, parallel. With `patches`, a task
// first gathers its rows' patches from the codes at `src` into a buffer of its own (the rows of `args` are unused),
// so the patch matrix never exists whole.
constexpr int64_t kPanelRows = 64;
void panel_tasks(const PanelArgs& args, const PatchGeometry* patches, const uint8_t* src, int64_t y_elem_bytes) {
  const int64_t m = args.m, n = args.n;
  const int64_t tasks_m = (m + kPanelRows - 1) / kPanelRows, tasks_n = (n + kPanelBlockN - 1) / kPanelBlockN;
  std::atomic<bool> nan_coded{false};
  // at least kMinTaskMacs multiply-adds per thread: waking a thread costs more than a small layer's block
  constexpr int64_t kMinTaskMacs = int64_t{1} << 20;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / std::max<int64_t>(1, kPanelRows * kPanelBlockN * args.k));
  at::parallel_for(0, tasks_m * tasks_n, grain, [&](int64_t first, int64_t last) {
    std::vector<int32_t> acc(static_cast<size_t>(kPanelRows * kPanelBlockN));
    std::vector<float> v(static_cast<size_t>(kPanelBlockN));
    std::vector<uint8_t> rows(patches ? static_cast<size_t>(kPanelRows * args.k) : 0);
    for (int64_t task = first; task < last; ++task) {
      const int64_t m0 = (task / tasks_n) * kPanelRows, n0 = (task % tasks_n) * kPanelBlockN;
      const int64_t m1 = std::min(m, m0 + kPanelRows), n1 = std::min(n, n0 + kPanelBlockN);
      bool nan = false;
      if (patches) {
        for (int64_t r = m0; r < m1; ++r) gather_patch_row(src, *patches, r, rows.data() + (r - m0) * args.k);
        PanelArgs block = args;  // rows m0 .. m1 as rows 0 .. m1 - m0 of the buffer and of y from row m0 on
        block.x = rows.data();
        block.m = m1 - m0;
        block.y = static_cast<uint8_t*>(args.y) + m0 * n * y_elem_bytes;
        nan = panel_avx2::gemm_block(block, 0, m1 - m0, n0, n1, acc.data(), v.data());
      } else {
        nan = panel_avx2::gemm_block(args, m0, m1, n0, n1, acc.data(), v.data());
      }
      if (nan) nan_coded = true;
    }
  });
  TORCH_CHECK_VALUE(!nan_coded, "x holds NaN, which no activation code can represent");
}

// The panel path of packed_gemm (packed_panel.h): x's codes as they are (as the reference takes them), or float x
// quantized once into codes with a NaN flag per row; then panel_tasks.
template <class T>
void run_panel(const at::Tensor& x, const at::Tensor& panel, const float* scale, const float* bias, int64_t w_bits,
               float x_step, int64_t qmin, int64_t qmax, const EpilogueSpec& spec, at::Tensor& y) {
  const int64_t m = x.size(0), k_len = x.size(1), n = y.size(1);
  count_packed_path(PackedPath::kPanel);
  std::vector<uint8_t> codes, nan_rows;
  const uint8_t* rows = nullptr;
  bool x_signed = false;
  if constexpr (std::is_integral_v<T>) {
    rows = reinterpret_cast<const uint8_t*>(x.const_data_ptr<T>());
    x_signed = std::is_signed_v<T>;
  } else {
    x_signed = qmin < 0;
    codes.resize(static_cast<size_t>(m * k_len));
    nan_rows.assign(m, 0);
    const PackedLinearKernels k = packed_linear_kernels(active_isa());
    const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
    at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k_len)), [&](int64_t b, int64_t e) {
      std::vector<float> q(k_len);
      for (int64_t row = b; row < e; ++row) {
        uint8_t* out = codes.data() + row * k_len;
        if constexpr (std::is_same_v<T, float>) {  // the AVX2 row quantizer
          nan_rows[row] = panel_avx2::quantize_codes(data<T>(x) + row * k_len, k_len, x_step,
                                                     static_cast<int32_t>(qmin), static_cast<int32_t>(qmax), out);
          continue;
        }
        quantize_row(k, data<T>(x) + row * k_len, q.data(), k_len, x_step);
        bool nan = false;
        for (int64_t i = 0; i < k_len; ++i) {
          float v = q[i];
          nan |= v != v;
          v = v == v ? std::min(std::max(v, lo), hi) : 0.f;
          out[i] = static_cast<uint8_t>(static_cast<int32_t>(v));  // int8 codes keep their two's complement bits
        }
        nan_rows[row] = nan;
      }
    });
    rows = codes.data();
  }
  const std::vector<int32_t> colsum = panel_colsum(panel, n, k_len, x_signed, w_bits);
  const PanelArgs args{rows, k_len, m, k_len, x_signed, panel.const_data_ptr<uint8_t>(), n, static_cast<int>(w_bits),
                       colsum.empty() ? nullptr : colsum.data(), nan_rows.empty() ? nullptr : nan_rows.data(), scale,
                       bias, spec.lo, spec.hi, spec.out_step, spec.out_qmin, spec.out_qmax, y.mutable_data_ptr()};
  panel_tasks(args, nullptr, nullptr, y.element_size());
}

// The integer data path's GEMM (issue 17): packed_linear with the folded epilogue of packed_epilogue.h. x is
// float (quantized here at x_step into [qmin, qmax], as packed_linear) or uint8/int8 codes (used as they are);
// `scale` is the whole per-channel multiplier (x_step * w_scale * folded batch-norm), `bias` the folded shift.
at::Tensor packed_gemm(const at::Tensor& x, const at::Tensor& packed_w, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, int64_t w_bits, double x_step, int64_t qmin, int64_t qmax,
                       double lo, double hi, double out_step, int64_t out_qmin, int64_t out_qmax,
                       const std::optional<at::Tensor>& panel) {
  check_gemm_operands(x, packed_w, w_bits);
  const int64_t m = x.size(0), n = packed_w.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n,
              "lowbit._C.cpu: scale must be a contiguous float32 (N,) tensor");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n),
              "lowbit._C.cpu: bias must be None or a contiguous float32 (N,) tensor");
  TORCH_CHECK(qmin >= -128 && qmax <= 255 && qmin <= qmax && (qmin >= 0 || qmax <= 127),
              "lowbit._C.cpu: [qmin, qmax] must be a signed or unsigned 8-bit-or-less range");
  TORCH_CHECK(out_step == 0 || (out_qmin >= -128 && out_qmax <= 255 && out_qmin <= out_qmax &&
                                (out_qmin >= 0 || out_qmax <= 127)),
              "lowbit._C.cpu: [out_qmin, out_qmax] must be a signed or unsigned 8-bit-or-less range");
  const bool codes_in = x.scalar_type() == at::kByte || x.scalar_type() == at::kChar;
  const EpilogueSpec spec{static_cast<float>(lo), static_cast<float>(hi), static_cast<float>(out_step),
                          static_cast<int32_t>(out_qmin), static_cast<int32_t>(out_qmax)};
  const auto out_type = out_step > 0 ? (out_qmin >= 0 ? at::kByte : at::kChar)
                                     : (codes_in ? at::kFloat : x.scalar_type());
  at::Tensor y = at::empty({m, n}, x.options().dtype(out_type));
  if (m == 0 || n == 0) return y;
  const float* b = bias ? bias->const_data_ptr<float>() : nullptr;
  const float* sc = scale.const_data_ptr<float>();
  const float s = static_cast<float>(x_step);
  if (panel) {
    TORCH_CHECK(panel->scalar_type() == at::kByte && panel->is_contiguous() && panel->dim() == 2 &&
                    panel->size(0) == (n + 15) / 16 && panel->size(1) == (x.size(1) + 3) / 4 * 64,
                "lowbit._C.cpu: panel must be the contiguous uint8 (ceil(N / 16), ceil(K / 4) * 64) gemm_panel");
  }
  // the panel kernel: the AVX2 levels, float32 or code output
  if (panel && panel_level() && out_type != at::kHalf && out_type != at::kBFloat16) {
    if (x.scalar_type() == at::kByte) {
      run_panel<uint8_t>(x, *panel, sc, b, w_bits, s, qmin, qmax, spec, y);
    } else if (x.scalar_type() == at::kChar) {
      run_panel<int8_t>(x, *panel, sc, b, w_bits, s, qmin, qmax, spec, y);
    } else {
      LOWBIT_DISPATCH_FLOAT(x.scalar_type(), "lowbit_packed_gemm_panel", [&] {
        run_panel<scalar_t>(x, *panel, sc, b, w_bits, s, qmin, qmax, spec, y);
      });
    }
    return y;
  }
  if (x.scalar_type() == at::kByte) {
    run_gemm<uint8_t>(x, packed_w, sc, b, w_bits, qmin, qmax, s, spec, y);
  } else if (x.scalar_type() == at::kChar) {
    run_gemm<int8_t>(x, packed_w, sc, b, w_bits, qmin, qmax, s, spec, y);
  } else {
    LOWBIT_DISPATCH_FLOAT(x.scalar_type(), "lowbit_packed_gemm", [&] {
      run_gemm<scalar_t>(x, packed_w, sc, b, w_bits, qmin, qmax, s, spec, y);
    });
  }
  return y;
}

// kxk convolution of channels-last codes x (B, H, W, C) on the panel kernel (issue 17): packed_gemm of the patches
// of x (patches.h: K in (kh, kw, C) order, code 0 padding), gathered per task rather than whole. Without a panel
// or on the scalar level, im2col then packed_gemm (the same bits).
at::Tensor packed_patches_gemm(const at::Tensor& x, const at::Tensor& packed_w, const at::Tensor& scale,
                               const std::optional<at::Tensor>& bias, int64_t w_bits,
                               const std::vector<int64_t>& kernel, const std::vector<int64_t>& stride,
                               const std::vector<int64_t>& padding,
                               const std::vector<int64_t>& dilation, double lo, double hi, double out_step,
                               int64_t out_qmin, int64_t out_qmax, const std::optional<at::Tensor>& panel) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && (x.scalar_type() == at::kByte || x.scalar_type() == at::kChar),
              "lowbit._C.cpu: x must be contiguous (B, H, W, C) uint8 or int8 codes");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "lowbit._C.cpu: kernel, stride, padding and dilation must have 2 entries");
  const bool x_signed = x.scalar_type() == at::kChar;
  const int64_t qmin = x_signed ? -128 : 0, qmax = x_signed ? 127 : 255;  // codes are taken as they are
  if (!panel || !panel_level()) {
    return packed_gemm(im2col_codes(x, kernel, stride, padding, dilation), packed_w, scale, bias, w_bits, 1.0, qmin,
                       qmax, lo, hi, out_step, out_qmin, out_qmax, panel);
  }
  const PatchGeometry g = patch_geometry(x.size(1), x.size(2), x.size(3), kernel.data(), stride.data(),
                                         padding.data(), dilation.data());
  TORCH_CHECK(g.out_h >= 1 && g.out_w >= 1, "lowbit._C.cpu: the input is smaller than the kernel span");
  const int64_t m = x.size(0) * g.out_h * g.out_w, k_len = g.row_bytes(), n = packed_w.size(0);
  const int container = w_bits == 2 ? 2 : w_bits <= 4 ? 4 : 8;
  TORCH_CHECK(packed_w.dim() == 2 && packed_w.is_contiguous() && packed_w.scalar_type() == at::kByte &&
                  w_bits >= 2 && w_bits <= 8 && packed_w.size(1) == (k_len * container + 7) / 8,
              "lowbit._C.cpu: packed_w must be the contiguous (N, packed kh * kw * C) uint8 codes at w_bits");
  TORCH_CHECK(panel->scalar_type() == at::kByte && panel->is_contiguous() && panel->dim() == 2 &&
                  panel->size(0) == (n + 15) / 16 && panel->size(1) == (k_len + 3) / 4 * 64,
              "lowbit._C.cpu: panel must be the contiguous uint8 (ceil(N / 16), ceil(K / 4) * 64) gemm_panel");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n,
              "lowbit._C.cpu: scale must be a contiguous float32 (N,) tensor");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n),
              "lowbit._C.cpu: bias must be None or a contiguous float32 (N,) tensor");
  TORCH_CHECK(out_step == 0 || (out_qmin >= -128 && out_qmax <= 255 && out_qmin <= out_qmax &&
                                (out_qmin >= 0 || out_qmax <= 127)),
              "lowbit._C.cpu: [out_qmin, out_qmax] must be a signed or unsigned 8-bit-or-less range");
  const auto out_type = out_step > 0 ? (out_qmin >= 0 ? at::kByte : at::kChar) : at::kFloat;
  at::Tensor y = at::empty({m, n}, x.options().dtype(out_type));
  if (m == 0 || n == 0) return y;
  count_packed_path(PackedPath::kPanel);
  const std::vector<int32_t> colsum = panel_colsum(*panel, n, k_len, x_signed, w_bits);
  const PanelArgs args{nullptr, k_len, m, k_len, x_signed, panel->const_data_ptr<uint8_t>(), n,
                       static_cast<int>(w_bits), colsum.empty() ? nullptr : colsum.data(), nullptr,
                       scale.const_data_ptr<float>(), bias ? bias->const_data_ptr<float>() : nullptr,
                       static_cast<float>(lo), static_cast<float>(hi), static_cast<float>(out_step),
                       static_cast<int32_t>(out_qmin), static_cast<int32_t>(out_qmax), y.mutable_data_ptr()};
  panel_tasks(args, &g, static_cast<const uint8_t*>(x.const_data_ptr()), y.element_size());
  return y;
}

}  // namespace

void bind_packed_linear(pybind11::module_& m) {
  using lowbit::ReleaseGil;
  using namespace pybind11::literals;  // "x"_a: argument names for help() and keyword calls
  m.def("packed_linear", &packed_linear, ReleaseGil(),
        "x"_a, "packed_w"_a, "w_scale"_a, "w_bits"_a, "x_step"_a, "qmin"_a, "qmax"_a, "bias"_a);
  m.def("packed_gemm", &packed_gemm, ReleaseGil(),
        "x"_a, "packed_w"_a, "scale"_a, "bias"_a, "w_bits"_a, "x_step"_a, "qmin"_a, "qmax"_a, "lo"_a, "hi"_a,
        "out_step"_a, "out_qmin"_a, "out_qmax"_a, "panel"_a = pybind11::none());
  m.def("packed_patches_gemm", &packed_patches_gemm, ReleaseGil(), "x"_a, "packed_w"_a, "scale"_a, "bias"_a,
        "w_bits"_a, "kernel"_a, "stride"_a, "padding"_a, "dilation"_a, "lo"_a, "hi"_a, "out_step"_a, "out_qmin"_a,
        "out_qmax"_a, "panel"_a = pybind11::none());
}

}  // namespace lowbit::cpu
