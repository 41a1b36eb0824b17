// The Python module lowbit._C: plain functions (pybind11), one submodule per device, no op schemas of its own.
//
//   lowbit._C.cpu    fake_quant_forward/_backward, multi_branch_fake_quant_forward/_backward, packed_linear,
//                    packed_gemm, packed_depthwise, quantize_codes, and the CPU queries isa, supported_isas, set_isa,
//                    features, packed_path_counts
//   lowbit._C.cuda   the same five training/inference kernels for CUDA tensors; None when built without CUDA
//
// The one schema of each op is the public torch.library op in lowbit/ops/<op>.py; its per-device Python kernel
// calls these functions through lowbit.backends (the records in lowbit/backends/{cpu,cuda}.py). They take tensors the
// public op already checked (types, shapes, bits, devices) and made contiguous, and check the values themselves
// (step > 0 and finite, offset/probs finite): TORCH_CHECK_VALUE raises ValueError in Python. Conventions shared by
// the fake-quant kernels:
//   x, grad   contiguous float32 / float16 / bfloat16, same shape; viewed as (outer, C, inner)
//   step      contiguous float32 (C,); C == 1 means per-tensor; channel of flat index i is (i / inner) % C
//   offset    None or contiguous float32 (C,)
//   qmin/qmax the integer clamp range (Qn, Qp)
//   outputs   y / dx in x's dtype; dstep, doffset float32 (C,), already multiplied by grad_scale
#include <torch/extension.h>

#include <string>

#include "bind.h"
#include "cpu/isa.h"

namespace {

// Which CPU code path runs (avx512 / avx2 / scalar); set_isa exists for tests and benchmarks only. features and
// packed_path_counts are debug queries for tests: the optional CPU features in use (avx512_vnni, amx_int8) and how
// many packed GEMM calls each path (scalar, avx2, vnni, amx, panel) has run in this process.
void bind_cpu_queries(pybind11::module_& m) {
  namespace cpu = lowbit::cpu;
  m.def("isa", [] { return std::string(cpu::isa_name(cpu::active_isa())); });
  m.def("supported_isas", &cpu::supported_isa_names);
  m.def("set_isa", &cpu::set_active_isa, pybind11::arg("name"));
  m.def("features", &cpu::cpu_features);
  m.def("packed_path_counts", [] {
    pybind11::dict counts;  // in path order: scalar, avx2, vnni, amx, panel
    const std::vector<int64_t> calls = cpu::packed_path_counts();
    for (int i = 0; i < cpu::kPackedPaths; ++i) {
      counts[cpu::packed_path_name(static_cast<cpu::PackedPath>(i))] = calls[i];
    }
    return counts;
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowbit compiled kernels: lowbit._C.cpu and lowbit._C.cuda (None without CUDA)";
  pybind11::module_ cpu = m.def_submodule("cpu", "C++ CPU kernels (csrc/cpu), ISA chosen at run time");
  lowbit::cpu::bind_fake_quant(cpu);
  lowbit::cpu::bind_multi_branch_fake_quant(cpu);
  lowbit::cpu::bind_packed_linear(cpu);
  lowbit::cpu::bind_packed_depthwise(cpu);
  bind_cpu_queries(cpu);
#if LOWBIT_WITH_CUDA
  pybind11::module_ cuda = m.def_submodule("cuda", "CUDA kernels (csrc/cuda)");
  lowbit::cuda::bind_fake_quant(cuda);
  lowbit::cuda::bind_multi_branch_fake_quant(cuda);
  lowbit::cuda::bind_packed_linear(cuda);
#else
  m.attr("cuda") = pybind11::none();  // built without a CUDA toolkit or with a CPU-only torch
#endif
}
