// The statistics-file reader (core/src/stats_file.cpp): `harmonize apply --stats FILE`.
#include <concord/harmonizer.h>
#include <concord/message.h>

#include "../fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string file = concord::fuzz::write_input(data, size, ".stats");
  concord::fuzz::run([&] {
    std::string method;
    concord::Stats s = concord::load_stats(file, &method);
    volatile uint8_t sink = 0;
    for (const auto& [name, a] : s.arrays) {
      concord::fuzz::check_shape(name, a);
      if (a.nbytes()) sink = sink + static_cast<const uint8_t*>(a.raw())[a.nbytes() - 1];
    }
  });
  return 0;
}
