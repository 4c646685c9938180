// Runtime choice of the instruction set of the CPU kernels, as ATen's DispatchStub does.
//
// The extension is compiled for baseline x86-64 (SSE2) so that one build runs
// on every x86-64 CPU. Each hot loop is written once, as an always-inline
// body in plain C++ that GCC vectorizes, and ESCAPE_FAST_ISA_VARIANTS compiles
// it three times: for the baseline, for x86-64-v3 (AVX2 + FMA) and for
// x86-64-v4 (AVX-512 F/BW/CD/DQ/VL). The variant run is the one
// cpu_isa::current() names: the best the CPU has, or the one the environment
// variable ESCAPE_FAST_CPU_ISA (baseline | avx2 | avx512) forces at load, or
// set_cpu_isa (for tests and benchmarks). The build compiles in ISO C++
// mode, where GCC does not contract a * b + c into an FMA and does not
// reorder floating-point sums, so every variant gives the same bits.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace escape_fast::cpu_isa {

enum Level : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

Level best_supported();                 // what this CPU can run
Level current();                        // what the kernels run now
void set(Level level);                  // refuses a level the CPU lacks
const char* name(Level level);          // "baseline", "avx2", "avx512"
Level parse(const std::string& name);   // the inverse (an error for anything else)
std::vector<std::string> supported();   // the names of every level this CPU can run, lowest first

}  // namespace escape_fast::cpu_isa

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ESCAPE_FAST_X86_VARIANTS 1
#define ESCAPE_FAST_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define ESCAPE_FAST_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define ESCAPE_FAST_X86_VARIANTS 0
#endif

// Helpers that a variant's body calls are inlined into it, so that each
// variant compiles them for its own ISA.
#define ESCAPE_FAST_INLINE __attribute__((always_inline)) inline

// For `void NAME##_body PARAMS` (an ESCAPE_FAST_INLINE function), defines
// `void NAME PARAMS`, which runs the body compiled for cpu_isa::current().
// ARGS are the parameter names in parentheses. Overloads (one per dtype)
// each take their own invocation.
#if ESCAPE_FAST_X86_VARIANTS
#define ESCAPE_FAST_ISA_VARIANTS(NAME, PARAMS, ARGS)                   \
  ESCAPE_FAST_TARGET_AVX512 void NAME##_avx512 PARAMS { NAME##_body ARGS; } \
  ESCAPE_FAST_TARGET_AVX2 void NAME##_avx2 PARAMS { NAME##_body ARGS; }     \
  void NAME##_baseline PARAMS { NAME##_body ARGS; }                         \
  void NAME PARAMS {                                                        \
    switch (::escape_fast::cpu_isa::current()) {                            \
      case ::escape_fast::cpu_isa::kAvx512: NAME##_avx512 ARGS; return;     \
      case ::escape_fast::cpu_isa::kAvx2: NAME##_avx2 ARGS; return;         \
      default: NAME##_baseline ARGS; return;                                \
    }                                                                       \
  }
#else
#define ESCAPE_FAST_ISA_VARIANTS(NAME, PARAMS, ARGS) \
  void NAME PARAMS { NAME##_body ARGS; }
#endif
