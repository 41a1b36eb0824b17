// Every span kernel (fused LSQ, multi-branch) compiled for the scalar code path (chosen at run time by cpu/isa.h).
#include <cmath>
#include <utility>

#include "cpu/fake_quant.h"
#include "cpu/multi_branch_fake_quant.h"

#pragma GCC push_options
// no target pragma: plain C++ for any x86-64 (or other) CPU

namespace lowbit::cpu::scalar {

#include "cpu/simd_scalar.h"
using Vec = ScalarVec;
#include "cpu/fake_quant_kernels.h"
#include "cpu/multi_branch_fake_quant_kernels.h"

}  // namespace lowbit::cpu::scalar

#pragma GCC pop_options
