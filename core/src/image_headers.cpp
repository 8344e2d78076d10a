// Header sniffing for image_io.cpp: see image_headers.h.
#include "image_headers.h"

#include <zlib.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <vector>

namespace concord::detail {
namespace fs = std::filesystem;

uint64_t regular_file_size(const std::string& path, const std::string& what) {
  std::error_code ec;
  const auto st = fs::status(path, ec);
  if (ec) throw Error(what + ": cannot access " + path + ": " + ec.message());
  if (!fs::is_regular_file(st)) throw Error(what + ": " + path + " is not a regular file");
  const uint64_t n = fs::file_size(path, ec);
  if (ec) throw Error(what + ": cannot access " + path + ": " + ec.message());
  return n;
}

namespace {

uint32_t be32(const uint8_t* p) {
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3];
}

// Reads exactly n bytes at `offset`, or returns false.
bool read_at(std::ifstream& in, uint64_t offset, void* out, size_t n) {
  in.clear();
  in.seekg(std::streamoff(offset));
  return bool(in.read(static_cast<char*>(out), std::streamsize(n)));
}

RasterHeader png_header(std::ifstream& in, const std::string& path) {
  uint8_t h[26];
  if (!read_at(in, 0, h, sizeof h) || std::memcmp(h + 12, "IHDR", 4) != 0)
    throw Error(path + ": PNG without an IHDR header (corrupt file)");
  RasterHeader r;
  r.format = "PNG";
  r.width = be32(h + 16);
  r.height = be32(h + 20);
  const int colour = h[25];
  r.channels = colour == 0 ? 1 : colour == 2 ? 3 : 4;  // palette and grey+alpha may gain alpha
  return r;
}

RasterHeader jpeg_header(std::ifstream& in, const std::string& path, uint64_t size) {
  uint64_t pos = 2;
  for (int segments = 0; segments < 100000; ++segments) {
    uint8_t m[2];
    if (!read_at(in, pos, m, 2)) break;
    if (m[0] != 0xFF) throw Error(path + ": JPEG marker expected at byte " + std::to_string(pos));
    if (m[1] == 0xFF) {  // fill byte
      ++pos;
      continue;
    }
    pos += 2;
    if (m[1] == 0x01 || (m[1] >= 0xD0 && m[1] <= 0xD7)) continue;  // no length
    if (m[1] == 0xD9 || m[1] == 0xDA) break;                       // end, or scan before a frame
    uint8_t seg[8];
    if (!read_at(in, pos, seg, 2)) break;
    const uint64_t len = uint64_t(seg[0]) << 8 | seg[1];
    if (len < 2) throw Error(path + ": corrupt JPEG segment length");
    const bool frame = m[1] >= 0xC0 && m[1] <= 0xCF && m[1] != 0xC4 && m[1] != 0xC8 && m[1] != 0xCC;
    if (frame) {
      if (len < 8 || !read_at(in, pos, seg, 8)) throw Error(path + ": truncated JPEG frame header");
      RasterHeader r;
      r.format = "JPEG";
      r.height = uint64_t(seg[3]) << 8 | seg[4];
      r.width = uint64_t(seg[5]) << 8 | seg[6];
      r.channels = seg[7] == 1 ? 1 : 3;
      return r;
    }
    pos += len;
    if (pos > size) break;
  }
  throw Error(path + ": JPEG without a frame header (truncated or corrupt file)");
}

RasterHeader bmp_header(std::ifstream& in, const std::string& path, uint64_t size) {
  uint8_t h[34] = {};
  if (!read_at(in, 0, h, 26)) throw Error(path + ": truncated BMP header");
  auto u16 = [&](int o) { return uint32_t(h[o] | h[o + 1] << 8); };
  auto u32 = [&](int o) { return u16(o) | u16(o + 2) << 16; };
  RasterHeader r;
  r.format = "BMP";
  const uint64_t data_offset = u32(10);
  uint32_t bpp, compression = 0;
  if (u32(14) == 12) {  // OS/2 core header
    r.width = u16(18);
    r.height = u16(20);
    bpp = u16(24);
  } else {
    if (!read_at(in, 0, h, sizeof h)) throw Error(path + ": truncated BMP header");
    const int32_t w = int32_t(u32(18)), hgt = int32_t(u32(22));  // negative height: top-down
    r.width = w < 0 ? 0 : uint64_t(w);
    r.height = hgt < 0 ? uint64_t(-int64_t(hgt)) : uint64_t(hgt);
    bpp = u16(28);
    compression = u32(30);
  }
  r.channels = bpp == 32 ? 4 : 3;
  if ((compression == 0 || compression == 3) && bpp > 0 && bpp <= 32) {  // uncompressed rows
    const std::string what = path + ": BMP size";
    const uint64_t row = checked_mul((checked_mul(r.width, bpp, what) + 31) / 32, 4, what);
    r.data_bytes = checked_add(checked_mul(row, r.height, what), data_offset, what);
    if (r.data_bytes > size)
      throw Error(path + ": file is truncated (" + std::to_string(size) +
                  " bytes, the BMP header " + "describes " + std::to_string(r.data_bytes) + ")");
  }
  return r;
}

RasterHeader tiff_header(std::ifstream& in, const std::string& path) {
  uint8_t h[16];
  if (!read_at(in, 0, h, 16)) throw Error(path + ": truncated TIFF header");
  const bool le = h[0] == 'I';
  auto get = [&](const uint8_t* p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= uint64_t(p[le ? i : n - 1 - i]) << (8 * i);
    return v;
  };
  const bool big = get(h + 2, 2) == 43;
  const uint64_t ifd = big ? get(h + 8, 8) : get(h + 4, 4);
  uint8_t cnt[8];
  if (!read_at(in, ifd, cnt, big ? 8 : 2)) throw Error(path + ": TIFF directory beyond the file");
  const uint64_t n = get(cnt, big ? 8 : 2), esize = big ? 20 : 12;
  if (n == 0 || n > 4096)
    throw Error(path + ": corrupt TIFF directory (" + std::to_string(n) + " entries)");
  std::vector<uint8_t> dir(n * esize);
  if (!read_at(in, ifd + (big ? 8 : 2), dir.data(), dir.size()))
    throw Error(path + ": truncated TIFF directory");
  RasterHeader r;
  r.format = "TIFF";
  for (uint64_t k = 0; k < n; ++k) {
    const uint8_t* e = dir.data() + k * esize;
    const uint64_t tag = get(e, 2), type = get(e + 2, 2);
    const uint8_t* value = e + (big ? 12 : 8);
    const uint64_t v = type == 3    ? get(value, 2)
                       : type == 4  ? get(value, 4)
                       : type == 16 ? get(value, 8)
                                    : 0;
    if (tag == 256) r.width = v;
    if (tag == 257) r.height = v;
    if (tag == 277) r.channels = std::max<uint64_t>(1, v);
  }
  return r;
}

}  // namespace

RasterHeader read_raster_header(const std::string& path) {
  const uint64_t size = regular_file_size(path, path);
  std::ifstream in(path, std::ios::binary);
  uint8_t m[8] = {};
  if (!in || !in.read(reinterpret_cast<char*>(m), 8))
    throw Error(path + ": too short to be an image (" + std::to_string(size) + " bytes)");
  RasterHeader r;
  if (std::memcmp(m, "\x89PNG\r\n\x1a\n", 8) == 0)
    r = png_header(in, path);
  else if (m[0] == 0xFF && m[1] == 0xD8)
    r = jpeg_header(in, path, size);
  else if (m[0] == 'B' && m[1] == 'M')
    r = bmp_header(in, path, size);
  else if ((m[0] == 'I' && m[1] == 'I' && (m[2] == 42 || m[2] == 43) && m[3] == 0) ||
           (m[0] == 'M' && m[1] == 'M' && m[2] == 0 && (m[3] == 42 || m[3] == 43)))
    r = tiff_header(in, path);
  else
    throw Error(path + ": not a PNG, JPEG, BMP or TIFF file (unknown content)");
  if (r.width == 0 || r.height == 0)
    throw Error(path + ": " + r.format + " header declares an empty image (" +
                std::to_string(r.width) + "x" + std::to_string(r.height) + ")");
  return r;
}

void NonFiniteCounter::check(const uint8_t* v) {
  if (width_ == 4) {
    uint32_t bits;
    std::memcpy(&bits, v, 4);
    if (swap_) bits = __builtin_bswap32(bits);
    count_ += (bits & 0x7f800000u) == 0x7f800000u;
  } else {
    uint64_t bits;
    std::memcpy(&bits, v, 8);
    if (swap_) bits = __builtin_bswap64(bits);
    count_ += (bits & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
  }
}

void NonFiniteCounter::feed(const uint8_t* p, size_t n) {
  const uint64_t start = pos_, stop = pos_ + n;
  pos_ = stop;
  const uint64_t a = std::max(start, begin_), b = std::min(stop, end_);
  if (a >= b) return;
  p += a - start;
  size_t len = size_t(b - a);
  while (len && ncarry_) {  // finish a value split across pieces
    carry_[ncarry_++] = *p++;
    --len;
    if (ncarry_ == width_) {
      check(carry_);
      ncarry_ = 0;
    }
  }
  const size_t whole = len / size_t(width_) * size_t(width_);
  for (size_t i = 0; i < whole; i += size_t(width_)) check(p + i);
  for (size_t i = whole; i < len; ++i) carry_[ncarry_++] = p[i];
}

void feed_file(const std::string& path, uint64_t offset, uint64_t length,
               NonFiniteCounter& counter) {
  std::ifstream in(path, std::ios::binary);
  if (!in || !in.seekg(std::streamoff(offset))) throw Error(path + ": cannot read");
  std::vector<char> buf(1 << 20);
  while (length > 0 && in) {
    in.read(buf.data(), std::streamsize(std::min<uint64_t>(length, buf.size())));
    const size_t got = size_t(in.gcount());
    if (got == 0) break;
    counter.feed(reinterpret_cast<const uint8_t*>(buf.data()), got);
    length -= got;
  }
}

InflatedSize inflated_size(const std::string& path, uint64_t offset, uint64_t cap,
                           NonFiniteCounter* counter) {
  std::ifstream in(path, std::ios::binary);
  if (!in || !in.seekg(std::streamoff(offset))) throw Error(path + ": cannot read");
  z_stream zs{};
  if (inflateInit2(&zs, 15 + 32) != Z_OK) throw Error(path + ": zlib init failed");
  std::unique_ptr<z_stream, int (*)(z_stream*)> guard(&zs, inflateEnd);
  std::vector<unsigned char> inbuf(1 << 16), outbuf(1 << 18);
  InflatedSize r;
  bool eof = false;
  for (;;) {
    if (zs.avail_in == 0 && !eof) {
      in.read(reinterpret_cast<char*>(inbuf.data()), std::streamsize(inbuf.size()));
      zs.next_in = inbuf.data();
      zs.avail_in = uInt(in.gcount());
      eof = in.gcount() == 0;
    }
    if (zs.avail_in == 0 && eof) return r;  // the stream stops short: caller reports truncation
    zs.next_out = outbuf.data();
    zs.avail_out = uInt(outbuf.size());
    const int rc = inflate(&zs, Z_NO_FLUSH);
    r.bytes += outbuf.size() - zs.avail_out;
    if (counter) counter->feed(outbuf.data(), outbuf.size() - zs.avail_out);
    if (r.bytes > cap) {
      r.bytes = cap + 1;
      r.over_cap = true;
      return r;
    }
    if (rc == Z_STREAM_END) {
      // Another gzip member follows (as gzread reads them); anything else is ignored, like gzread.
      if (zs.avail_in == 0 && !eof) {
        in.read(reinterpret_cast<char*>(inbuf.data()), std::streamsize(inbuf.size()));
        zs.next_in = inbuf.data();
        zs.avail_in = uInt(in.gcount());
        eof = in.gcount() == 0;
      }
      if (zs.avail_in >= 2 && zs.next_in[0] == 0x1f && zs.next_in[1] == 0x8b) {
        inflateReset(&zs);
        continue;
      }
      return r;
    }
    if (rc == Z_BUF_ERROR && zs.avail_in == 0) continue;  // needs more input
    if (rc != Z_OK)
      throw Error(path + ": corrupt compressed data (" + std::string(zs.msg ? zs.msg : "zlib") +
                  ")");
  }
}

// ---------------------------------------------------------------------------------------------
// DICOM

namespace {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    size_ = regular_file_size(path, path);
    if (size_ == 0) return;
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw Error(path + ": cannot open: " + std::strerror(errno));
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) throw Error(path + ": cannot map: " + std::strerror(errno));
    data_ = static_cast<const uint8_t*>(p);
  }
  ~MappedFile() {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

constexpr uint32_t kUndefined = 0xFFFFFFFF;

std::string hex_tag(uint32_t g, uint32_t e) {
  char s[16];
  std::snprintf(s, sizeof s, "(%04X,%04X)", g, e);
  return s;
}

struct DicomWalker {
  DicomWalker(const std::string& path, const uint8_t* d, uint64_t n) : path(path), d(d), n(n) {}
  const std::string& path;
  const uint8_t* d;
  uint64_t n;
  bool little = true, explicit_vr = true;
  DicomGeometry g;
  bool has_pixels = false;
  uint64_t pixel_length = 0;
  std::string frames_text, photometric;

  uint32_t u16(uint64_t p) const {
    return little ? uint32_t(d[p] | d[p + 1] << 8) : uint32_t(d[p] << 8 | d[p + 1]);
  }
  uint32_t u32(uint64_t p) const {
    return little ? u16(p) | u16(p + 2) << 16 : u16(p) << 16 | u16(p + 2);
  }
  [[noreturn]] void fail(const std::string& why) const { throw Error(path + ": " + why); }

  // The value representations of PS3.5 6.2; GDCM treats anything else as a sign of implicit VR
  // (and asserts when that happens in the file meta information).
  static bool valid_vr(const uint8_t* vr) {
    static const char* all[] = {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD",
                                "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW",
                                "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC",
                                "UI", "UL", "UN", "UR", "US", "UT", "UV"};
    for (const char* v : all)
      if (vr[0] == v[0] && vr[1] == v[1]) return true;
    return false;
  }

  static bool long_vr(const uint8_t* vr) {
    static const char* longs[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ",
                                  "SV", "UC", "UN", "UR", "UT", "UV"};
    for (const char* l : longs)
      if (vr[0] == l[0] && vr[1] == l[1]) return true;
    return false;
  }

  // Walks elements in [pos, end) at nesting `depth`; returns where it stopped: `end`, or just
  // after an item or sequence delimiter when `until_delimiter`.
  uint64_t walk(uint64_t pos, uint64_t end, int depth, bool until_delimiter) {
    if (depth > 32) fail("DICOM sequences nested deeper than 32 levels (corrupt file?)");
    while (pos < end) {
      if (end - pos < 8) {
        if (depth == 0 && !until_delimiter) return end;  // trailing padding bytes
        fail("truncated DICOM element at byte " + std::to_string(pos));
      }
      const uint32_t group = u16(pos), elem = u16(pos + 2);
      if (group == 0xFFFE) {  // item and delimiters carry a 4-byte length in any encoding
        const uint32_t len = u32(pos + 4);
        pos += 8;
        if (elem == 0xE00D || elem == 0xE0DD) {
          if (until_delimiter) return pos;
          continue;
        }
        pos = item(pos, end, len, depth);
        continue;
      }
      uint64_t len;
      bool sq = false;
      const uint8_t* vr = d + pos + 4;
      if (explicit_vr) {
        if (!valid_vr(vr))
          fail("corrupt DICOM element " + hex_tag(group, elem) + " at byte " + std::to_string(pos) +
               " (no value representation)");
        if (long_vr(vr)) {
          if (end - pos < 12) fail("truncated DICOM element at byte " + std::to_string(pos));
          len = u32(pos + 8);
          pos += 12;
        } else {
          len = u16(pos + 6);
          pos += 8;
        }
        sq = vr[0] == 'S' && vr[1] == 'Q';
      } else {
        len = u32(pos + 4);
        pos += 8;
      }
      const bool pixel_data = depth == 0 && group == 0x7FE0 && elem == 0x0010;
      if (len == kUndefined) {
        if (pixel_data) {  // encapsulated: fragments (items) until a sequence delimiter
          has_pixels = true;
          g.encapsulated = true;
          pos = fragments(pos, end);
        } else {
          pos = walk(pos, end, depth + 1, true);  // a sequence of undefined length
        }
        continue;
      }
      if (len > end - pos) {
        if (pixel_data)
          fail("pixel data is truncated (the file holds " + std::to_string(end - pos) + " of its " +
               std::to_string(len) + " bytes)");
        fail("DICOM element " + hex_tag(group, elem) + " declares " + std::to_string(len) +
             " bytes but only " + std::to_string(end - pos) + " remain (truncated file?)");
      }
      // Implicit VR: a value that starts with an item tag is a sequence.
      if (!sq && !explicit_vr && len >= 8 && u16(pos) == 0xFFFE && u16(pos + 2) == 0xE000)
        sq = true;
      if (sq) walk(pos, pos + len, depth + 1, false);
      if (depth == 0) {
        if (explicit_vr) check_vr(group, elem, vr);
        record(group, elem, pos, len);
      }
      pos += len;
    }
    return pos;
  }

  // An item of a sequence: a nested data set of defined or undefined length.
  uint64_t item(uint64_t pos, uint64_t end, uint64_t len, int depth) {
    if (len == kUndefined) return walk(pos, end, depth + 1, true);
    if (len > end - pos)
      fail("DICOM item declares " + std::to_string(len) + " bytes but only " +
           std::to_string(end - pos) + " remain (truncated file?)");
    walk(pos, pos + len, depth + 1, false);
    return pos + len;
  }

  uint64_t fragments(uint64_t pos, uint64_t end) {
    for (;;) {
      if (end - pos < 8) fail("compressed pixel data is truncated");
      const uint32_t group = u16(pos), elem = u16(pos + 2), len = u32(pos + 4);
      pos += 8;
      if (group != 0xFFFE) fail("corrupt compressed pixel data (fragment expected)");
      if (elem == 0xE0DD) return pos;
      if (len > end - pos)
        fail("compressed pixel data is truncated (a fragment declares " + std::to_string(len) +
             " bytes, " + std::to_string(end - pos) + " remain)");
      pixel_length += len;
      pos += len;
    }
  }

  // GDCM reads these through gdcm::Attribute, which asserts (aborting the process, as Debian
  // builds it) when the element's VR is not the dictionary's: refuse such files instead.
  void check_vr(uint32_t group, uint32_t elem, const uint8_t* vr) const {
    struct Expected {
      uint32_t group, elem;
      const char* vr;
    };
    static const Expected expected[] = {
        {0x0018, 0x0050, "DS"}, {0x0018, 0x0088, "DS"}, {0x0018, 0x1164, "DS"},
        {0x0020, 0x0032, "DS"}, {0x0020, 0x0037, "DS"}, {0x0028, 0x0002, "US"},
        {0x0028, 0x0004, "CS"}, {0x0028, 0x0006, "US"}, {0x0028, 0x0008, "IS"},
        {0x0028, 0x0009, "AT"}, {0x0028, 0x0010, "US"}, {0x0028, 0x0011, "US"},
        {0x0028, 0x0030, "DS"}, {0x0028, 0x0100, "US"}, {0x0028, 0x0101, "US"},
        {0x0028, 0x0102, "US"}, {0x0028, 0x0103, "US"}, {0x0028, 0x1052, "DS"},
        {0x0028, 0x1053, "DS"}, {0x3004, 0x000C, "DS"}};
    if (vr[0] == 'U' && vr[1] == 'N') return;  // unknown: GDCM converts it by the dictionary
    for (const auto& e : expected)
      if (e.group == group && e.elem == elem && (vr[0] != e.vr[0] || vr[1] != e.vr[1]))
        fail("DICOM element " + hex_tag(group, elem) + " has value representation " +
             std::string(reinterpret_cast<const char*>(vr), 2) + ", the standard says " + e.vr);
  }

  void record(uint32_t group, uint32_t elem, uint64_t pos, uint64_t len) {
    if (group == 0x7FE0 && elem == 0x0010) {
      has_pixels = true;
      pixel_length = len;
    }
    auto text = [&] {
      std::string t(reinterpret_cast<const char*>(d + pos), len);
      while (!t.empty() && (t.back() == '\0' || t.back() == ' ')) t.pop_back();
      return t;
    };
    if (group == 0x0020 && elem == 0x000E) g.series_uid = text();
    if (group == 0x0020 && elem == 0x0032) g.position = text();
    if (group == 0x0020 && elem == 0x0037) g.orientation = text();
    if (group == 0x0020 && elem == 0x0013) g.instance = text();
    if (group != 0x0028) return;
    const uint64_t us = len >= 2 ? u16(pos) : 0;
    if (elem == 0x0010) g.rows = us;
    if (elem == 0x0011) g.columns = us;
    if (elem == 0x0002) g.samples = us;
    if (elem == 0x0100) g.bits_allocated = us;
    if (elem == 0x0008) frames_text.assign(reinterpret_cast<const char*>(d + pos), len);
    if (elem == 0x0004) photometric.assign(reinterpret_cast<const char*>(d + pos), len);
  }
};

}  // namespace

DicomGeometry check_dicom_file(const std::string& path) {
  MappedFile f(path);
  DicomWalker w(path, f.data(), f.size());
  uint64_t pos = 0;
  std::string syntax;
  if (f.size() >= 132 && std::memcmp(f.data() + 128, "DICM", 4) == 0) {
    // File meta information: always explicit VR little endian, group 0002.
    pos = 132;
    while (f.size() - pos >= 8 && w.u16(pos) == 0x0002) {
      const uint32_t elem = w.u16(pos + 2);
      const uint8_t* vr = f.data() + pos + 4;
      // GDCM asserts (aborting the process) on file meta information without explicit VRs.
      if (!DicomWalker::valid_vr(vr))
        w.fail("corrupt DICOM file meta information (element (0002," + std::to_string(elem) +
               ") has no value representation)");
      uint64_t len, hdr;
      if (DicomWalker::long_vr(vr)) {
        if (f.size() - pos < 12) w.fail("truncated DICOM file meta information");
        len = w.u32(pos + 8), hdr = 12;
      } else {
        len = w.u16(pos + 6), hdr = 8;
      }
      if (len > f.size() - pos - hdr) w.fail("truncated DICOM file meta information");
      if (elem == 0x0010) syntax.assign(reinterpret_cast<const char*>(f.data() + pos + hdr), len);
      pos += hdr + len;
    }
    while (!syntax.empty() && (syntax.back() == '\0' || syntax.back() == ' ')) syntax.pop_back();
    // Both are mandatory; GDCM guesses without them, and some of its guesses allocate gigabytes.
    if (pos == 132) w.fail("DICOM file meta information (group 0002) is missing or corrupt");
    if (syntax.empty()) w.fail("DICOM file meta information has no transfer syntax (0002,0010)");
  } else if (f.size() >= 8) {
    // No preamble: explicit VR if bytes 4-5 look like a value representation; big endian if the
    // first group number (0008 in practice) reads as such.
    const uint8_t* vr = f.data() + 4;
    w.explicit_vr = vr[0] >= 'A' && vr[0] <= 'Z' && vr[1] >= 'A' && vr[1] <= 'Z';
    w.little = !(f.data()[0] == 0 && f.data()[1] != 0);
  }
  if (syntax == "1.2.840.10008.1.2") w.explicit_vr = false;
  if (syntax == "1.2.840.10008.1.2.2") w.little = false;
  if (syntax == "1.2.840.10008.1.2.1.99")
    w.fail("deflated DICOM (transfer syntax 1.2.840.10008.1.2.1.99) is not supported");
  w.walk(pos, f.size(), 0, false);
  if (!w.has_pixels) w.fail("DICOM file holds no pixel data (7FE0,0010)");
  if (w.g.rows == 0 || w.g.columns == 0)
    w.fail("DICOM file has no Rows or Columns (0028,0010/0011)");
  if (w.g.bits_allocated == 0 || w.g.bits_allocated > 64)
    w.fail("DICOM file has no valid BitsAllocated (0028,0100): " +
           std::to_string(w.g.bits_allocated));
  if (w.g.samples == 0 || w.g.samples > 4)
    w.fail("DICOM file has " + std::to_string(w.g.samples) + " samples per pixel (1 to 4 read)");
  if (!w.frames_text.empty()) {
    try {
      const long long fr = std::stoll(w.frames_text);
      if (fr <= 0) throw std::invalid_argument("frames");
      w.g.frames = uint64_t(fr);
    } catch (const std::exception&) {
      w.fail("DICOM NumberOfFrames (0028,0008) is not a positive number: '" + w.frames_text + "'");
    }
  }
  const std::string what = path + ": DICOM geometry";
  // 4:2:2 colour stores two samples per pixel (Y Y Cb Cr for each pair), not three.
  const bool subsampled = w.photometric.find("_422") != std::string::npos;
  const uint64_t samples =
      checked_mul(checked_mul(checked_mul(w.g.rows, w.g.columns, what), w.g.frames, what),
                  subsampled && w.g.samples == 3 ? 2 : w.g.samples, what);
  const uint64_t bytes = w.g.bits_allocated % 8 == 0
                             ? checked_mul(samples, w.g.bits_allocated / 8, what)
                             : (checked_mul(samples, w.g.bits_allocated, what) + 7) / 8;
  if (!w.g.encapsulated && w.pixel_length < bytes)
    w.fail("pixel data is truncated (" + std::to_string(w.pixel_length) + " bytes; Rows " +
           std::to_string(w.g.rows) + " x Columns " + std::to_string(w.g.columns) + " x frames " +
           std::to_string(w.g.frames) + " x samples " + std::to_string(w.g.samples) + " x " +
           std::to_string(w.g.bits_allocated) + " bits need " + std::to_string(bytes) + ")");
  return w.g;
}

}  // namespace concord::detail
