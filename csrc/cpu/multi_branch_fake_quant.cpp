// CPU driver of the multi-branch quantizer: fixed-size chunks of the flat tensor run in parallel; each chunk's
// 2*B gradient sums land in its own partial row and are folded in chunk order (deterministic for any thread
// count).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "bind.h"
#include "cpu/dispatch.h"
#include "cpu/multi_branch_fake_quant.h"

namespace lowbit::cpu {
namespace {

constexpr int64_t kChunk = 1 << 15;

Branches branches_of(const at::Tensor& steps, const at::Tensor& probs, c10::IntArrayRef qmin,
                     c10::IntArrayRef qmax, double clip_lo, double clip_hi) {
  TORCH_CHECK(!(clip_lo >= clip_hi), "lowbit._C.cpu: clip_lo must be below clip_hi");  // also rejects NaN
  const int64_t count = steps.numel();
  TORCH_CHECK(count >= 1 && count <= kMaxBranches, "lowbit._C.cpu: 1..", kMaxBranches, " branches, got ", count);
  TORCH_CHECK(steps.scalar_type() == at::kFloat && probs.scalar_type() == at::kFloat && probs.numel() == count &&
                  static_cast<int64_t>(qmin.size()) == count && static_cast<int64_t>(qmax.size()) == count,
              "lowbit._C.cpu: steps, probs (float32), qmin and qmax must all have one entry per branch");
  const at::Tensor s = steps.contiguous(), p = probs.contiguous();
  check_values("steps", s, /*positive=*/true);
  check_values("probs", p, /*positive=*/false);
  Branches b{static_cast<int>(count), {}, {}, {}, {}};
  for (int64_t i = 0; i < count; ++i) {
    b.step[i] = s.const_data_ptr<float>()[i];
    b.prob[i] = p.const_data_ptr<float>()[i];
    b.lo[i] = static_cast<float>(qmin[i]);
    b.hi[i] = static_cast<float>(qmax[i]);
  }
  b.clip_lo = static_cast<float>(clip_lo);
  b.clip_hi = static_cast<float>(clip_hi);
  b.clipped = std::isfinite(clip_lo) || std::isfinite(clip_hi);
  return b;
}

at::Tensor multi_branch_fake_quant_forward(const at::Tensor& x, const at::Tensor& steps, const at::Tensor& probs,
                                           const std::vector<int64_t>& qmin, const std::vector<int64_t>& qmax,
                                           double clip_lo, double clip_hi) {
  TORCH_CHECK(x.is_contiguous(), "lowbit._C.cpu: x must be contiguous");
  const Branches b = branches_of(steps, probs, qmin, qmax, clip_lo, clip_hi);
  at::Tensor y = at::empty_like(x);
  LOWBIT_DISPATCH_FLOAT(x.scalar_type(), "lowbit_multi_branch_forward", [&] {
    const auto k = multi_branch_kernels<scalar_t>(active_isa());
    const scalar_t* xp = data<scalar_t>(x);
    scalar_t* yp = mutable_data<scalar_t>(y);
    at::parallel_for(0, x.numel(), kChunk, [&](int64_t begin, int64_t end) {
      k.forward(xp + begin, yp + begin, end - begin, b);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_branch_fake_quant_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& steps, const at::Tensor& probs,
    const std::vector<int64_t>& qmin, const std::vector<int64_t>& qmax, const std::vector<double>& grad_scale,
    double clip_lo, double clip_hi) {
  TORCH_CHECK(x.is_contiguous() && grad.is_contiguous() && grad.sizes() == x.sizes() &&
                  grad.scalar_type() == x.scalar_type(),
              "lowbit._C.cpu: grad and x must be contiguous with the same shape and dtype");
  const Branches b = branches_of(steps, probs, qmin, qmax, clip_lo, clip_hi);
  TORCH_CHECK(static_cast<int>(grad_scale.size()) == b.count, "lowbit._C.cpu: one grad_scale per branch");
  at::Tensor dx = at::empty_like(x);
  const int64_t tasks = (x.numel() + kChunk - 1) / kChunk;
  std::vector<double> partial(2 * b.count * tasks, 0.0);
  LOWBIT_DISPATCH_FLOAT(x.scalar_type(), "lowbit_multi_branch_backward", [&] {
    const auto k = multi_branch_kernels<scalar_t>(active_isa());
    const scalar_t *gp = data<scalar_t>(grad), *xp = data<scalar_t>(x);
    scalar_t* dxp = mutable_data<scalar_t>(dx);
    at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        const int64_t pos = t * kChunk, n = std::min(kChunk, x.numel() - pos);
        k.backward(gp + pos, xp + pos, dxp + pos, n, b, &partial[2 * b.count * t]);
      }
    });
  });
  std::vector<double> sums(2 * b.count, 0.0);
  for (int64_t t = 0; t < tasks; ++t) {
    for (int j = 0; j < 2 * b.count; ++j) sums[j] += partial[2 * b.count * t + j];
  }
  at::Tensor dsteps = at::empty({b.count}, steps.options()), dprobs = at::empty({b.count}, probs.options());
  for (int i = 0; i < b.count; ++i) {
    dsteps.mutable_data_ptr<float>()[i] = static_cast<float>(sums[i] * b.prob[i] * grad_scale[i]);
    dprobs.mutable_data_ptr<float>()[i] = static_cast<float>(sums[b.count + i]);
  }
  return {dx, dsteps, dprobs};
}

}  // namespace

void bind_multi_branch_fake_quant(pybind11::module_& m) {
  using lowbit::ReleaseGil;
  using namespace pybind11::literals;  // "x"_a: argument names for help() and keyword calls
  constexpr double kInf = std::numeric_limits<double>::infinity();  // no clip: a hardtanh folded in, if any
  m.def("multi_branch_fake_quant_forward", &multi_branch_fake_quant_forward, ReleaseGil(),
        "x"_a, "steps"_a, "probs"_a, "qmin"_a, "qmax"_a, "clip_lo"_a = -kInf, "clip_hi"_a = kInf);
  m.def("multi_branch_fake_quant_backward", &multi_branch_fake_quant_backward, ReleaseGil(),
        "grad"_a, "x"_a, "steps"_a, "probs"_a, "qmin"_a, "qmax"_a, "grad_scale"_a, "clip_lo"_a = -kInf,
        "clip_hi"_a = kInf);
}

}  // namespace lowbit::cpu
