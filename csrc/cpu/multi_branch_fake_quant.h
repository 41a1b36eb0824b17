// Span kernels of the multi-branch quantizer (SPEC section 2), one table per ISA and dtype.
//   y = sum_i p_i * Q(x; s_i, b_i), per-tensor steps, up to kMaxBranches branches of one signedness.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>

#include "cpu/isa.h"

namespace lowbit::cpu {

constexpr int kMaxBranches = 7;  // bits 2..8, each at most once

struct Branches {
  int count;
  float step[kMaxBranches], prob[kMaxBranches], lo[kMaxBranches], hi[kMaxBranches];
  // A hardtanh(x, clip_lo, clip_hi) folded in front of every branch (a ReLU / ReLU6); `clipped` when finite.
  float clip_lo = -std::numeric_limits<float>::infinity(), clip_hi = std::numeric_limits<float>::infinity();
  bool clipped = false;
};

template <class T>
struct MultiBranchKernels {
  void (*forward)(const T* x, T* y, int64_t n, const Branches& b);
  // sums[i] += sum g * dQ_i/ds_i, sums[count + i] += sum g * Q_i (before p_i and grad_scale)
  void (*backward)(const T* g, const T* x, T* dx, int64_t n, const Branches& b, double* sums);
};

namespace avx512 {
template <class T>
MultiBranchKernels<T> multi_branch_kernels();
}
namespace avx2 {
template <class T>
MultiBranchKernels<T> multi_branch_kernels();
}
namespace scalar {
template <class T>
MultiBranchKernels<T> multi_branch_kernels();
}

template <class T>
MultiBranchKernels<T> multi_branch_kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return avx512::multi_branch_kernels<T>();
    case Isa::kAvx2: return avx2::multi_branch_kernels<T>();
    default: return scalar::multi_branch_kernels<T>();
  }
}

}  // namespace lowbit::cpu
