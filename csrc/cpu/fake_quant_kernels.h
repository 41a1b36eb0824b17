// The fused LSQ span kernels, written once against a vector type `Vec` (Avx512Vec, Avx2Vec or ScalarVec).
//
// Included by kernels_{avx512,avx2,scalar}.cpp inside an ISA namespace and target pragma, after `Vec` is
// defined, so each ISA gets its own copy under its own name. Every wide loop hands its tail to ScalarVec,
// whose arithmetic is identical lane by lane (true division, round half to even, x86 NaN rules).
#pragma once

namespace {

// ---- the math of SPEC section 1, per vector --------------------------------------------------------------

template <class V>
struct Consts {
  typename V::Reg lo, hi, zero, clip_lo, clip_hi;
  explicit Consts(QuantRange r)
      : lo(V::set1(r.lo)), hi(V::set1(r.hi)), zero(V::zero()), clip_lo(V::set1(r.clip_lo)),
        clip_hi(V::set1(r.clip_hi)) {}
};

template <class V>
inline typename V::Reg clip(typename V::Reg x, const Consts<V>& c) {
  return V::min(c.clip_hi, V::max(c.clip_lo, x));  // keeps NaN, as hardtanh does
}

template <class V>
inline typename V::Reg quantize(typename V::Reg x, typename V::Reg step, typename V::Reg offset, const Consts<V>& c) {
  auto v = V::div(V::sub(clip<V>(x, c), offset), step);
  auto q = V::min(c.hi, V::max(c.lo, V::round(v)));  // operand order keeps NaN (see simd_*.h)
  return V::add(V::mul(q, step), offset);             // two roundings, like the reference: no FMA
}

template <class V>
struct Grads {
  typename V::Reg dx, dstep, doffset;
  typename V::Reg q;          // clamp(round(v)): the integer code, for callers that also need Q(x)
  typename V::Mask inside;    // Qn <= v <= Qp
};

template <class V>
inline Grads<V> gradients(typename V::Reg g, typename V::Reg x, typename V::Reg step, typename V::Reg offset,
                          const Consts<V>& c) {
  auto v = V::div(V::sub(clip<V>(x, c), offset), step);
  auto inside = V::both(V::ge(v, c.lo), V::le(v, c.hi));  // false for NaN
  auto passes = V::both(inside, V::both(V::lt(c.clip_lo, x), V::lt(x, c.clip_hi)));  // hardtanh's open interval
  auto beyond = V::select(V::lt(v, c.lo), c.lo, c.hi);
  auto rounded = V::round(v);
  auto dq_dstep = V::select(inside, V::sub(rounded, v), beyond);
  return {V::select(passes, g, c.zero), V::mul(g, dq_dstep), V::select(inside, c.zero, g),
          V::min(c.hi, V::max(c.lo, rounded)), inside};
}

// ---- spans: the wide part returns how many elements it did; the scalar tail does the rest -------------------

template <class V, class T>
int64_t forward_shared_part(const T* x, T* y, int64_t n, float step, float offset, QuantRange range) {
  const Consts<V> c(range);
  const auto s = V::set1(step), b = V::set1(offset);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) V::store(y + i, quantize<V>(V::load(x + i), s, b, c));
  return i;
}

template <class V, class T>
int64_t forward_channels_part(const T* x, T* y, int64_t n, const float* step, const float* offset, QuantRange range) {
  const Consts<V> c(range);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    V::store(y + i, quantize<V>(V::load(x + i), V::load(step + i), V::load(offset + i), c));
  }
  return i;
}

// Float accumulators are flushed into double every kFlushEvery vectors, which keeps the relative error of
// the sums near float64's for any length (SPEC asks for 1e-4 on millions of random-sign terms).
constexpr int64_t kFlushEvery = 256;

template <class V, class T>
int64_t backward_shared_part(const T* g, const T* x, T* dx, int64_t n, float step, float offset, QuantRange range,
                             double* sums) {
  const Consts<V> c(range);
  const auto s = V::set1(step), b = V::set1(offset);
  int64_t i = 0;
  while (i + V::kWidth <= n) {
    auto acc_step = V::zero(), acc_offset = V::zero();
    const int64_t block_end = i + kFlushEvery * V::kWidth;
    for (; i + V::kWidth <= n && i < block_end; i += V::kWidth) {
      Grads<V> d = gradients<V>(V::load(g + i), V::load(x + i), s, b, c);
      V::store(dx + i, d.dx);
      acc_step = V::add(acc_step, d.dstep);
      acc_offset = V::add(acc_offset, d.doffset);
    }
    sums[0] += V::sum(acc_step);
    sums[1] += V::sum(acc_offset);
  }
  return i;
}

template <class V, class T>
int64_t backward_channels_part(const T* g, const T* x, T* dx, int64_t n, const float* step, const float* offset,
                               QuantRange range, float* acc_step, float* acc_offset) {
  const Consts<V> c(range);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    Grads<V> d = gradients<V>(V::load(g + i), V::load(x + i), V::load(step + i), V::load(offset + i), c);
    V::store(dx + i, d.dx);
    V::store(acc_step + i, V::add(V::load(acc_step + i), d.dstep));
    V::store(acc_offset + i, V::add(V::load(acc_offset + i), d.doffset));
  }
  return i;
}

// ---- the table entries: wide part, then the tail ---------------------------------------------------------

template <class T>
void forward_shared(const T* x, T* y, int64_t n, float step, float offset, QuantRange range) {
  int64_t done = forward_shared_part<Vec>(x, y, n, step, offset, range);
  forward_shared_part<ScalarVec>(x + done, y + done, n - done, step, offset, range);
}

template <class T>
void forward_channels(const T* x, T* y, int64_t n, const float* step, const float* offset, QuantRange range) {
  int64_t done = forward_channels_part<Vec>(x, y, n, step, offset, range);
  forward_channels_part<ScalarVec>(x + done, y + done, n - done, step + done, offset + done, range);
}

template <class T>
void backward_shared(const T* g, const T* x, T* dx, int64_t n, float step, float offset, QuantRange range,
                     double* sums) {
  int64_t done = backward_shared_part<Vec>(g, x, dx, n, step, offset, range, sums);
  backward_shared_part<ScalarVec>(g + done, x + done, dx + done, n - done, step, offset, range, sums);
}

template <class T>
void backward_channels(const T* g, const T* x, T* dx, int64_t n, const float* step, const float* offset,
                       QuantRange range, float* acc_step, float* acc_offset) {
  int64_t done = backward_channels_part<Vec>(g, x, dx, n, step, offset, range, acc_step, acc_offset);
  backward_channels_part<ScalarVec>(g + done, x + done, dx + done, n - done, step + done, offset + done, range,
                                    acc_step + done, acc_offset + done);
}

}  // namespace

template <class T>
FakeQuantKernels<T> fake_quant_kernels() {
  return {&forward_shared<T>, &forward_channels<T>, &backward_shared<T>, &backward_channels<T>};
}

template FakeQuantKernels<float> fake_quant_kernels<float>();
template FakeQuantKernels<c10::Half> fake_quant_kernels<c10::Half>();
template FakeQuantKernels<c10::BFloat16> fake_quant_kernels<c10::BFloat16>();
