// One-lane "vector": the portable fallback and the tail loop of the wide ISAs.
// Included inside an ISA namespace (see fake_quant_*.cpp); needs <cmath> and c10 Half/BFloat16 included before.
// min/max follow the x86 rule (return the second operand when either is NaN) so that every ISA
// propagates NaN through the clamp identically.
#pragma once

struct ScalarVec {
  static constexpr int kWidth = 1;
  using Reg = float;
  using Mask = bool;

  static Reg set1(float v) { return v; }
  static Reg zero() { return 0.f; }
  static Reg load(const float* p) { return *p; }
  static Reg load(const c10::Half* p) { return static_cast<float>(*p); }
  static Reg load(const c10::BFloat16* p) { return static_cast<float>(*p); }
  template <class T>
  static void store(T* p, Reg v) {
    *p = static_cast<T>(v);  // c10 conversions round to nearest even, like the vector stores
  }

  static Reg add(Reg a, Reg b) { return a + b; }
  static Reg sub(Reg a, Reg b) { return a - b; }
  static Reg mul(Reg a, Reg b) { return a * b; }
  static Reg div(Reg a, Reg b) { return a / b; }
  static Reg round(Reg v) { return std::nearbyint(v); }  // default FP environment: half to even
  static Reg max(Reg a, Reg b) { return a > b ? a : b; }
  static Reg min(Reg a, Reg b) { return a < b ? a : b; }

  static Mask ge(Reg a, Reg b) { return a >= b; }
  static Mask le(Reg a, Reg b) { return a <= b; }
  static Mask lt(Reg a, Reg b) { return a < b; }
  static Mask both(Mask a, Mask b) { return a && b; }
  static Reg select(Mask m, Reg a, Reg b) { return m ? a : b; }

  static double sum(Reg v) { return v; }
};
