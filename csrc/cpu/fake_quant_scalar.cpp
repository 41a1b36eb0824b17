// The fused LSQ span kernels compiled for the scalar code path (chosen at run time by cpu/isa.h).

#include <cmath>

#include "cpu/fake_quant.h"

#pragma GCC push_options
// no target pragma: plain C++ for any x86-64 (or other) CPU

namespace lowbit::cpu::scalar {

#include "cpu/simd_scalar.h"

using Vec = ScalarVec;
#include "cpu/fake_quant_kernels.h"

}  // namespace lowbit::cpu::scalar

#pragma GCC pop_options
