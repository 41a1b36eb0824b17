// Every span kernel (fused LSQ, multi-branch) compiled for the avx512 code path (chosen at run time by cpu/isa.h).
#include <immintrin.h>

#include <cmath>
#include <utility>

#include "cpu/fake_quant.h"
#include "cpu/multi_branch_fake_quant.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
// gcc 12 false positive (GCC bug 105593): its own _mm512_* intrinsics pass _mm512_undefined_*()
// (`__m512 __Y = __Y;`) as the unused merge source of an all-ones mask, and -Wmaybe-uninitialized flags that
// self-initialisation hundreds of times once the span kernels are inlined. Scoped to these kernels.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace lowbit::cpu::avx512 {

#include "cpu/simd_scalar.h"
#include "cpu/simd_avx512.h"
using Vec = Avx512Vec;
#include "cpu/fake_quant_kernels.h"
#include "cpu/multi_branch_fake_quant_kernels.h"

}  // namespace lowbit::cpu::avx512

#pragma GCC diagnostic pop
#pragma GCC pop_options
