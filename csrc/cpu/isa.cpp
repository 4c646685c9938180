// The instruction-set choice of the CPU kernels (isa.h) and the ops that
// report and set it (escape_fast.ops.cpu_isa / set_cpu_isa).
#include "isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>

namespace escape_fast::cpu_isa {
namespace {

constexpr const char* kNames[] = {"baseline", "avx2", "avx512"};

Level detect() {
#if ESCAPE_FAST_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return kAvx2;
#endif
  return kBaseline;
}

Level initial() {
  const char* forced = std::getenv("ESCAPE_FAST_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return best_supported();
  const Level level = parse(forced);
  TORCH_CHECK(level <= best_supported(), "ESCAPE_FAST_CPU_ISA=", forced, ": this CPU runs at most ",
              name(best_supported()));
  return level;
}

std::atomic<int>& chosen() {
  static std::atomic<int> level{static_cast<int>(initial())};
  return level;
}

}  // namespace

Level best_supported() {
  static const Level level = detect();
  return level;
}

Level current() { return static_cast<Level>(chosen().load(std::memory_order_relaxed)); }

void set(Level level) {
  TORCH_CHECK(level <= best_supported(), "CPU ISA ", name(level), ": this CPU runs at most ",
              name(best_supported()));
  chosen().store(static_cast<int>(level), std::memory_order_relaxed);
}

const char* name(Level level) { return kNames[static_cast<int>(level)]; }

Level parse(const std::string& text) {
  for (int i = 0; i <= kAvx512; ++i) {
    if (text == kNames[i]) return static_cast<Level>(i);
  }
  TORCH_CHECK(false, "unknown CPU ISA '", text, "'; choose baseline, avx2 or avx512");
}

std::vector<std::string> supported() {
  std::vector<std::string> out;
  for (int i = 0; i <= best_supported(); ++i) out.emplace_back(kNames[i]);
  return out;
}

}  // namespace escape_fast::cpu_isa

TORCH_LIBRARY_FRAGMENT(escape_fast, m) {
  m.def("cpu_isa() -> str", []() -> std::string { return escape_fast::cpu_isa::name(escape_fast::cpu_isa::current()); });
  m.def("cpu_isas() -> str[]", []() { return escape_fast::cpu_isa::supported(); });
  // returns the previous choice
  m.def("set_cpu_isa(str name) -> str", [](const std::string& name) -> std::string {
    const auto previous = escape_fast::cpu_isa::current();
    escape_fast::cpu_isa::set(escape_fast::cpu_isa::parse(name));
    return escape_fast::cpu_isa::name(previous);
  });
}
