// npz: MedMNIST-style .npz archives (a zip of .npy arrays) as one pooled site "all".
// Zip parsing is done here (central directory, zip64 extras, stored and deflated entries via
// zlib) because numpy writes plain zips and one small reader avoids a libzip dependency.
#include <concord/checked.h>
#include <concord/dataset.h>
#include <concord/error.h>
#include <concord/federation_tools.h>
#include <concord/image_io.h>
#include <concord/message.h>

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>

#include "../common/dataset_common.h"

namespace concord {
namespace {

uint16_t u16(const uint8_t* p) {
  return uint16_t(p[0] | (p[1] << 8));
}
uint32_t u32(const uint8_t* p) {
  return uint32_t(u16(p)) | (uint32_t(u16(p + 2)) << 16);
}
uint64_t u64(const uint8_t* p) {
  return uint64_t(u32(p)) | (uint64_t(u32(p + 4)) << 32);
}

struct ZipEntry {
  uint16_t method = 0;
  uint32_t crc = 0;
  uint64_t compressed = 0, size = 0, local_offset = 0;
};

// The entries of a zip archive held in memory, by name.
class ZipArchive {
 public:
  ZipArchive(std::string file, Bytes bytes) : file_(std::move(file)), data_(std::move(bytes)) {
    const size_t n = data_->size();
    const uint8_t* d = data_->data();
    if (n < 22) fail("too short to be a zip archive");
    // End of central directory: last 22 bytes plus at most a 64 KiB comment.
    size_t eocd = std::string::npos;
    for (size_t i = n - 22 + 1; i-- > (n > 22 + 65535 ? n - 22 - 65535 : 0);)
      if (u32(d + i) == 0x06054b50) {
        eocd = i;
        break;
      }
    if (eocd == std::string::npos) fail("no zip end-of-central-directory record (not an .npz?)");
    uint64_t count = u16(d + eocd + 10), cd_size = u32(d + eocd + 12), cd_off = u32(d + eocd + 16);
    if ((count == 0xffff || cd_off == 0xffffffff) && eocd >= 20 &&
        u32(d + eocd - 20) == 0x07064b50) {  // zip64 locator
      const uint64_t z = u64(d + eocd - 20 + 8);
      if (z > n - 56 || u32(d + z) != 0x06064b50) fail("corrupt zip64 end record");
      count = u64(d + z + 32);
      cd_size = u64(d + z + 40);
      cd_off = u64(d + z + 48);
    }
    if (cd_off > n || cd_size > n - cd_off)
      fail("central directory beyond end of file (truncated?)");
    size_t p = cd_off;
    for (uint64_t k = 0; k < count; ++k) {
      if (p + 46 > n || u32(d + p) != 0x02014b50) fail("corrupt central directory");
      ZipEntry e;
      e.method = u16(d + p + 10);
      e.crc = u32(d + p + 16);
      e.compressed = u32(d + p + 20);
      e.size = u32(d + p + 24);
      const size_t name_len = u16(d + p + 28), extra_len = u16(d + p + 30),
                   comment_len = u16(d + p + 32);
      e.local_offset = u32(d + p + 42);
      if (p + 46 + name_len + extra_len + comment_len > n) fail("corrupt central directory");
      std::string name(reinterpret_cast<const char*>(d + p + 46), name_len);
      // zip64 extra field: 64-bit values for each 32-bit field that reads 0xffffffff.
      for (size_t x = p + 46 + name_len; x + 4 <= p + 46 + name_len + extra_len;) {
        const uint16_t id = u16(d + x), len = u16(d + x + 2);
        size_t q = x + 4;
        if (id == 0x0001) {
          if (e.size == 0xffffffff && q + 8 <= x + 4 + len) e.size = u64(d + q), q += 8;
          if (e.compressed == 0xffffffff && q + 8 <= x + 4 + len) e.compressed = u64(d + q), q += 8;
          if (e.local_offset == 0xffffffff && q + 8 <= x + 4 + len) e.local_offset = u64(d + q);
        }
        x += 4 + len;
      }
      entries_[name] = e;
      p += 46 + name_len + extra_len + comment_len;
    }
  }

  bool has(const std::string& name) const { return entries_.count(name) != 0; }

  // The entry's bytes. Its declared uncompressed size is checked before anything is allocated:
  // against `max_bytes`, and against what its compressed bytes can hold at all.
  std::vector<uint8_t> read(const std::string& name, uint64_t max_bytes) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) fail("no entry '" + name + "'");
    const ZipEntry& e = it->second;
    const uint8_t* d = data_->data();
    const uint64_t n = data_->size();
    if (n < 30 || e.local_offset > n - 30 || u32(d + e.local_offset) != 0x04034b50)
      fail("corrupt local header of '" + name + "'");
    const uint64_t start =
        e.local_offset + 30 + u16(d + e.local_offset + 26) + u16(d + e.local_offset + 28);
    if (start > n || e.compressed > n - start) fail("entry '" + name + "' is truncated");
    if (e.size > max_bytes)
      fail("entry '" + name + "' declares " + std::to_string(e.size) +
           " bytes uncompressed, more than the limit of " + std::to_string(max_bytes >> 20) +
           " MiB (CONCORD_MAX_IMAGE_MB)");
    // Deflate produces at most 1032 bytes per input byte (RFC 1951 block limits); a stored
    // entry holds exactly its bytes (present in the file: checked above). Both before allocating.
    if (e.method == 8 && e.size / 1032 > e.compressed + 1)
      fail("entry '" + name + "' declares " + std::to_string(e.size) + " bytes from " +
           std::to_string(e.compressed) + " compressed ones, more than deflate can produce");
    if (e.method == 0 && e.compressed != e.size)
      fail("stored entry '" + name + "' has inconsistent sizes");
    if (e.method != 0 && e.method != 8)
      fail("entry '" + name + "' uses compression method " + std::to_string(e.method) +
           " (only stored and deflate are read)");
    std::vector<uint8_t> out(e.size);
    if (e.method == 0) {
      std::memcpy(out.data(), d + start, e.size);
    } else {  // deflate
      z_stream zs{};
      if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) fail("zlib init failed");
      zs.next_in = const_cast<Bytef*>(d + start);
      zs.avail_in = uInt(e.compressed);
      zs.next_out = out.data();
      zs.avail_out = uInt(out.size());
      const int rc = inflate(&zs, Z_FINISH);
      const uint64_t produced = zs.total_out;
      inflateEnd(&zs);
      if (rc != Z_STREAM_END || produced != e.size)
        fail("entry '" + name + "' does not inflate (" + std::string(zs.msg ? zs.msg : "bad data") +
             ")");
    }
    if (uint32_t(crc32_z(0L, out.data(), out.size())) != e.crc)
      fail("entry '" + name + "' fails its CRC check (corrupt file)");
    return out;
  }

  [[noreturn]] void fail(const std::string& why) const {
    throw Error("npz: " + file_ + ": " + why);
  }

 private:
  std::string file_;
  Bytes data_;
  std::map<std::string, ZipEntry> entries_;
};

// A parsed .npy array: its header and its little-endian values, read one at a time.
struct NpyArray {
  std::vector<int64_t> shape;
  std::string dtype, kind;  // "<f4", "f4"
  std::vector<uint8_t> bytes;
  size_t offset = 0, width = 0;
  int64_t count = 0;

  double value(int64_t i) const {
    const uint8_t* p = bytes.data() + offset + size_t(i) * width;
    if (kind == "u1" || kind == "b1") return p[0];
    if (kind == "i1") return int8_t(p[0]);
    if (kind == "u2") return u16(p);
    if (kind == "i2") return int16_t(u16(p));
    if (kind == "u4") return u32(p);
    if (kind == "i4") return int32_t(u32(p));
    if (kind == "u8") return double(u64(p));
    if (kind == "i8") return double(int64_t(u64(p)));
    if (kind == "f4") {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    double v;
    std::memcpy(&v, p, 8);
    return v;
  }
};

NpyArray parse_npy(std::vector<uint8_t> b, const std::string& where) {
  auto fail = [&](const std::string& why) { throw Error("npz: " + where + ": " + why); };
  if (b.size() < 10 || std::memcmp(b.data(), "\x93NUMPY", 6) != 0) fail("not a .npy array");
  const int major = b[6];
  size_t header_len, offset;
  if (major == 1) {
    header_len = u16(b.data() + 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (b.size() < 12) fail("truncated .npy header");
    header_len = u32(b.data() + 8);
    offset = 12;
  } else {
    fail("unsupported .npy version " + std::to_string(major));
  }
  if (header_len > b.size() - offset) fail("truncated .npy header");
  const std::string h(reinterpret_cast<const char*>(b.data() + offset), header_len);
  auto field = [&](const std::string& key) {
    const auto k = h.find("'" + key + "'");
    if (k == std::string::npos) fail("header has no '" + key + "'");
    auto v = h.find(':', k);
    if (v == std::string::npos) fail("header field '" + key + "' has no value");
    v = h.find_first_not_of(' ', v + 1);
    if (v == std::string::npos) fail("header field '" + key + "' has no value");
    return v;
  };
  NpyArray a;
  {
    auto v = field("descr");
    const char q = h[v];
    const auto end = h.find(q, v + 1);
    if (end == std::string::npos) fail("header field 'descr' is not a quoted string");
    a.dtype = h.substr(v + 1, end - v - 1);
  }
  if (h.compare(field("fortran_order"), 4, "True") == 0)
    fail("Fortran-ordered arrays are not supported");
  {
    auto v = field("shape");
    const auto end = h.find(')', v);
    if (h[v] != '(' || end == std::string::npos) fail("header field 'shape' is not a tuple");
    std::string dims = h.substr(v + 1, end - v - 1);
    size_t p = 0;
    while (p < dims.size()) {
      const auto comma = dims.find(',', p);
      std::string tok = dims.substr(p, comma == std::string::npos ? std::string::npos : comma - p);
      tok.erase(std::remove(tok.begin(), tok.end(), ' '), tok.end());
      if (!tok.empty()) {
        if (tok.find_first_not_of("0123456789") != std::string::npos || tok.size() > 18)
          fail("shape dimension '" + tok + "' is not a count");
        a.shape.push_back(std::stoll(tok));
      }
      if (comma == std::string::npos) break;
      p = comma + 1;
    }
  }
  const std::string& t = a.dtype;
  if (t.size() < 3 || (t[0] == '>' && t.substr(1) != "u1" && t.substr(1) != "i1"))
    fail("dtype '" + t + "' is not supported (little-endian integers or floats expected)");
  a.kind = t.substr(1);
  static const std::map<std::string, int> widths = {{"u1", 1}, {"i1", 1}, {"b1", 1}, {"u2", 2},
                                                    {"i2", 2}, {"u4", 4}, {"i4", 4}, {"u8", 8},
                                                    {"i8", 8}, {"f4", 4}, {"f8", 8}};
  auto w = widths.find(a.kind);
  if (w == widths.end()) fail("dtype '" + t + "' is not supported");
  a.width = size_t(w->second);
  const std::string what = "npz: " + where + ": shape";
  uint64_t count = 1;
  for (auto d : a.shape) count = checked_mul(count, uint64_t(d), what);
  const uint64_t data_bytes = checked_mul(count, uint64_t(a.width), what);
  a.offset = offset + header_len;
  // The entry's size (checked against the limit before it was inflated) and the shape agree.
  if (data_bytes != b.size() - a.offset)
    fail("holds " + std::to_string(b.size() - a.offset) + " data bytes, its shape and dtype '" + t +
         "' need " + std::to_string(data_bytes) + " (truncated or corrupt)");
  a.count = int64_t(count);
  a.bytes = std::move(b);
  return a;
}

class NpzDataset : public Dataset {
 public:
  NpzDataset(const Args& args, const BuildContext&)
      : path_(args.str("path")),
        test_split_(args.str("split_test")),
        limit_(args.integer("limit")) {
    if (!std::filesystem::is_regular_file(path_))
      throw Error("npz: " + path_ + ": no such file (argument `path`)");
    opt_.size = int(args.integer("size"));
    opt_.channels = int(args.integer("channels"));
    if (opt_.channels == 2) throw Error("npz: channels must be 0 (keep), 1 or 3");
    if (args.has("non_finite") && args.str("non_finite") == "zero")
      opt_.non_finite = NonFinite::Zero;
  }

  // request.sites is not filtered here: the archive is one source, and the pipeline's
  // data.partition names the sites it makes from it.
  Federation load(const DataRequest& request) override {
    ZipArchive zip(path_, read_file(path_));
    Federation fed;
    fed.task = Task::Classification;
    SiteData site;
    site.name = "all";
    int64_t max_label = -1;
    site.train = load_split(zip, "train", request.seed, max_label);
    site.test = load_split(zip, test_split_, request.seed, max_label);
    fed.num_classes = int(std::max<int64_t>(2, max_label + 1));
    fed.sites.push_back(std::move(site));
    fed.channels = fed.sites[0].train.empty() ? 1 : fed.sites[0].train[0].image.channels;
    datasets::check_uniform(fed, "npz");
    return fed;
  }

 private:
  std::vector<Sample> load_split(const ZipArchive& zip, const std::string& split, uint64_t seed,
                                 int64_t& max_label) {
    const std::string ikey = split + "_images", lkey = split + "_labels";
    for (const auto& key : {ikey, lkey})
      if (!zip.has(key + ".npy")) zip.fail("has no array '" + key + "' (MedMNIST layout expected)");
    const size_t max_bytes = default_max_image_bytes();
    const NpyArray images = parse_npy(zip.read(ikey + ".npy", max_bytes), path_ + ": " + ikey);
    const NpyArray labels = parse_npy(zip.read(lkey + ".npy", max_bytes), path_ + ": " + lkey);
    const auto& s = images.shape;
    if (s.size() != 3 && !(s.size() == 4 && (s[3] == 3 || s[3] == 1)))
      throw Error("npz: " + path_ + ": " + ikey + " has shape of rank " + std::to_string(s.size()) +
                  "; expected N x H x W or N x H x W x 3");
    const int64_t N = s[0], H = s[1], W = s[2], C = s.size() == 4 ? s[3] : 1;
    if (H <= 0 || W <= 0 || H > 65536 || W > 65536)
      throw Error("npz: " + path_ + ": " + ikey + " declares images of " + std::to_string(H) +
                  " x " + std::to_string(W) + " pixels");
    int64_t per = 1;
    for (size_t k = 1; k < labels.shape.size(); ++k) per *= labels.shape[k];
    if (labels.shape.empty() || labels.shape[0] != N || per != 1)
      throw Error("npz: " + path_ + ": " + lkey + " must be N x 1 with N = " + std::to_string(N) +
                  " (multi-label arrays are not supported)");
    // Integer images are scaled by their type's maximum; float images are taken as [0,1].
    const std::string kind = images.dtype.substr(1);
    const double scale = kind == "u1" ? 1 / 255.0 : kind == "u2" ? 1 / 65535.0 : 1.0;

    std::vector<int64_t> pick(N);
    for (int64_t i = 0; i < N; ++i) pick[i] = i;
    if (limit_ > 0 && limit_ < N) {  // seeded subsample, kept in file order
      SeededRandom rng(mix_seed(seed, split == "train" ? 1 : split == "val" ? 2 : 3));
      rng.shuffle(pick);
      pick.resize(limit_);
      std::sort(pick.begin(), pick.end());
    }
    std::vector<Sample> out;
    out.reserve(pick.size());
    const std::string base = path_.substr(path_.find_last_of('/') + 1);
    for (int64_t i : pick) {
      Sample smp;
      smp.id = base + ":" + split + ":" + std::to_string(i);
      const double lv = labels.value(i);
      if (!(lv >= 0 && lv < 9.0e15) || lv != std::floor(lv))
        throw Error("npz: " + path_ + ": " + lkey + "[" + std::to_string(i) +
                    "] = " + std::to_string(lv) + " is not a class index");
      smp.label = int64_t(lv);
      max_label = std::max(max_label, smp.label);
      Image img(2, int(C), {W, H, 1});
      img.pixel_type = kind == "u1" ? PixelType::U8 : PixelType::F32;
      const int64_t base_index = i * H * W * C;
      int64_t bad = 0;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x)
          for (int64_t c = 0; c < C; ++c) {  // interleaved HWC -> planar CHW
            float& v = img.at(x, y, 0, int(c));
            v = float(images.value(base_index + (y * W + x) * C + c) * scale);
            if (!std::isfinite(v)) {
              ++bad;
              v = 0.f;
            }
          }
      if (bad && opt_.non_finite == NonFinite::Error)
        throw Error("npz: " + path_ + ": " + ikey + "[" + std::to_string(i) + "] has " +
                    std::to_string(bad) +
                    " non-finite values (NaN or Inf); refused (argument non_finite: zero "
                    "replaces them by 0)");
      img = datasets::convert_channels(img, opt_.channels, path_);
      smp.image = datasets::resize(img, opt_.size, false);
      out.push_back(std::move(smp));
    }
    return out;
  }

  std::string path_, test_split_;
  int64_t limit_;
  datasets::ImageOptions opt_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-dataset-npz", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Dataset,
       "npz",
       "MedMNIST-style .npz (train/val/test images and labels) as one pooled site 'all'",
       {ArgSpec::path("path", ".npz file with {train,val,test}_{images,labels} arrays"),
        ArgSpec::choice("split_test", {"test", "val"}, "test",
                        "Which archive split becomes the test split"),
        ArgSpec::integer("limit", 0,
                         "At most this many samples per split (seeded subsample); 0 = all")
            .at_least(0),
        ArgSpec::integer("size", 0, "Resize to size x size (0 keeps the archive's size)")
            .range(0, 4096),
        ArgSpec::integer("channels", 0, "Convert to 1 or 3 channels; 0 keeps").range(0, 3),
        ArgSpec::choice("non_finite", {"error", "zero"}, "error",
                        "Float images with NaN/Inf values: refuse naming the sample, or replace "
                        "them by 0")},
       factory_of<NpzDataset>()});
}
