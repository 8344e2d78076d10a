// What an image file declares, read from its header before any decoder allocates for it
// (private to libconcord). Every size is computed with overflow-checked arithmetic and every
// function throws concord::Error naming the file: image_io.cpp checks these declarations against
// the file and the configured ceiling, so a few bytes claiming gigabytes never reach a decoder.
#pragma once

#include <concord/error.h>

#include <cstdint>
#include <string>

namespace concord::detail {

// TODO(lead): hard/wire publishes the same helpers in concord/checked.h; use those once merged.
uint64_t checked_mul(uint64_t a, uint64_t b, const std::string& what);
uint64_t checked_add(uint64_t a, uint64_t b, const std::string& what);

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

// Decompressed length of the zlib or gzip stream (concatenated gzip members included) that
// starts at `offset` in `path`, counted in a small buffer: counting stops as soon as more than
// `cap` bytes came out (then over_cap is true and bytes == cap + 1). Corrupt data throws.
struct InflatedSize {
  uint64_t bytes = 0;
  bool over_cap = false;
};
InflatedSize inflated_size(const std::string& path, uint64_t offset, uint64_t cap);

// A DICOM file's elements walked without decoding them: every declared value length must fit
// in the file (GDCM allocates each value at its declared length and pads a short pixel data
// element with zeros), and native pixel data must be as long as its geometry says.
struct DicomGeometry {
  uint64_t rows = 0, columns = 0, frames = 1, samples = 1, bits_allocated = 0;
  bool encapsulated = false;                                   // compressed pixel data (fragments)
  uint64_t voxels() const { return rows * columns * frames; }  // checked by check_dicom_file
};
DicomGeometry check_dicom_file(const std::string& path);

}  // namespace concord::detail
