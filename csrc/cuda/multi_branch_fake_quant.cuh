// The torch-free core of the multi-branch CUDA kernels (multi_branch_fake_quant.cu): element math, the work split of
// the backward, and each thread's share of the work. Everything here is __host__ __device__ and free of CUDA-only calls
// on the host side, so that a host program can run the very same code to check it bit for bit against the CPU
// kernels and to check that the kernels visit every element exactly once.
//
// Element math (SPEC section 2), float32, in the order of csrc/cpu/multi_branch_fake_quant_kernels.h so every
// backend agrees bitwise:
//   v_i = x / s_i (true division)   r_i = rint(v_i) (half to even)   q_i = clamp(r_i, Qn_i, Qp_i) (keeps NaN)
//   Q_i = q_i * s_i + 0             y = p_0 * Q_0 + p_1 * Q_1 + ...  (left to right, every operation rounded)
//   dx  = g * (sum_i inside_i ? p_i : 0)      inside_i = Qn_i <= v_i <= Qp_i
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/rounding.cuh"

// "#pragma unroll" for the device pass only: the host compiler also sees these __host__ __device__ bodies and would
// warn about the unknown pragma.
#if defined(__CUDA_ARCH__)
#define LOWBIT_MB_UNROLL _Pragma("unroll")
#else
#define LOWBIT_MB_UNROLL
#endif

namespace lowbit {
namespace cuda {
namespace multi_branch {

constexpr int kMaxBranches = 7;  // bits 2..8, each at most once (as csrc/cpu/multi_branch_fake_quant.h)
constexpr int kThreads = 256;    // threads of every block
// Vectors each backward thread loads (of x and of grad) before computing. Two keep enough bytes in flight to
// saturate memory (64 per thread) while the fully unrolled body, B divisions per element, stays a sane size.
constexpr int kUnroll = 2;
// Float terms a backward thread adds into each of its 2*B accumulators before the block sums them in double:
// bounds the float rounding error to about 64 ulps of the largest partial, far inside SPEC's 1e-4.
constexpr int64_t kMaxTermsPerThread = 64;
// Backward blocks aimed at when choosing how many rounds a block does. A constant, not the SM count, so that the
// work split, and with it the rounding of dsteps/dprobs, is the same on every GPU.
constexpr int64_t kTargetBlocks = 2048;

// ---------------------------------------------------------------------------------------------------------------
// Element math (sub_rn, mul_rn, add_rn, div_rn, clamp_keep_nan come from cuda/rounding.cuh).

// The host lists qmin / qmax as floats; passed by value as a kernel parameter, so after unrolling over the
// branches every read is a constant-bank operand, no register and no load.
struct Ranges {
  float lo[kMaxBranches];
  float hi[kMaxBranches];
};

// The per-tensor steps and probabilities, which live on the device: every thread loads them once into registers.
// All threads of a warp read the same address, one broadcast transaction served from L1 after the first warp.
template <int B>
struct Branches {
  float step[B];
  float prob[B];
};

template <int B>
LOWBIT_HD Branches<B> load_branches(const float* __restrict__ steps, const float* __restrict__ probs) {
  Branches<B> b;
LOWBIT_MB_UNROLL
  for (int i = 0; i < B; ++i) {
    b.step[i] = steps[i];
    b.prob[i] = probs[i];
  }
  return b;
}

// Q_i of one element: the branch's fake-quantized value.
LOWBIT_HD float branch_value(float x, float step, float lo, float hi) {
  const float q = clamp_keep_nan(rintf(div_rn(x, step)), lo, hi);
  // "+ 0" as on the CPU (quantize() adds the zero offset): it turns a -0 branch value into +0.
  return add_rn(mul_rn(q, step), 0.0f);
}

// y of one element: the branches weighted and summed in branch order, the first product not added to 0.
template <int B>
LOWBIT_HD float mix_forward(float x, const Branches<B>& b, const Ranges& r) {
  float y = mul_rn(b.prob[0], branch_value(x, b.step[0], r.lo[0], r.hi[0]));
LOWBIT_MB_UNROLL
  for (int i = 1; i < B; ++i) y = add_rn(y, mul_rn(b.prob[i], branch_value(x, b.step[i], r.lo[i], r.hi[i])));
  return y;
}

// Per-thread gradient sums: step[i] += g * dQ_i/ds_i, prob[i] += g * (q_i * s_i), one rounding per term (fmaf).
// The order and rounding of these sums are free (SPEC: 1e-4 relative), unlike y and dx.
template <int B>
struct Sums {
  float step[B];
  float prob[B];
};

// dx of one element, adding its terms to the thread's sums.
template <int B>
LOWBIT_HD float mix_backward(float x, float g, const Branches<B>& b, const Ranges& r, Sums<B>& acc) {
  float coef = 0.0f;  // sum_i p_i * inside_i, in branch order
LOWBIT_MB_UNROLL
  for (int i = 0; i < B; ++i) {
    const float lo = r.lo[i];
    const float hi = r.hi[i];
    const float v = div_rn(x, b.step[i]);
    const float rounded = rintf(v);
    const bool inside = (v >= lo) && (v <= hi);  // false for NaN
    const float dq_ds = inside ? sub_rn(rounded, v) : (v < lo ? lo : hi);
    acc.step[i] = fmaf(g, dq_ds, acc.step[i]);
    acc.prob[i] = fmaf(g, mul_rn(clamp_keep_nan(rounded, lo, hi), b.step[i]), acc.prob[i]);
    coef = add_rn(coef, inside ? b.prob[i] : 0.0f);
  }
  // A product, not a select: g * 0 is NaN for an infinite g, exactly as on the CPU and in the reference.
  return mul_rn(g, coef);
}

// ---------------------------------------------------------------------------------------------------------------
// Work split of the backward: block k owns the contiguous elements [k * block_elems, (k + 1) * block_elems) and
// walks them in `rounds` rounds of kThreads * vec * kUnroll elements; in a round, thread t takes vectors
// u * kThreads + t (u < kUnroll), so a warp's loads are contiguous. Block k writes partial[j * blocks + k] for
// j < 2 * B (dsteps sums first, then dprobs). A pure function of (numel, vec): the same split on every GPU.

template <typename T>
LOWBIT_HD T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

struct BackwardPlan {
  int64_t numel;
  int64_t round_elems;  // kThreads * vec * kUnroll
  int64_t rounds;       // rounds per block
  int64_t block_elems;  // rounds * round_elems
  int64_t blocks;
};

inline BackwardPlan make_backward_plan(int64_t numel, int vec) {
  BackwardPlan plan{};
  plan.numel = numel;
  plan.round_elems = static_cast<int64_t>(kThreads) * vec * kUnroll;
  const int64_t total_rounds = ceil_div(numel, plan.round_elems);
  const int64_t max_rounds = kMaxTermsPerThread / (static_cast<int64_t>(vec) * kUnroll);
  const int64_t wanted = ceil_div(total_rounds, kTargetBlocks);
  plan.rounds = wanted < 1 ? 1 : (wanted > max_rounds ? max_rounds : wanted);
  plan.block_elems = plan.rounds * plan.round_elems;
  plan.blocks = ceil_div(numel, plan.block_elems);
  return plan;
}

struct Slot {
  int64_t flat;  // flat index of the slot's first element
  int count;     // elements in the slot: vec, fewer only for the very last vector of the tensor, 0 past the end
};

LOWBIT_HD Slot backward_slot(const BackwardPlan& plan, int64_t block, int64_t round, int u, int tid, int vec) {
  const int64_t flat =
      block * plan.block_elems + round * plan.round_elems + (static_cast<int64_t>(u) * kThreads + tid) * vec;
  if (flat >= plan.numel) return {0, 0};
  const int64_t left = plan.numel - flat;
  return {flat, left < vec ? static_cast<int>(left) : vec};
}

// ---------------------------------------------------------------------------------------------------------------
// Vector memory access: 16-byte loads and stores when the caller has checked that every pointer is 16-byte aligned.

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
LOWBIT_HD Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
LOWBIT_HD void store_pack(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// ---------------------------------------------------------------------------------------------------------------
// One thread's share of each kernel, before any cross-thread step.

// Forward: grid-stride over vectors of VEC elements; the last numel % VEC elements go one each to the first threads
// (VEC <= 8 < kThreads, so block 0 alone covers them).
template <typename scalar_t, int B, int VEC>
LOWBIT_HD void forward_thread(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t numel,
                                 int64_t thread, int64_t threads, const Branches<B>& b, const Ranges& r) {
  const int64_t vectors = numel / VEC;
  for (int64_t i = thread; i < vectors; i += threads) {
    const Pack<scalar_t, VEC> in = load_pack<VEC>(x + i * VEC);
    Pack<scalar_t, VEC> out;
LOWBIT_MB_UNROLL
    for (int j = 0; j < VEC; ++j) {
      out.v[j] = static_cast<scalar_t>(mix_forward<B>(static_cast<float>(in.v[j]), b, r));
    }
    store_pack<VEC>(y + i * VEC, out);
  }
  const int64_t i = vectors * VEC + thread;
  if (i < numel) y[i] = static_cast<scalar_t>(mix_forward<B>(static_cast<float>(x[i]), b, r));
}

// Backward: the thread's slots of every round of its block; writes dx and adds into `acc` (zeroed by the caller).
// All loads of a round are issued before any math, so each thread has 2 * kUnroll vector loads in flight.
template <typename scalar_t, int B, int VEC>
LOWBIT_HD void backward_thread(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ dx, const BackwardPlan& plan, int64_t block, int tid,
                                  const Branches<B>& b, const Ranges& r, Sums<B>& acc) {
  for (int64_t round = 0; round < plan.rounds; ++round) {
    Slot slot[kUnroll];
    Pack<scalar_t, VEC> xv[kUnroll];
    Pack<scalar_t, VEC> gv[kUnroll];
LOWBIT_MB_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      slot[u] = backward_slot(plan, block, round, u, tid, VEC);
      if (slot[u].count == VEC) {
        xv[u] = load_pack<VEC>(x + slot[u].flat);
        gv[u] = load_pack<VEC>(grad + slot[u].flat);
      }
    }
LOWBIT_MB_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      if (slot[u].count == VEC) {
        Pack<scalar_t, VEC> out;
LOWBIT_MB_UNROLL
        for (int j = 0; j < VEC; ++j) {
          const float d = mix_backward<B>(static_cast<float>(xv[u].v[j]), static_cast<float>(gv[u].v[j]), b, r, acc);
          out.v[j] = static_cast<scalar_t>(d);
        }
        store_pack<VEC>(dx + slot[u].flat, out);
      } else {
        // Only the last, short vector of a tensor whose numel is not a multiple of VEC.
        for (int j = 0; j < slot[u].count; ++j) {
          const int64_t i = slot[u].flat + j;
          dx[i] = static_cast<scalar_t>(
              mix_backward<B>(static_cast<float>(x[i]), static_cast<float>(grad[i]), b, r, acc));
        }
      }
    }
  }
}

}  // namespace multi_branch
}  // namespace cuda
}  // namespace lowbit
