// Every span kernel (fused LSQ, multi-branch) compiled for the avx2 code path (chosen at run time by cpu/isa.h).
#include <immintrin.h>

#include <cmath>
#include <utility>

#include "cpu/fake_quant.h"
#include "cpu/multi_branch_fake_quant.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace lowbit::cpu::avx2 {

#include "cpu/simd_scalar.h"
#include "cpu/simd_avx2.h"
using Vec = Avx2Vec;
#include "cpu/fake_quant_kernels.h"
#include "cpu/multi_branch_fake_quant_kernels.h"

}  // namespace lowbit::cpu::avx2

#pragma GCC pop_options
