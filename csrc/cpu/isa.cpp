#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

#if defined(__linux__) && defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

bool cpu_has_amx_int8() {
  static const bool has = [] {
#if defined(__linux__) && defined(__x86_64__)
    const char* off = std::getenv("LOWBIT_CPU_AMX");
    if ((off && std::string(off) == "0") || !cpu_has_avx512_vnni()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, int8 = (d >> 25) & 1;
    if (!tile || !int8) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return has;
}

std::vector<std::string> cpu_features() {
  std::vector<std::string> names;
  if (cpu_has_avx512_vnni()) names.emplace_back("avx512_vnni");
  if (cpu_has_amx_int8()) names.emplace_back("amx_int8");
  return names;
}

namespace {
std::atomic<int64_t> packed_calls[kPackedPaths];
}  // namespace

const char* packed_path_name(PackedPath path) {
  switch (path) {
    case PackedPath::kPanel: return "panel";
    case PackedPath::kAmx: return "amx";
    case PackedPath::kVnni: return "vnni";
    case PackedPath::kAvx2: return "avx2";
    default: return "scalar";
  }
}

void count_packed_path(PackedPath path) {
  packed_calls[static_cast<int>(path)].fetch_add(1, std::memory_order_relaxed);
}

std::vector<int64_t> packed_path_counts() {
  std::vector<int64_t> counts;
  for (const auto& c : packed_calls) counts.push_back(c.load(std::memory_order_relaxed));
  return counts;
}

}  // namespace lowbit::cpu
