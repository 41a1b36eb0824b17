// Run-time choice of the CPU instruction set.
//
// Kernels are compiled once per ISA with GCC target pragmas (see simd_*.h) and picked here by CPUID, so one
// binary is fast on AVX-512 machines and still runs on AVX2-only or older CPUs. No -march=native.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lowbit::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
// The best ISA this CPU supports (LOWBIT_CPU_ISA=scalar|avx2|avx512 in the environment caps it).
Isa detected_isa();
// The ISA the kernels use now: detected_isa() unless set_active_isa chose a lower one.
Isa active_isa();
std::vector<std::string> supported_isa_names();
// For tests and benchmarks: run the kernels with a lower ISA. Rejects names the CPU cannot run.
void set_active_isa(const std::string& name);
// AVX-512 VNNI (vpdpbusd), used by the avx512 level of the packed GEMM when present (not part of the ISA levels:
// an AVX-512 CPU without it runs that op's AVX2 tiles). LOWBIT_CPU_VNNI=0 turns it off.
bool cpu_has_avx512_vnni();
// AMX-INT8 usable: CPU support (CPUID), VNNI present, and Linux granted this process the tile data state
// (arch_prctl ARCH_REQ_XCOMP_PERM). LOWBIT_CPU_AMX=0 turns it off.
bool cpu_has_amx_int8();
// The optional features above that the kernels use now, after the LOWBIT_CPU_* switches: "avx512_vnni",
// "amx_int8" (debug query for tests: which path the avx512 level of packed_linear takes).
std::vector<std::string> cpu_features();

// Which kernels a packed_linear / packed_gemm call ran: the tiles of one ISA, the AMX GEMM driver (32 x 32 blocks
// on AMX tiles, the edges on VNNI tiles), or packed_gemm's panel kernel (packed_panel.h). The driver counts every call, so a test can prove that a path ran rather than
// only that its results agree with another path's.
enum class PackedPath { kScalar = 0, kAvx2 = 1, kVnni = 2, kAmx = 3, kPanel = 4 };
constexpr int kPackedPaths = 5;
const char* packed_path_name(PackedPath path);
void count_packed_path(PackedPath path);
// Calls per path since the process started, indexed by PackedPath.
std::vector<int64_t> packed_path_counts();

}  // namespace lowbit::cpu
