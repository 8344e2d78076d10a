// What an image file declares, read from its header before any decoder allocates for it
// (private to libconcord). Every size is computed with overflow-checked arithmetic and every
// function throws concord::Error naming the file: image_io.cpp checks these declarations against
// the file and the configured ceiling, so a few bytes claiming gigabytes never reach a decoder.
#pragma once

#include <concord/checked.h>
#include <concord/error.h>

#include <cstdint>
#include <string>

namespace concord::detail {

// Size of a regular file; throws naming it when it is missing or not a regular file (a device
// such as /dev/zero, a FIFO, a folder).
uint64_t regular_file_size(const std::string& path, const std::string& what);

// PNG, JPEG, BMP or TIFF, recognised by content (OpenCV decodes by content, not by extension).
struct RasterHeader {
  const char* format = "";
  uint64_t width = 0, height = 0;
  uint64_t channels = 1;    // as OpenCV's IMREAD_UNCHANGED will return them (upper bound)
  uint64_t data_bytes = 0;  // uncompressed pixel bytes the file must hold (BMP), else 0
};
RasterHeader read_raster_header(const std::string& path);

// Counts float32 or float64 values whose exponent bits are all ones (NaN, +-Inf) among the
// bytes [begin, end) of a stream fed in consecutive pieces (pieces may split a value).
class NonFiniteCounter {
 public:
  NonFiniteCounter(uint64_t begin, uint64_t end, int width, bool swap)
      : begin_(begin), end_(end), width_(width), swap_(swap) {}
  void feed(const uint8_t* p, size_t n);
  uint64_t count() const { return count_; }

 private:
  void check(const uint8_t* v);
  uint64_t begin_, end_;
  int width_;
  bool swap_;
  uint64_t pos_ = 0, count_ = 0;
  uint8_t carry_[8] = {};
  int ncarry_ = 0;
};

// Feeds bytes [offset, offset + length) of a file to `counter` (positions relative to offset).
void feed_file(const std::string& path, uint64_t offset, uint64_t length,
               NonFiniteCounter& counter);

// Decompressed length of the zlib or gzip stream (concatenated gzip members included) that
// starts at `offset` in `path`, counted in a small buffer: counting stops as soon as more than
// `cap` bytes came out (then over_cap is true and bytes == cap + 1). Corrupt data throws.
struct InflatedSize {
  uint64_t bytes = 0;
  bool over_cap = false;
};
// The decompressed bytes also go to `counter` when given.
InflatedSize inflated_size(const std::string& path, uint64_t offset, uint64_t cap,
                           NonFiniteCounter* counter = nullptr);

// A DICOM file's elements walked without decoding them: every declared value length must fit
// in the file (GDCM allocates each value at its declared length and pads a short pixel data
// element with zeros), and native pixel data must be as long as its geometry says.
struct DicomGeometry {
  uint64_t rows = 0, columns = 0, frames = 1, samples = 1, bits_allocated = 0;
  bool encapsulated = false;  // compressed pixel data (fragments)
  // Text of the top-level SeriesInstanceUID, ImagePositionPatient, ImageOrientationPatient and
  // InstanceNumber (empty when absent), to group and order a series' files.
  std::string series_uid, position, orientation, instance;
};
DicomGeometry check_dicom_file(const std::string& path);

}  // namespace concord::detail
