// The Channel message decoder (core/src/message.cpp): bytes from a peer.
#include <concord/message.h>

#include <cstring>

#include "../fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto buf = std::make_shared<concord::Buffer>(size);
  if (size) std::memcpy(buf->data(), data, size);
  concord::fuzz::run([&] {
    concord::Message m = concord::decode(buf);
    // Touch what a receiver touches: every array's bytes.
    volatile uint8_t sink = 0;
    for (const auto& [name, a] : m.arrays) {
      concord::fuzz::check_shape(name, a);
      if (a.nbytes()) sink = sink + static_cast<const uint8_t*>(a.raw())[a.nbytes() - 1];
    }
  });
  return 0;
}
