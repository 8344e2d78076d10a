// One image reader (core/src/image_io.cpp, through ITK or OpenCV): built once per format with
// FUZZ_EXTENSION set to the file extension read_image dispatches on.
#include <concord/image_io.h>

#include "../fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string file = concord::fuzz::write_input(data, size, FUZZ_EXTENSION);
  concord::fuzz::run([&] {
    concord::Image im = concord::read_image(file);
    volatile float sink = im.data.empty() ? 0.f : im.data.back();
    (void)sink;
  });
  return 0;
}
