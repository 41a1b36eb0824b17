// The binding functions of lowbit._C: each op's file defines its own (next to its kernel), ops.cpp calls them.
// Every kernel function has the same name and arguments in lowbit._C.cpu and lowbit._C.cuda.
#pragma once

#include <pybind11/pybind11.h>

namespace lowbit {
// Every kernel function is bound with this: the GIL is released while it runs, as the torch dispatcher does.
using ReleaseGil = pybind11::call_guard<pybind11::gil_scoped_release>;
}  // namespace lowbit

namespace lowbit::cpu {
void bind_fake_quant(pybind11::module_& m);               // cpu/fake_quant.cpp
void bind_multi_branch_fake_quant(pybind11::module_& m);  // cpu/multi_branch_fake_quant.cpp
void bind_packed_linear(pybind11::module_& m);            // cpu/packed_linear.cpp (packed_linear, packed_gemm)
void bind_packed_depthwise(pybind11::module_& m);         // cpu/packed_depthwise.cpp (+ quantize_codes)
}  // namespace lowbit::cpu

namespace lowbit::cuda {
void bind_fake_quant(pybind11::module_& m);               // cuda/fake_quant.cu
void bind_multi_branch_fake_quant(pybind11::module_& m);  // cuda/multi_branch_fake_quant.cu
void bind_packed_linear(pybind11::module_& m);            // cuda/packed_linear.cu
}  // namespace lowbit::cuda
