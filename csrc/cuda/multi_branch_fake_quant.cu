// The multi-branch quantizer (SPEC section 2) on CUDA tensors (lowbit._C.cuda): per-tensor steps (B,) and
// probabilities (B,), one clamp range per branch, B in 1..kMaxBranches.
//
// steps and probs stay on the device: the kernels load them from there (only the forward's value check copies them to
// the host, one synchronisation); the host lists qmin / qmax / grad_scale travel by value as kernel parameters. The
// branch count is a template parameter (1..7), so the per-branch values and the 2 * B gradient accumulators live
// in registers.
//
// Forward: one grid-stride pass that reads x and writes only y, 16-byte vectors where the pointers allow it.
//
// Backward: one pass over x and grad that writes dx; each block adds its elements' terms of the B dsteps sums and
// the B dprobs sums (per-thread float, at most kMaxTermsPerThread terms, then warps and block in double, in a fixed
// order) and stores them as 2 * B float64 partials; a second tiny kernel adds each sum's partials in a fixed order,
// multiplies dsteps by p_i * grad_scale_i on the device and writes the float32 results. No atomics, no
// element-sized temporaries, no host synchronisation. The work split depends only on numel and on whether the
// pointers are 16-byte aligned (see make_backward_plan), so repeated runs on any GPU give the same bits.
//
// Element math (multi_branch_fake_quant.cuh) matches the CPU kernels operation for operation, so y and dx agree
// bitwise.
#include "bind.h"
#include "checks.h"
#include "cuda/launch.cuh"
#include "cuda/multi_branch_fake_quant.cuh"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

// The three dtypes lowbit's kernels take (float32, float16, bfloat16); `scalar_t` inside the body. Not
// AT_DISPATCH_FLOATING_TYPES_AND2, which would also instantiate every kernel for double.
#define LOWBIT_CUDA_DISPATCH_FLOAT(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                           \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                        \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace lowbit {
namespace cuda {
namespace multi_branch {
namespace {

// Forward grid: enough resident blocks to fill every SM (8 x 256 threads = 2048), then grid-stride.
constexpr int kForwardBlocksPerSm = 8;
constexpr int kWarps = kThreads / 32;

// grad_scale of each branch, by value: only the final reduction reads it.
struct GradScales {
  double value[kMaxBranches];
};

// ---------------------------------------------------------------------------------------------------------------
// Kernels.

template <typename scalar_t, int B, int VEC>
__global__ void __launch_bounds__(kThreads)
    multi_branch_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                const float* __restrict__ steps, const float* __restrict__ probs, int64_t numel,
                                Ranges ranges) {
  const Branches<B> b = load_branches<B>(steps, probs);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  forward_thread<scalar_t, B, VEC>(x, y, numel, thread, threads, b, ranges);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums the block's 2 * B accumulators and stores them as partial[j * blocks + blockIdx.x]. Fixed order: a shuffle
// tree in each warp, then the warps in index order; all in double (2 * B five-level shuffle trees per warp, once per block).
template <int B>
__device__ __forceinline__ void block_sum_store(const Sums<B>& acc, double* __restrict__ partial, int64_t blocks) {
  __shared__ double warp_sums[kWarps][2 * B];
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
#pragma unroll
  for (int i = 0; i < B; ++i) {
    const double step_sum = warp_sum(static_cast<double>(acc.step[i]));
    const double prob_sum = warp_sum(static_cast<double>(acc.prob[i]));
    if (lane == 0) {
      warp_sums[warp][i] = step_sum;
      warp_sums[warp][B + i] = prob_sum;
    }
  }
  __syncthreads();
  if (tid < 2 * B) {
    double sum = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][tid];
    partial[tid * blocks + blockIdx.x] = sum;
  }
}

template <typename scalar_t, int B, int VEC>
__global__ void __launch_bounds__(kThreads)
    multi_branch_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                 scalar_t* __restrict__ dx, const float* __restrict__ steps,
                                 const float* __restrict__ probs, double* __restrict__ partial, BackwardPlan plan,
                                 Ranges ranges) {
  const Branches<B> b = load_branches<B>(steps, probs);
  Sums<B> acc;
#pragma unroll
  for (int i = 0; i < B; ++i) {
    acc.step[i] = 0.0f;
    acc.prob[i] = 0.0f;
  }
  backward_thread<scalar_t, B, VEC>(grad, x, dx, plan, blockIdx.x, threadIdx.x, b, ranges, acc);
  block_sum_store<B>(acc, partial, plan.blocks);
}

// One block per sum j < 2 * branches: its `blocks` partials, strided over the threads, then a shared-memory tree.
// dsteps[i] = sum * p_i * grad_scale_i in double (the CPU driver's order), dprobs[i] = sum.
__global__ void __launch_bounds__(kThreads)
    multi_branch_reduce_kernel(const double* __restrict__ partial, int64_t blocks, int branches,
                               const float* __restrict__ probs, GradScales grad_scale, float* __restrict__ dsteps,
                               float* __restrict__ dprobs) {
  __shared__ double sums[kThreads];
  const int tid = threadIdx.x;
  const int j = blockIdx.x;
  const double* row = partial + j * blocks;
  double sum = 0.0;
  for (int64_t k = tid; k < blocks; k += kThreads) sum += row[k];
  sums[tid] = sum;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (tid < width) sums[tid] += sums[tid + width];
    __syncthreads();
  }
  if (tid == 0) {
    if (j < branches) {
      // Picked by unrolled compares: indexing the parameter with the run-time j would copy it to local memory.
      double scale = 0.0;
#pragma unroll
      for (int i = 0; i < kMaxBranches; ++i) scale = i == j ? grad_scale.value[i] : scale;
      dsteps[j] = static_cast<float>(sums[0] * static_cast<double>(probs[j]) * scale);
    } else {
      dprobs[j - branches] = static_cast<float>(sums[0]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers (is_aligned16, multiprocessor_count, grid_size: cuda/launch.cuh).

// Calls fn(std::integral_constant<int, B>{}) for the run-time branch count, so the kernels see B as a constant.
template <typename Fn, int... Bs>
void with_branch_count(int count, Fn&& fn, std::integer_sequence<int, Bs...>) {
  ((count == Bs + 1 ? fn(std::integral_constant<int, Bs + 1>{}) : void()), ...);
}

template <typename Fn>
void with_branch_count(int count, Fn&& fn) {
  TORCH_CHECK(count >= 1 && count <= kMaxBranches, "lowbit._C.cuda: 1..", kMaxBranches, " branches, got ", count);
  with_branch_count(count, std::forward<Fn>(fn), std::make_integer_sequence<int, kMaxBranches>{});
}

struct Problem {
  const void* grad;  // nullptr in the forward
  const void* x;
  void* out;  // y or dx
  const float* steps;
  const float* probs;
  int64_t numel;
  int branches;
  Ranges ranges;
  int device;
  cudaStream_t stream;
};

template <typename scalar_t, int B, int VEC>
void launch_forward(const Problem& p) {
  const int64_t vectors = p.numel / VEC;
  const unsigned int blocks = elementwise_grid(vectors, kThreads, kForwardBlocksPerSm, p.device, "multi_branch_forward");
  multi_branch_forward_kernel<scalar_t, B, VEC><<<blocks, kThreads, 0, p.stream>>>(
      static_cast<const scalar_t*>(p.x), static_cast<scalar_t*>(p.out), p.steps, p.probs, p.numel, p.ranges);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void forward(const Problem& p) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec = is_aligned16(p.x) && is_aligned16(p.out);
  with_branch_count(p.branches, [&](auto branches) {
    constexpr int B = decltype(branches)::value;
    if (vec) {
      launch_forward<scalar_t, B, kVec>(p);
    } else {
      launch_forward<scalar_t, B, 1>(p);
    }
  });
}

template <typename scalar_t, int B, int VEC>
void launch_backward(const Problem& p, const BackwardPlan& plan, double* partial) {
  const unsigned int blocks = grid_size(plan.blocks, "multi_branch_backward");
  multi_branch_backward_kernel<scalar_t, B, VEC><<<blocks, kThreads, 0, p.stream>>>(
      static_cast<const scalar_t*>(p.grad), static_cast<const scalar_t*>(p.x), static_cast<scalar_t*>(p.out),
      p.steps, p.probs, partial, plan, p.ranges);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void backward(const Problem& p, const at::Tensor& x, const GradScales& grad_scale, float* dsteps, float* dprobs) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec = is_aligned16(p.grad) && is_aligned16(p.x) && is_aligned16(p.out);
  const BackwardPlan plan = make_backward_plan(p.numel, vec ? kVec : 1);
  // Every entry is written by the main kernel. Freed on return while the kernels may still run: the caching
  // allocator only hands the block out again to work queued later on this same stream, so that is safe.
  const at::Tensor partial = at::empty({2 * p.branches * plan.blocks}, x.options().dtype(at::kDouble));
  double* partial_ptr = partial.data_ptr<double>();
  with_branch_count(p.branches, [&](auto branches) {
    constexpr int B = decltype(branches)::value;
    if (vec) {
      launch_backward<scalar_t, B, kVec>(p, plan, partial_ptr);
    } else {
      launch_backward<scalar_t, B, 1>(p, plan, partial_ptr);
    }
  });
  multi_branch_reduce_kernel<<<2 * p.branches, kThreads, 0, p.stream>>>(partial_ptr, plan.blocks, p.branches,
                                                                          p.probs, grad_scale, dsteps, dprobs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------------
// Op entry points: check the invariants the Python layer guarantees, then dispatch on x's dtype.

int check_branches(const char* op, const at::Tensor& x, const at::Tensor& steps, const at::Tensor& probs,
                   const std::vector<int64_t>& qmin, const std::vector<int64_t>& qmax) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dtype);
  const int64_t count = steps.numel();
  TORCH_CHECK(count >= 1 && count <= kMaxBranches, op, ": 1..", kMaxBranches, " branches, got ", count);
  for (const at::Tensor* t : {&steps, &probs}) {
    TORCH_CHECK(t->device() == x.device(), op, ": steps and probs must be on x's device ", x.device(), ", got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == count, op,
                ": steps and probs must be contiguous float32 with one entry per branch");
  }
  TORCH_CHECK(static_cast<int64_t>(qmin.size()) == count && static_cast<int64_t>(qmax.size()) == count, op,
              ": qmin and qmax must have one entry per branch (", count, ")");
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(qmin[i] <= qmax[i], op, ": qmin (", qmin[i], ") exceeds qmax (", qmax[i], ") of branch ", i);
  }
  return static_cast<int>(count);
}

Problem make_problem(const at::Tensor& x, const at::Tensor& steps, const at::Tensor& probs,
                     const std::vector<int64_t>& qmin, const std::vector<int64_t>& qmax, int branches) {
  Problem p{};
  p.x = x.data_ptr();
  p.steps = steps.data_ptr<float>();
  p.probs = probs.data_ptr<float>();
  p.numel = x.numel();
  p.branches = branches;
  for (int i = 0; i < kMaxBranches; ++i) {
    p.ranges.lo[i] = i < branches ? static_cast<float>(qmin[i]) : 0.0f;
    p.ranges.hi[i] = i < branches ? static_cast<float>(qmax[i]) : 0.0f;
  }
  p.device = x.device().index();
  p.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  return p;
}

at::Tensor multi_branch_fake_quant_forward_cuda(const at::Tensor& x, const at::Tensor& steps, const at::Tensor& probs,
                                                const std::vector<int64_t>& qmin, const std::vector<int64_t>& qmax) {
  constexpr const char* kOp = "lowbit._C.cuda.multi_branch_fake_quant_forward";
  const int branches = check_branches(kOp, x, steps, probs, qmin, qmax);
  // The value rules, once per forward (a host copy of 2 * B floats: one synchronisation); the backward gets the
  // values this forward accepted.
  check_values("steps", steps, /*positive=*/true);
  check_values("probs", probs, /*positive=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  Problem p = make_problem(x, steps, probs, qmin, qmax, branches);
  p.out = y.data_ptr();
  LOWBIT_CUDA_DISPATCH_FLOAT(x.scalar_type(), "lowbit_multi_branch_forward_cuda", [&] { forward<scalar_t>(p); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_branch_fake_quant_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& steps, const at::Tensor& probs,
    const std::vector<int64_t>& qmin, const std::vector<int64_t>& qmax, const std::vector<double>& grad_scale) {
  constexpr const char* kOp = "lowbit._C.cuda.multi_branch_fake_quant_backward";
  const int branches = check_branches(kOp, x, steps, probs, qmin, qmax);
  TORCH_CHECK(grad.device() == x.device(), kOp, ": grad must be on x's device ", x.device(), ", got ", grad.device());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), kOp, ": grad must have x's dtype ", x.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.sizes() == x.sizes(), kOp, ": grad must have x's shape ", x.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.is_contiguous(), kOp, ": grad must be contiguous");
  TORCH_CHECK(static_cast<int>(grad_scale.size()) == branches, kOp, ": one grad_scale per branch (", branches,
              "), got ", grad_scale.size());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dsteps = at::empty({branches}, steps.options());
  at::Tensor dprobs = at::empty({branches}, probs.options());
  if (x.numel() == 0) {
    dsteps.zero_();
    dprobs.zero_();
    return {dx, dsteps, dprobs};
  }
  Problem p = make_problem(x, steps, probs, qmin, qmax, branches);
  p.grad = grad.data_ptr();
  p.out = dx.data_ptr();
  GradScales scales{};
  for (int i = 0; i < branches; ++i) scales.value[i] = grad_scale[i];
  float* ds = dsteps.data_ptr<float>();
  float* dp = dprobs.data_ptr<float>();
  LOWBIT_CUDA_DISPATCH_FLOAT(x.scalar_type(), "lowbit_multi_branch_backward_cuda",
                             [&] { backward<scalar_t>(p, x, scales, ds, dp); });
  return {dx, dsteps, dprobs};
}

}  // namespace
}  // namespace multi_branch

void bind_multi_branch_fake_quant(pybind11::module_& m) {
  using lowbit::ReleaseGil;
  using namespace pybind11::literals;  // "x"_a: argument names for help() and keyword calls
  m.def("multi_branch_fake_quant_forward", &multi_branch::multi_branch_fake_quant_forward_cuda, ReleaseGil(),
        "x"_a, "steps"_a, "probs"_a, "qmin"_a, "qmax"_a);
  m.def("multi_branch_fake_quant_backward", &multi_branch::multi_branch_fake_quant_backward_cuda, ReleaseGil(),
        "grad"_a, "x"_a, "steps"_a, "probs"_a, "qmin"_a, "qmax"_a, "grad_scale"_a);
}

}  // namespace cuda
}  // namespace lowbit
