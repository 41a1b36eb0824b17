// CPU driver of the packed inference GEMM (SPEC section 4): lowbit_C::packed_linear.
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
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/packed_linear.h"

namespace lowbit::cpu {
namespace {

constexpr int64_t kGemvRows = 16;  // M at or below this: one task row block (GEMV)
constexpr int64_t kBlockM = 64;    // x rows per task (GEMM)
constexpr int64_t kBlockN = 64;    // weight rows per task
constexpr int64_t kAmxBlock = 128; // x rows and weight rows per task with AMX
constexpr int64_t kChunk = 2048;   // packed weight bytes per K chunk (a multiple of every ISA's lanes)
constexpr int kTileM = 4, kTileN = 8;

struct Prepared {
  std::vector<uint8_t> codes;  // M rows of `stride` bytes
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

template <class T>
Prepared prepare(const T* x, int64_t m, int64_t k_len, int64_t steps, int fields, const PackedLinearKernels& k,
                 float step, float lo, float hi) {
  Prepared p;
  p.stride = steps * k.lanes * fields * k.elem_bytes;
  p.codes.assign(static_cast<size_t>(m * p.stride), 0);
  p.rowsum.assign(m, 0);
  p.nan.assign(m, 0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k_len));
  at::parallel_for(0, m, grain, [&](int64_t b, int64_t e) {
    std::vector<float> q(k_len);
    for (int64_t row = b; row < e; ++row) {
      quantize_row(k, x + row * k_len, q.data(), k_len, step);
      uint8_t* out = p.codes.data() + row * p.stride;
      if (k.prepare_row && k.elem_bytes == 1) {
        p.nan[row] = k.prepare_row(q.data(), k_len, fields, lo, hi, out, p.stride, &p.rowsum[row]);
      } else if (k.elem_bytes == 2) {
        scatter_row(q.data(), k_len, fields, k.lanes, lo, hi, reinterpret_cast<int16_t*>(out), &p.rowsum[row],
                    &p.nan[row]);
      } else {
        scatter_row(q.data(), k_len, fields, k.lanes, lo, hi, out, &p.rowsum[row], &p.nan[row]);
      }
    }
  });
  return p;
}

template <class T>
void run(const at::Tensor& x, const at::Tensor& packed_w, const float* scale, const float* bias, int64_t w_bits,
         int64_t qmin, int64_t qmax, float x_step, at::Tensor& y) {
  const int64_t m = x.size(0), k_len = x.size(1), n = packed_w.size(0), w_bytes = packed_w.size(1);
  const int container = w_bits == 2 ? 2 : w_bits <= 4 ? 4 : 8;
  const int fields = 8 / container;
  const PackedLinearKernels k = packed_linear_kernels(active_isa());
  const int64_t steps = (w_bytes + k.lanes - 1) / k.lanes;
  const bool x_u8 = qmax > 127;
  const Prepared p = prepare(data<T>(x), m, k_len, steps, fields, k, x_step, static_cast<float>(qmin),
                             static_cast<float>(qmax));
  const int32_t weight_offset = (k.offset_weights && !x_u8) ? (1 << (container - 1)) : 0;

  const bool amx = k.amx_block != nullptr && m > kGemvRows;
  const int64_t block_m = m <= kGemvRows ? m : amx ? kAmxBlock : kBlockM;
  const int64_t block_n = amx ? kAmxBlock : kBlockN;
  const int64_t tasks_m = (m + block_m - 1) / block_m, tasks_n = (n + block_n - 1) / block_n;
  const int64_t span = steps * k.lanes;  // packed bytes walked per row (whole steps)
  const uint8_t* w = packed_w.const_data_ptr<uint8_t>();
  T* out = mutable_data<T>(y);
  at::parallel_for(0, tasks_m * tasks_n, 1, [&](int64_t first, int64_t last) {
    std::vector<int32_t> acc(static_cast<size_t>(block_m * block_n));
    std::vector<uint8_t> panel_store(amx ? 32 * kChunk * fields + 64 : 0);
    uint8_t* panel = panel_store.data() + (-reinterpret_cast<uintptr_t>(panel_store.data()) & 63);
    // VNNI/AVX2/scalar tiles over rows [i_begin, i_end) x weight rows [j_begin, j_end) of the task. The first x
    // block of each weight group gets the rows the driver reads next as a prefetch hint: the next group of the
    // chunk, else `after` (the first group of the next chunk or task, its byte offset relative to this chunk).
    struct Next {
      int64_t row;    // first weight row, or -1 for none
      int64_t delta;  // byte offset relative to the current chunk
    };
    auto tiles = [&](int64_t m0, int64_t n0, int64_t i_begin, int64_t i_end, int64_t j_begin, int64_t j_end,
                     int64_t c0, int64_t c1, Next after) {
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
          for (int i = 0; i < kTileM; ++i) xrows[i] = p.codes.data() + (i0 + (i < mr ? i : 0)) * p.stride;
          const PackedTile t{xrows, mr, wrows, nr, c0, c1, w_bytes, container, x_u8,
                             acc.data() + (i0 - m0) * block_n + (j0 - n0), block_n,
                             i0 == i_begin && next.row >= 0 ? pfrows : nullptr};
          k.tile(t);
        }
      }
    };
    for (int64_t task = first; task < last; ++task) {
      const int64_t m0 = (task / tasks_n) * block_m, m1 = std::min(m, m0 + block_m);
      const int64_t n0 = (task % tasks_n) * block_n, n1 = std::min(n, n0 + block_n);
      std::fill(acc.begin(), acc.end(), 0);
      // AMX takes the whole 32 x 32 blocks, the tiles the rest
      const int64_t am = amx ? (m1 - m0) / 32 * 32 : 0, an = amx ? (n1 - n0) / 32 * 32 : 0;
      for (int64_t c0 = 0; c0 < span; c0 += kChunk) {
        const int64_t c1 = std::min(span, c0 + kChunk);
        if (am > 0 && an > 0) {
          const AmxBlock b{p.codes.data() + m0 * p.stride, p.stride, am, w + n0 * w_bytes, w_bytes, an, c0, c1,
                           container, x_u8, weight_offset, p.rowsum.data() + m0, acc.data(), block_n, panel};
          k.amx_block(b);
          tiles(m0, n0, m0, m0 + am, n0 + an, n1, c0, c1, Next{-1, 0});
          tiles(m0, n0, m0 + am, m1, n0, n1, c0, c1, Next{-1, 0});
        } else {
          const Next after = c1 < span       ? Next{n0, c1 - c0}
                             : task + 1 < last ? Next{((task + 1) % tasks_n) * block_n, -c0}
                                               : Next{-1, 0};
          tiles(m0, n0, m0, m1, n0, n1, c0, c1, after);
        }
      }
      for (int64_t i = m0; i < m1; ++i) {
        T* yrow = out + i * n;
        if (p.nan[i]) {
          for (int64_t j = n0; j < n1; ++j) yrow[j] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
          continue;
        }
        const uint32_t correction = static_cast<uint32_t>(weight_offset) * static_cast<uint32_t>(p.rowsum[i]);
        const int32_t* arow = acc.data() + (i - m0) * block_n;
        for (int64_t j = n0; j < n1; ++j) {
          const int32_t a = static_cast<int32_t>(static_cast<uint32_t>(arow[j - n0]) - correction);
          float v = static_cast<float>(a) * scale[j];
          if (bias) v = v + bias[j];
          yrow[j] = static_cast<T>(v);
        }
      }
    }
  });
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed_w, const at::Tensor& w_scale, int64_t w_bits,
                         const at::Tensor& x_step, int64_t qmin, int64_t qmax, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "lowbit_C: x must be a contiguous (M, K) tensor");
  TORCH_CHECK(packed_w.dim() == 2 && packed_w.is_contiguous() && packed_w.scalar_type() == at::kByte,
              "lowbit_C: packed_w must be a contiguous (N, packed K) uint8 tensor");
  TORCH_CHECK(w_bits >= 2 && w_bits <= 8, "lowbit_C: w_bits must be in 2..8");
  const int64_t m = x.size(0), k_len = x.size(1), n = packed_w.size(0);
  const int container = w_bits == 2 ? 2 : w_bits <= 4 ? 4 : 8;
  TORCH_CHECK(packed_w.size(1) == (k_len * container + 7) / 8, "lowbit_C: packed_w has ", packed_w.size(1),
              " bytes per row, K=", k_len, " at ", w_bits, " bits needs ", (k_len * container + 7) / 8);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == n,
              "lowbit_C: w_scale must be a contiguous float32 (N,) tensor");
  TORCH_CHECK(x_step.scalar_type() == at::kFloat && x_step.numel() == 1, "lowbit_C: x_step must be one float32");
  TORCH_CHECK(qmin >= -128 && qmax <= 255 && qmin <= qmax && (qmin >= 0 || qmax <= 127),
              "lowbit_C: [qmin, qmax] must be a signed or unsigned 8-bit-or-less range");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n),
              "lowbit_C: bias must be None or a contiguous float32 (N,) tensor");
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
  LOWBIT_DISPATCH_FLOAT(x.scalar_type(), "lowbit_packed_linear", [&] {
    run<scalar_t>(x, packed_w, scale.data(), b, w_bits, qmin, qmax, s, y);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit_C, CPU, m) { m.impl("packed_linear", &packed_linear); }

}  // namespace lowbit::cpu
