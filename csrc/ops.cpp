// Schemas of the raw kernels in the lowbit_C namespace, and the Python module entry point of lowbit._C.
//
// These ops take tensors that the public Python ops (lowbit/ops.py) already checked and made contiguous;
// each device registers its kernels with TORCH_LIBRARY_IMPL(lowbit_C, <CPU|CUDA>, m) in its own file.
// Conventions shared by every kernel:
//   x, grad   contiguous float32 / float16 / bfloat16, same shape; viewed as (outer, C, inner)
//   step      contiguous float32 (C,); C == 1 means per-tensor; channel of flat index i is (i / inner) % C
//   offset    None or contiguous float32 (C,)
//   qmin/qmax the integer clamp range (Qn, Qp)
//   outputs   y / dx in x's dtype; dstep, doffset float32 (C,), already multiplied by grad_scale
#include <Python.h>
#include <torch/library.h>

#include "cpu/isa.h"

TORCH_LIBRARY(lowbit_C, m) {
  m.def("fake_quant_forward(Tensor x, Tensor step, Tensor? offset, int qmin, int qmax, int inner) -> Tensor");
  m.def(
      "fake_quant_backward(Tensor grad, Tensor x, Tensor step, Tensor? offset, int qmin, int qmax, int inner, "
      "float grad_scale) -> (Tensor, Tensor, Tensor)");
  // Multi-branch quantizer (SPEC section 2): per-tensor steps (B,), probs (B,) float32, one clamp range per branch.
  // dsteps comes back multiplied by probs and grad_scale; dprobs is the raw sum of g * Q_i.
  m.def("multi_branch_forward(Tensor x, Tensor steps, Tensor probs, int[] qmin, int[] qmax) -> Tensor");
  m.def(
      "multi_branch_backward(Tensor grad, Tensor x, Tensor steps, Tensor probs, int[] qmin, int[] qmax, "
      "float[] grad_scale) -> (Tensor, Tensor, Tensor)");
  // Packed inference GEMM (SPEC section 4). x (M, K) float32/float16/bfloat16 contiguous; packed_w (N, packed K)
  // uint8 canonical layout of signed codes at w_bits; w_scale (N,) float32; x_step (1,) float32; bias None or (N,)
  // float32. x is quantized with round-half-even of float32 x / x_step, clamped to [qmin, qmax]; a row holding a
  // NaN gives a NaN output row. y = float32(acc) * float32(x_step * w_scale[n]) + bias[n], in x's dtype.
  m.def(
      "packed_linear(Tensor x, Tensor packed_w, Tensor w_scale, int w_bits, Tensor x_step, int qmin, int qmax, "
      "Tensor? bias) -> Tensor");
  // The integer data path (issue 17; cpu/packed_epilogue.h): x float (quantized at x_step into [qmin, qmax]) or
  // uint8/int8 codes; y = clamp(float32(acc) * scale[n] + bias[n], lo, hi), emitted as float32 (x's dtype for a
  // float x) or, when out_step > 0, as codes clamp(rint(y / out_step), out_qmin, out_qmax) (uint8 if out_qmin >= 0).
  m.def(
      "packed_gemm(Tensor x, Tensor packed_w, Tensor scale, Tensor? bias, int w_bits, float x_step, int qmin, "
      "int qmax, float lo, float hi, float out_step, int out_qmin, int out_qmax) -> Tensor");
  // Depthwise conv on channels-last codes x (B, H, W, C) with int8 weight codes w (KH * KW, C), same epilogue.
  m.def(
      "packed_depthwise(Tensor x, Tensor w, Tensor scale, Tensor? bias, int[] kernel, int[] stride, int[] padding, "
      "int[] dilation, float lo, float hi, float out_step, int out_qmin, int out_qmax) -> Tensor");
  // Float x to activation codes clamp(rint(x / step), qmin, qmax), uint8 if qmin >= 0 else int8; NaN: ValueError.
  m.def("quantize_codes(Tensor x, float step, int qmin, int qmax) -> Tensor");
  // Which CPU code path runs (avx512 / avx2 / scalar); set_cpu_isa exists for tests and benchmarks only.
  m.def("cpu_isa() -> str", [] { return std::string(lowbit::cpu::isa_name(lowbit::cpu::active_isa())); });
  m.def("cpu_isa_supported() -> str[]", [] { return lowbit::cpu::supported_isa_names(); });
  m.def("set_cpu_isa(str name) -> ()", [](const std::string& name) { lowbit::cpu::set_active_isa(name); });
  // Debug queries for tests: the optional CPU features in use (avx512_vnni, amx_int8) and how many packed_linear
  // calls each path (scalar, avx2, vnni, amx) has run in this process.
  m.def("cpu_features() -> str[]", [] { return lowbit::cpu::cpu_features(); });
  m.def("packed_linear_path_counts() -> Dict(str, int)", [] {
    c10::Dict<std::string, int64_t> counts;
    const std::vector<int64_t> calls = lowbit::cpu::packed_path_counts();
    for (int i = 0; i < lowbit::cpu::kPackedPaths; ++i) {
      counts.insert(lowbit::cpu::packed_path_name(static_cast<lowbit::cpu::PackedPath>(i)), calls[i]);
    }
    return counts;
  });
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lowbit compiled kernels (ops in torch.ops.lowbit_C)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
