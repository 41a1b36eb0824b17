#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace lowbit::cpu {
namespace {

Isa parse(const std::string& name) {
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "scalar") return Isa::kScalar;
  TORCH_CHECK_VALUE(false, "cpu isa name must be one of avx512, avx2, scalar; got '", name, "'");
}

Isa probe() {
  __builtin_cpu_init();
  // AVX-512 kernels use F (vectors), BW (16-bit packing for fp16/bf16), VL and DQ.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
  return Isa::kScalar;
}

std::atomic<int>& active() {
  static std::atomic<int> isa{static_cast<int>(detected_isa())};
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Isa detected_isa() {
  static const Isa isa = [] {
    Isa best = probe();
    if (const char* cap = std::getenv("LOWBIT_CPU_ISA")) {
      Isa wanted = parse(cap);
      if (static_cast<int>(wanted) < static_cast<int>(best)) best = wanted;
    }
    return best;
  }();
  return isa;
}

Isa active_isa() { return static_cast<Isa>(active().load()); }

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> names;
  for (int i = static_cast<int>(detected_isa()); i >= 0; --i) names.emplace_back(isa_name(static_cast<Isa>(i)));
  return names;
}

void set_active_isa(const std::string& name) {
  Isa wanted = parse(name);
  TORCH_CHECK_VALUE(static_cast<int>(wanted) <= static_cast<int>(detected_isa()), "cpu isa '", name,
                    "' is not supported by this CPU (best: ", isa_name(detected_isa()), ")");
  active().store(static_cast<int>(wanted));
}

bool cpu_has_avx512_vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    const char* off = std::getenv("LOWBIT_CPU_VNNI");
    if (off && std::string(off) == "0") return false;
    return detected_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512vnni");
  }();
  return has;
}

}  // namespace lowbit::cpu
