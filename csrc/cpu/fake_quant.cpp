// CPU driver of the fused LSQ quantizer: splits the tensor into spans and threads, runs the ISA's span
// kernels (fake_quant_kernels.h) and reduces the step/offset gradients from per-task partials.
//
// x is viewed as (outer, C, inner). Three layouts, chosen once per call:
//   kShared       C == 1: one step for everything; spans are fixed-size chunks of the flat tensor.
//   kRows         C > 1, long inner runs: each run of `inner` elements shares its channel's step.
//   kInterleaved  C > 1, short inner runs (channel axis last or nearly): rows of C*inner elements with the
//                 step expanded per element, so the vector loop runs across channels.
// Chunking depends only on the shape, never on the thread count, so results are bit-identical run to run.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "bind.h"
#include "cpu/dispatch.h"
#include "cpu/fake_quant.h"

namespace lowbit::cpu {
namespace {

// Elements per parallel task: big enough to hide scheduling, small enough to balance two to many cores.
constexpr int64_t kGrain = 1 << 15;
// Inner runs shorter than this use the interleaved layout.
constexpr int64_t kMinRun = 16;
// Interleaved backward: tasks at most, and rows summed in float before folding into double.
constexpr int64_t kMaxInterleavedTasks = 64;
constexpr int64_t kFlushRows = 256;

enum class Mode { kShared, kRows, kInterleaved };

struct Layout {
  int64_t numel, channels, inner, outer;
  Mode mode;
};

Layout layout_of(const at::Tensor& x, const at::Tensor& step, int64_t inner) {
  const int64_t numel = x.numel(), channels = step.numel();
  if (channels == 1) return {numel, 1, numel, 1, Mode::kShared};
  const int64_t outer = numel / (channels * inner);
  // Interleaving expands the step to C*inner floats: only worth it (and bounded) when rows repeat.
  const bool interleave = inner < kMinRun && outer >= 4;
  return {numel, channels, inner, outer, interleave ? Mode::kInterleaved : Mode::kRows};
}

void check_inputs(const at::Tensor& x, const at::Tensor& step, const std::optional<at::Tensor>& offset,
                  int64_t inner) {
  TORCH_CHECK(x.is_contiguous(), "lowbit._C.cpu: x must be contiguous");
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.is_contiguous() && step.dim() == 1,
              "lowbit._C.cpu: step must be a contiguous float32 vector");
  TORCH_CHECK(!offset || (offset->scalar_type() == at::kFloat && offset->is_contiguous() &&
                          offset->numel() == step.numel()),
              "lowbit._C.cpu: offset must be a contiguous float32 vector like step");
  check_values("step", step, /*positive=*/true);
  if (offset) check_values("offset", *offset, /*positive=*/false);
  TORCH_CHECK(inner >= 1 && step.numel() >= 1 && x.numel() % (step.numel() * (step.numel() > 1 ? inner : 1)) == 0,
              "lowbit._C.cpu: x of ", x.numel(), " elements does not split into ", step.numel(), " channels of inner ",
              inner);
}

// Per-element copies of a (C,) parameter for one interleaved row of C*inner elements.
std::vector<float> expand_per_element(const float* param, const Layout& l) {
  std::vector<float> out(l.channels * l.inner);
  for (int64_t c = 0; c < l.channels; ++c) std::fill_n(out.begin() + c * l.inner, l.inner, param[c]);
  return out;
}

// ---- forward -----------------------------------------------------------------------------------------------

template <class T>
void forward(const T* x, T* y, const float* step, const float* offset, const Layout& l, QuantRange range) {
  const FakeQuantKernels<T> k = fake_quant_kernels<T>(active_isa());
  switch (l.mode) {
    case Mode::kShared:
      at::parallel_for(0, l.numel, kGrain, [&](int64_t b, int64_t e) {
        k.forward_shared(x + b, y + b, e - b, step[0], offset[0], range);
      });
      break;
    case Mode::kRows:
      at::parallel_for(0, l.outer * l.channels, std::max<int64_t>(1, kGrain / l.inner), [&](int64_t b, int64_t e) {
        for (int64_t row = b; row < e; ++row) {
          const int64_t c = row % l.channels, pos = row * l.inner;
          k.forward_shared(x + pos, y + pos, l.inner, step[c], offset[c], range);
        }
      });
      break;
    case Mode::kInterleaved: {
      const int64_t width = l.channels * l.inner;
      const std::vector<float> steps = expand_per_element(step, l), offsets = expand_per_element(offset, l);
      at::parallel_for(0, l.outer, std::max<int64_t>(1, kGrain / width), [&](int64_t b, int64_t e) {
        for (int64_t row = b; row < e; ++row) {
          k.forward_channels(x + row * width, y + row * width, width, steps.data(), offsets.data(), range);
        }
      });
      break;
    }
  }
}

// ---- backward: each task owns one partial (or one row of partials); the sums are folded in task order -----

// Tasks per thread so that a thread gets at least kGrain elements: small tensors (most weights) then run on
// the calling thread, without waking the pool.
int64_t tasks_grain(int64_t elements_per_task) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, elements_per_task)); }

template <class T>
void backward_shared(const T* g, const T* x, T* dx, const float* step, const float* offset, const Layout& l,
                     QuantRange range, const FakeQuantKernels<T>& k, double* out) {
  const int64_t tasks = (l.numel + kGrain - 1) / kGrain;
  std::vector<double> partial(2 * tasks, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t pos = t * kGrain, n = std::min(kGrain, l.numel - pos);
      k.backward_shared(g + pos, x + pos, dx + pos, n, step[0], offset[0], range, &partial[2 * t]);
    }
  });
  for (int64_t t = 0; t < tasks; ++t) out[0] += partial[2 * t], out[1] += partial[2 * t + 1];
}

template <class T>
void backward_rows(const T* g, const T* x, T* dx, const float* step, const float* offset, const Layout& l,
                   QuantRange range, const FakeQuantKernels<T>& k, double* out) {
  // A task is (channel, a run of outer indices) so that every partial belongs to one channel.
  const int64_t rows_per_task = std::max<int64_t>(1, kGrain / l.inner);
  const int64_t tasks_per_channel = (l.outer + rows_per_task - 1) / rows_per_task;
  std::vector<double> partial(2 * l.channels * tasks_per_channel, 0.0);
  const int64_t grain = tasks_grain(std::min(l.outer, rows_per_task) * l.inner);
  at::parallel_for(0, l.channels * tasks_per_channel, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t c = t / tasks_per_channel, first = (t % tasks_per_channel) * rows_per_task;
      const int64_t last = std::min(l.outer, first + rows_per_task);
      for (int64_t o = first; o < last; ++o) {
        const int64_t pos = (o * l.channels + c) * l.inner;
        k.backward_shared(g + pos, x + pos, dx + pos, l.inner, step[c], offset[c], range, &partial[2 * t]);
      }
    }
  });
  for (int64_t t = 0; t < l.channels * tasks_per_channel; ++t) {
    out[2 * (t / tasks_per_channel)] += partial[2 * t];
    out[2 * (t / tasks_per_channel) + 1] += partial[2 * t + 1];
  }
}

template <class T>
void backward_interleaved(const T* g, const T* x, T* dx, const float* step, const float* offset, const Layout& l,
                          QuantRange range, const FakeQuantKernels<T>& k, double* out) {
  const int64_t width = l.channels * l.inner;
  const int64_t tasks = std::min(l.outer, kMaxInterleavedTasks);
  const int64_t rows_per_task = (l.outer + tasks - 1) / tasks;
  const std::vector<float> steps = expand_per_element(step, l), offsets = expand_per_element(offset, l);
  std::vector<double> partial(2 * l.channels * tasks, 0.0);
  at::parallel_for(0, tasks, tasks_grain(rows_per_task * width), [&](int64_t b, int64_t e) {
    std::vector<float> acc_step(width), acc_offset(width);
    for (int64_t t = b; t < e; ++t) {
      const int64_t first = t * rows_per_task, last = std::min(l.outer, first + rows_per_task);
      for (int64_t block = first; block < last; block += kFlushRows) {
        std::fill(acc_step.begin(), acc_step.end(), 0.f);
        std::fill(acc_offset.begin(), acc_offset.end(), 0.f);
        for (int64_t row = block; row < std::min(last, block + kFlushRows); ++row) {
          const int64_t pos = row * width;
          k.backward_channels(g + pos, x + pos, dx + pos, width, steps.data(), offsets.data(), range, acc_step.data(),
                              acc_offset.data());
        }
        for (int64_t i = 0; i < width; ++i) {
          partial[2 * (t * l.channels + i / l.inner)] += acc_step[i];
          partial[2 * (t * l.channels + i / l.inner) + 1] += acc_offset[i];
        }
      }
    }
  });
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t c = 0; c < 2 * l.channels; ++c) out[c] += partial[2 * t * l.channels + c];
  }
}

template <class T>
void backward(const T* g, const T* x, T* dx, const float* step, const float* offset, const Layout& l,
              QuantRange range, double* out) {
  const FakeQuantKernels<T> k = fake_quant_kernels<T>(active_isa());
  switch (l.mode) {
    case Mode::kShared: return backward_shared(g, x, dx, step, offset, l, range, k, out);
    case Mode::kRows: return backward_rows(g, x, dx, step, offset, l, range, k, out);
    case Mode::kInterleaved: return backward_interleaved(g, x, dx, step, offset, l, range, k, out);
  }
}

// ---- the ops ------------------------------------------------------------------------------------------------

at::Tensor offset_or_zeros(const std::optional<at::Tensor>& offset, const at::Tensor& step) {
  return offset ? *offset : at::zeros({step.numel()}, step.options());
}

QuantRange range_of(int64_t qmin, int64_t qmax, double clip_lo, double clip_hi) {
  TORCH_CHECK(!(clip_lo >= clip_hi), "lowbit._C.cpu: clip_lo must be below clip_hi");  // also rejects NaN
  return {static_cast<float>(qmin), static_cast<float>(qmax), static_cast<float>(clip_lo),
          static_cast<float>(clip_hi)};
}

at::Tensor fake_quant_forward(const at::Tensor& x, const at::Tensor& step, const std::optional<at::Tensor>& offset,
                              int64_t qmin, int64_t qmax, int64_t inner, double clip_lo, double clip_hi) {
  check_inputs(x, step, offset, inner);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const at::Tensor beta = offset_or_zeros(offset, step);
  const Layout l = layout_of(x, step, inner);
  const QuantRange range = range_of(qmin, qmax, clip_lo, clip_hi);
  LOWBIT_DISPATCH_FLOAT(x.scalar_type(), "lowbit_fake_quant_forward", [&] {
    forward<scalar_t>(data<scalar_t>(x), mutable_data<scalar_t>(y), data<float>(step), data<float>(beta), l, range);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& step,
                                                                   const std::optional<at::Tensor>& offset,
                                                                   int64_t qmin, int64_t qmax, int64_t inner,
                                                                   double grad_scale, double clip_lo,
                                                                   double clip_hi) {
  check_inputs(x, step, offset, inner);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.is_contiguous(),
              "lowbit._C.cpu: grad must be contiguous with x's shape and dtype");
  at::Tensor dx = at::empty_like(x);
  const int64_t channels = step.numel();
  std::vector<double> sums(2 * channels, 0.0);  // interleaved [c][step, offset]
  if (x.numel() > 0) {
    const at::Tensor beta = offset_or_zeros(offset, step);
    const Layout l = layout_of(x, step, inner);
    const QuantRange range = range_of(qmin, qmax, clip_lo, clip_hi);
    LOWBIT_DISPATCH_FLOAT(x.scalar_type(), "lowbit_fake_quant_backward", [&] {
      backward<scalar_t>(data<scalar_t>(grad), data<scalar_t>(x), mutable_data<scalar_t>(dx), data<float>(step),
                         data<float>(beta), l, range, sums.data());
    });
  }
  at::Tensor dstep = at::empty({channels}, step.options()), doffset = at::empty({channels}, step.options());
  float* ds = dstep.mutable_data_ptr<float>();
  float* db = doffset.mutable_data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    ds[c] = static_cast<float>(sums[2 * c] * grad_scale);
    db[c] = static_cast<float>(sums[2 * c + 1] * grad_scale);
  }
  return {dx, dstep, doffset};
}

}  // namespace

void bind_fake_quant(pybind11::module_& m) {
  using lowbit::ReleaseGil;
  using namespace pybind11::literals;  // "x"_a: argument names for help() and keyword calls
  constexpr double kInf = std::numeric_limits<double>::infinity();  // no clip: a hardtanh folded in, if any
  m.def("fake_quant_forward", &fake_quant_forward, ReleaseGil(),
        "x"_a, "step"_a, "offset"_a, "qmin"_a, "qmax"_a, "inner"_a, "clip_lo"_a = -kInf, "clip_hi"_a = kInf);
  m.def("fake_quant_backward", &fake_quant_backward, ReleaseGil(),
        "grad"_a, "x"_a, "step"_a, "offset"_a, "qmin"_a, "qmax"_a, "inner"_a, "grad_scale"_a, "clip_lo"_a = -kInf,
        "clip_hi"_a = kInf);
}

}  // namespace lowbit::cpu
