// The public ops' value rules (SPEC section 6), checked by every C++/CUDA launcher before its kernel runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace lowbit {

// `name` must be finite (and > 0 when `positive`); raises ValueError in Python (TORCH_CHECK_VALUE). On the CPU a
// loop over C floats is free; a CUDA tensor is copied to the host first, a device synchronisation that the value
// rules need whatever checks them (the Python check it replaces synchronised the same way).
inline void check_values(const char* name, const at::Tensor& t, bool positive) {
  const at::Tensor host = t.is_cpu() ? t.contiguous() : t.cpu().contiguous();
  const float* p = host.const_data_ptr<float>();
  for (int64_t i = 0; i < host.numel(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(p[i]) && (!positive || p[i] > 0), name, " must be ",
                      positive ? "positive and " : "", "finite, got ", p[i], " at index ", i);
  }
}

}  // namespace lowbit
