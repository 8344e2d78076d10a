// Coverage for libFuzzer from g++-compiled code.
//
// Debian's ITK headers do not compile with clang, so the code under test is built with g++
// -fsanitize-coverage=trace-pc,trace-cmp. g++ calls __sanitizer_cov_trace_pc() at every basic
// block; clang-14's libFuzzer no longer reads that callback (its own definition only prints
// "no longer supported" and is weakened by tests/fuzz/CMakeLists.txt), but it does read counters
// in the "__libfuzzer_extra_counters" section. Here each (previous block, block) pair bumps one
// such counter, as AFL does, so libFuzzer sees edge coverage. The trace-cmp callbacks for
// integers are libFuzzer's own (its CMP-guided mutations work as with clang); g++ also emits
// float and double comparisons, which libFuzzer does not know: they are ignored here.
// This file must not be built with -fsanitize-coverage (it would call itself).
#include <cstdint>

namespace {
constexpr uintptr_t kCounters = 1u << 16;
__attribute__((section("__libfuzzer_extra_counters"), used)) uint8_t counters[kCounters];
__thread uintptr_t previous;
}  // namespace

extern "C" {
void __sanitizer_cov_trace_pc() {
  const uintptr_t pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  const uintptr_t block = (pc ^ (pc >> 16)) & (kCounters - 1);
  ++counters[block ^ previous];
  previous = block >> 1;
}
void __sanitizer_cov_trace_cmpf(float, float) {}
void __sanitizer_cov_trace_cmpd(double, double) {}
}
