// Small helpers shared by the CPU drivers.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "checks.h"  // check_values, used by every driver

// The three dtypes lowbit's kernels take (float32, float16, bfloat16); `scalar_t` inside the body.
#define LOWBIT_DISPATCH_FLOAT(TYPE, NAME, ...)                                                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                           \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                        \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace lowbit::cpu {

// Typed pointers for c10::Half / c10::BFloat16 / float tensors.
template <class T>
const T* data(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <class T>
T* mutable_data(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

}  // namespace lowbit::cpu
