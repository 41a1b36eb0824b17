// The fused multi-branch span kernels, written once against `Vec`; included after fake_quant_kernels.h in
// kernels_<isa>.cpp, whose quantize/gradients helpers they reuse.
//
// The branch count is a template parameter (1..kMaxBranches), so the per-branch constants and the 2*B gradient
// accumulators live in registers; `by_count` maps the run-time count onto the instantiations.
// Branch results are summed in branch order, each product rounded (no FMA), so every backend agrees bitwise.
#pragma once

namespace {

template <class V, int B>
struct BranchRegs {
  typename V::Reg step[B], prob[B], zero, clip_lo, clip_hi;
  QuantRange range[B];  // carries the clip: quantize and gradients clip x first, as fake_quant's kernels do
  bool clipped;
  explicit BranchRegs(const Branches& b)
      : zero(V::zero()), clip_lo(V::set1(b.clip_lo)), clip_hi(V::set1(b.clip_hi)), clipped(b.clipped) {
    for (int i = 0; i < B; ++i) {
      step[i] = V::set1(b.step[i]);
      prob[i] = V::set1(b.prob[i]);
      range[i] = {b.lo[i], b.hi[i], b.clip_lo, b.clip_hi};
    }
  }
};

template <class V, class T, int B>
int64_t multi_forward_part(const T* x, T* y, int64_t n, const Branches& b) {
  const BranchRegs<V, B> r(b);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    const auto xv = V::load(x + i);
    auto acc = V::mul(r.prob[0], quantize<V>(xv, r.step[0], r.zero, Consts<V>(r.range[0])));
    for (int k = 1; k < B; ++k) {
      acc = V::add(acc, V::mul(r.prob[k], quantize<V>(xv, r.step[k], r.zero, Consts<V>(r.range[k]))));
    }
    V::store(y + i, acc);
  }
  return i;
}

template <class V, class T, int B>
int64_t multi_backward_part(const T* g, const T* x, T* dx, int64_t n, const Branches& b, double* sums) {
  const BranchRegs<V, B> r(b);
  int64_t i = 0;
  while (i + V::kWidth <= n) {
    typename V::Reg acc_step[B], acc_prob[B];
    for (int k = 0; k < B; ++k) acc_step[k] = V::zero(), acc_prob[k] = V::zero();
    const int64_t block_end = i + kFlushEvery * V::kWidth;
    for (; i + V::kWidth <= n && i < block_end; i += V::kWidth) {
      const auto xv = V::load(x + i), gv = V::load(g + i);
      auto coef = V::zero();  // sum_k p_k * inside_k
      for (int k = 0; k < B; ++k) {
        const Consts<V> c(r.range[k]);
        Grads<V> d = gradients<V>(gv, xv, r.step[k], r.zero, c);
        acc_step[k] = V::add(acc_step[k], d.dstep);
        acc_prob[k] = V::add(acc_prob[k], V::mul(gv, V::mul(d.q, r.step[k])));
        coef = V::add(coef, V::select(d.inside, r.prob[k], r.zero));
      }
      auto dxv = V::mul(gv, coef);
      // hardtanh's backward, as torch computes it: passed on inside the open interval, +0 elsewhere and for NaN.
      // Only with a clip: without one, x = +-inf keeps g * 0 (a signed zero) as before.
      if (r.clipped) dxv = V::select(V::both(V::lt(r.clip_lo, xv), V::lt(xv, r.clip_hi)), dxv, r.zero);
      V::store(dx + i, dxv);
    }
    for (int k = 0; k < B; ++k) {
      sums[k] += V::sum(acc_step[k]);
      sums[b.count + k] += V::sum(acc_prob[k]);
    }
  }
  return i;
}

template <int B, class T>
void multi_forward(const T* x, T* y, int64_t n, const Branches& b) {
  int64_t done = multi_forward_part<Vec, T, B>(x, y, n, b);
  multi_forward_part<ScalarVec, T, B>(x + done, y + done, n - done, b);
}

template <int B, class T>
void multi_backward(const T* g, const T* x, T* dx, int64_t n, const Branches& b, double* sums) {
  int64_t done = multi_backward_part<Vec, T, B>(g, x, dx, n, b, sums);
  multi_backward_part<ScalarVec, T, B>(g + done, x + done, dx + done, n - done, b, sums);
}

template <class T, int... B>
void multi_forward_by_count(const T* x, T* y, int64_t n, const Branches& b, std::integer_sequence<int, B...>) {
  ((b.count == B + 1 ? multi_forward<B + 1, T>(x, y, n, b) : void()), ...);
}

template <class T, int... B>
void multi_backward_by_count(const T* g, const T* x, T* dx, int64_t n, const Branches& b, double* sums,
                             std::integer_sequence<int, B...>) {
  ((b.count == B + 1 ? multi_backward<B + 1, T>(g, x, dx, n, b, sums) : void()), ...);
}

template <class T>
void multi_forward_any(const T* x, T* y, int64_t n, const Branches& b) {
  multi_forward_by_count<T>(x, y, n, b, std::make_integer_sequence<int, kMaxBranches>{});
}

template <class T>
void multi_backward_any(const T* g, const T* x, T* dx, int64_t n, const Branches& b, double* sums) {
  multi_backward_by_count<T>(g, x, dx, n, b, sums, std::make_integer_sequence<int, kMaxBranches>{});
}

}  // namespace

template <class T>
MultiBranchKernels<T> multi_branch_kernels() {
  return {&multi_forward_any<T>, &multi_backward_any<T>};
}

template MultiBranchKernels<float> multi_branch_kernels<float>();
template MultiBranchKernels<c10::Half> multi_branch_kernels<c10::Half>();
template MultiBranchKernels<c10::BFloat16> multi_branch_kernels<c10::BFloat16>();
