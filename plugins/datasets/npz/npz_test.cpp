#include <concord/dataset.h>
#include <concord/durable_output.h>
#include <concord/message.h>

#include <zlib.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <map>

#include "testing.h"

using namespace concord;

namespace {

// A .npy (version 1.0) holding `values` as the given dtype.
std::string npy(const std::string& dtype, const std::vector<int64_t>& shape,
                const std::vector<double>& values) {
  std::string dims;
  for (auto d : shape) dims += std::to_string(d) + ", ";
  if (shape.size() > 1)
    dims.erase(dims.size() - 2);  // "(5, 1)"; a 1-D shape keeps "(5,)"
  else
    dims.pop_back();
  std::string header =
      "{'descr': '" + dtype + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::string out = "\x93NUMPY";
  out += char(1);
  out += char(0);
  out += char(header.size() & 0xff);
  out += char(header.size() >> 8);
  out += header;
  for (double v : values) {
    if (dtype == "|u1") {
      out += char(uint8_t(v));
    } else if (dtype == "<i8") {
      int64_t x = int64_t(v);
      out.append(reinterpret_cast<const char*>(&x), 8);
    } else {
      float f = float(v);
      out.append(reinterpret_cast<const char*>(&f), 4);
    }
  }
  return out;
}

void put16(std::string& s, uint16_t v) {
  s += char(v & 0xff);
  s += char(v >> 8);
}
void put32(std::string& s, uint32_t v) {
  put16(s, uint16_t(v & 0xffff));
  put16(s, uint16_t(v >> 16));
}

// Writes a zip archive; entries alternate between stored and deflated to cover both.
// `declared` overrides the uncompressed size written for the named entries.
void write_zip(const std::string& file,
               const std::vector<std::pair<std::string, std::string>>& entries,
               bool corrupt_crc = false, const std::map<std::string, uint32_t>& declared = {}) {
  std::string out, central;
  int k = 0;
  for (const auto& [name, data] : entries) {
    const bool deflated = (k++ % 2) == 1;
    std::string payload = data;
    if (deflated) {
      z_stream zs{};
      deflateInit2(&zs, 6, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY);
      payload.resize(deflateBound(&zs, uLong(data.size())));
      zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
      zs.avail_in = uInt(data.size());
      zs.next_out = reinterpret_cast<Bytef*>(payload.data());
      zs.avail_out = uInt(payload.size());
      deflate(&zs, Z_FINISH);
      payload.resize(zs.total_out);
      deflateEnd(&zs);
    }
    uint32_t crc =
        uint32_t(crc32(0L, reinterpret_cast<const Bytef*>(data.data()), uInt(data.size())));
    if (corrupt_crc) crc ^= 1;
    const uint32_t offset = uint32_t(out.size());
    auto common = [&](std::string& s) {
      put16(s, 20);                // version needed
      put16(s, 0);                 // flags
      put16(s, deflated ? 8 : 0);  // method
      put16(s, 0);                 // time
      put16(s, 0x21);              // date
      put32(s, crc);
      put32(s, uint32_t(payload.size()));
      put32(s, declared.count(name) ? declared.at(name) : uint32_t(data.size()));
      put16(s, uint16_t(name.size()));
      put16(s, 0);  // extra
    };
    put32(out, 0x04034b50);
    common(out);
    out += name + payload;
    put32(central, 0x02014b50);
    put16(central, 20);  // made by
    common(central);
    put16(central, 0);  // comment
    put16(central, 0);  // disk
    put16(central, 0);  // internal attributes
    put32(central, 0);  // external attributes
    put32(central, offset);
    central += name;
  }
  const uint32_t cd_offset = uint32_t(out.size());
  out += central;
  put32(out, 0x06054b50);
  put16(out, 0);
  put16(out, 0);
  put16(out, uint16_t(entries.size()));
  put16(out, uint16_t(entries.size()));
  put32(out, uint32_t(central.size()));
  put32(out, cd_offset);
  put16(out, 0);
  write_file_atomic(file, out);
}

// Grey 4 (H) x 3 (W) images; pixel (x, y) of image n = 10 n + 3 y + x.
std::vector<double> grey_values(int n) {
  std::vector<double> v;
  for (int i = 0; i < n; ++i)
    for (int y = 0; y < 4; ++y)
      for (int x = 0; x < 3; ++x) v.push_back(10 * i + 3 * y + x);
  return v;
}

std::string tiny_npz(const testkit::TempDir& dir) {
  const std::string file = dir.str() + "/tiny.npz";
  write_zip(file, {{"train_images.npy", npy("|u1", {5, 4, 3}, grey_values(5))},
                   {"train_labels.npy", npy("<i8", {5, 1}, {0, 1, 2, 1, 0})},
                   {"val_images.npy", npy("|u1", {2, 4, 3}, grey_values(2))},
                   {"val_labels.npy", npy("<i8", {2, 1}, {1, 1})},
                   {"test_images.npy", npy("|u1", {3, 4, 3}, grey_values(3))},
                   {"test_labels.npy", npy("|u1", {3}, {0, 0, 1})}});
  return file;
}

std::unique_ptr<Dataset> make(const std::map<std::string, Value>& given) {
  return testkit::make_plugin<Dataset>(Kind::Dataset, "npz", given);
}

using testkit::error_of;

}  // namespace

TEST(Npz, ReadsTinyArchiveExactly) {
  testkit::TempDir dir;
  auto fed = make({{"path", make_value(tiny_npz(dir))}})->load({1, {}});
  ASSERT_EQ(fed.sites.size(), 1u);
  EXPECT_EQ(fed.sites[0].name, "all");
  EXPECT_EQ(fed.task, Task::Classification);
  EXPECT_EQ(fed.num_classes, 3);
  EXPECT_EQ(fed.channels, 1);
  const auto& train = fed.sites[0].train;
  ASSERT_EQ(train.size(), 5u);
  ASSERT_EQ(fed.sites[0].test.size(), 3u);
  EXPECT_EQ(train[2].label, 2);
  EXPECT_EQ(fed.sites[0].test[2].label, 1);
  EXPECT_EQ(train[2].id, "tiny.npz:train:2");
  const Image& im = train[2].image;
  EXPECT_EQ(im.size[0], 3);  // width
  EXPECT_EQ(im.size[1], 4);  // height
  EXPECT_FLOAT_EQ(im.at(2, 1), float((20 + 3 + 2) / 255.0));
  EXPECT_FLOAT_EQ(im.at(0, 3), float((20 + 9) / 255.0));
}

TEST(Npz, ValAsTestResizeAndColour) {
  testkit::TempDir dir;
  const std::string file = dir.str() + "/rgb.npz";
  // 2 RGB images, 2 x 2: value = 100 * channel + 10 * y + x (interleaved H W C in the file).
  std::vector<double> rgb;
  for (int n = 0; n < 2; ++n)
    for (int y = 0; y < 2; ++y)
      for (int x = 0; x < 2; ++x)
        for (int c = 0; c < 3; ++c) rgb.push_back(100 * c + 10 * y + x);
  write_zip(file, {{"train_images.npy", npy("|u1", {2, 2, 2, 3}, rgb)},
                   {"train_labels.npy", npy("<i8", {2, 1}, {0, 1})},
                   {"val_images.npy", npy("|u1", {2, 2, 2, 3}, rgb)},
                   {"val_labels.npy", npy("<i8", {2, 1}, {1, 0})}});
  auto fed = make({{"path", make_value(file)}, {"split_test", make_value("val")}})->load({1, {}});
  ASSERT_EQ(fed.sites[0].test.size(), 2u);
  EXPECT_EQ(fed.sites[0].test[0].label, 1);
  const Image& im = fed.sites[0].train[0].image;
  EXPECT_EQ(im.channels, 3);
  EXPECT_FLOAT_EQ(im.at(1, 0, 0, 2), float(201 / 255.0));
  EXPECT_FLOAT_EQ(im.at(0, 1, 0, 1), float(110 / 255.0));

  auto resized = make({{"path", make_value(file)},
                       {"split_test", make_value("val")},
                       {"size", make_value(int64_t(8))},
                       {"channels", make_value(int64_t(1))}})
                     ->load({1, {}});
  EXPECT_EQ(resized.sites[0].train[0].image.size[0], 8);
  EXPECT_EQ(resized.sites[0].train[0].image.channels, 1);
  EXPECT_EQ(resized.channels, 1);
}

TEST(Npz, LimitIsASeededSubsample) {
  testkit::TempDir dir;
  const std::string file = tiny_npz(dir);
  auto ids = [&](uint64_t seed) {
    auto fed =
        make({{"path", make_value(file)}, {"limit", make_value(int64_t(3))}})->load({seed, {}});
    std::vector<std::string> v;
    for (const auto& s : fed.sites[0].train) v.push_back(s.id);
    EXPECT_EQ(fed.sites[0].test.size(), 3u);  // 3 test samples: limit 3 keeps all
    return v;
  };
  const auto a = ids(1), b = ids(1);
  EXPECT_EQ(a.size(), 3u);
  EXPECT_EQ(a, b);
  bool differs = false;
  for (uint64_t s = 2; s < 12 && !differs; ++s) differs = ids(s) != a;
  EXPECT_TRUE(differs);
}

TEST(Npz, ErrorsNameFileAndKey) {
  testkit::TempDir dir;
  const std::string missing = dir.str() + "/nolabels.npz";
  write_zip(missing, {{"train_images.npy", npy("|u1", {1, 2, 2}, {1, 2, 3, 4})},
                      {"test_images.npy", npy("|u1", {1, 2, 2}, {1, 2, 3, 4})},
                      {"test_labels.npy", npy("<i8", {1, 1}, {0})}});
  std::string e = error_of([&] { make({{"path", make_value(missing)}})->load({1, {}}); });
  EXPECT_NE(e.find("nolabels.npz"), std::string::npos) << e;
  EXPECT_NE(e.find("train_labels"), std::string::npos) << e;

  const std::string corrupt = dir.str() + "/corrupt.npz";
  write_zip(corrupt, {{"train_images.npy", npy("|u1", {1, 2, 2}, {1, 2, 3, 4})}}, true);
  e = error_of([&] { make({{"path", make_value(corrupt)}})->load({1, {}}); });
  EXPECT_NE(e.find("corrupt.npz"), std::string::npos) << e;

  const std::string notzip = dir.str() + "/text.npz";
  write_file_atomic(notzip, std::string("this is not a zip archive at all"));
  e = error_of([&] { make({{"path", make_value(notzip)}})->load({1, {}}); });
  EXPECT_NE(e.find("text.npz"), std::string::npos) << e;

  EXPECT_THROW(make({{"path", make_value(dir.str() + "/absent.npz")}}), Error);
}

TEST(Npz, PneumoniaMnist) {
  CONCORD_REQUIRE_SHARED_DATA("pneumoniamnist");
  const std::string file = testkit::shared_data() + "/pneumoniamnist/pneumoniamnist.npz";
  auto fed = make({{"path", make_value(file)}})->load({3, {}});
  const auto& site = fed.sites[0];
  EXPECT_EQ(site.train.size(), 3882u);
  EXPECT_EQ(site.test.size(), 624u);
  EXPECT_EQ(fed.num_classes, 2);
  int normal = 0;
  float lo = 1, hi = 0;
  for (const auto& s : site.train) {
    normal += s.label == 0;
    for (float v : s.image.data) lo = std::min(lo, v), hi = std::max(hi, v);
  }
  EXPECT_EQ(normal, 388);  // this copy's documented class split (README of the shared data)
  EXPECT_GE(lo, 0.f);
  EXPECT_LE(hi, 1.f);
  EXPECT_GT(hi, 0.5f);
  EXPECT_EQ(site.train[0].image.size[0], 28);

  auto val = make({{"path", make_value(file)},
                   {"split_test", make_value("val")},
                   {"limit", make_value(int64_t(100))},
                   {"size", make_value(int64_t(32))}})
                 ->load({3, {}});
  EXPECT_EQ(val.sites[0].train.size(), 100u);
  EXPECT_EQ(val.sites[0].test.size(), 100u);
  EXPECT_EQ(val.sites[0].test[0].image.size[1], 32);
}

// Sizes the archive declares are checked before allocating: an entry's uncompressed size against
// the ceiling and against what deflate can produce, a .npy shape against the entry's size.
TEST(Npz, DeclaredSizesAreCheckedBeforeAllocating) {
  testkit::TempDir dir;
  auto refused = [&](const std::string& file) {
    return error_of([&] { make({{"path", make_value(file)}})->load({1, {}}); });
  };
  const std::string labels = npy("<i8", {2, 1}, {0, 1});
  // Stored entry (first) declaring 4 GiB uncompressed.
  const std::string huge = dir.str() + "/huge.npz";
  write_zip(huge,
            {{"train_images.npy", npy("|u1", {2, 2, 2}, {1, 2, 3, 4, 5, 6, 7, 8})},
             {"train_labels.npy", labels}},
            false, {{"train_images.npy", 0xFFFFFFF0u}});
  std::string e = refused(huge);
  EXPECT_NE(e.find("huge.npz"), std::string::npos) << e;
  EXPECT_NE(e.find("4294967280 bytes uncompressed"), std::string::npos) << e;
  // Deflated entry (second) declaring 100 MB from a few compressed bytes.
  const std::string bomb = dir.str() + "/bomb.npz";
  write_zip(bomb,
            {{"train_images.npy", npy("|u1", {2, 2, 2}, {1, 2, 3, 4, 5, 6, 7, 8})},
             {"train_labels.npy", labels}},
            false, {{"train_labels.npy", 100000000u}});
  e = refused(bomb);
  EXPECT_NE(e.find("more than deflate can produce"), std::string::npos) << e;
  // Stored entry declaring 300 MB (under the ceiling) that holds 8 bytes: refused before the
  // 300 MB are allocated (scripts/fuzz npz found the allocation with -malloc_limit_mb).
  const std::string liar = dir.str() + "/liar.npz";
  write_zip(liar,
            {{"train_images.npy", npy("|u1", {2, 2, 2}, {1, 2, 3, 4, 5, 6, 7, 8})},
             {"train_labels.npy", labels}},
            false, {{"train_images.npy", 300000000u}});
  e = refused(liar);
  EXPECT_NE(e.find("stored entry 'train_images.npy' has inconsistent sizes"), std::string::npos)
      << e;
  // A shape that overflows, and one that disagrees with the data the entry holds.
  const std::string shape = dir.str() + "/shape.npz";
  write_zip(shape, {{"train_images.npy", npy("|u1", {2147483648, 2147483648, 2147483648}, {1, 2})},
                    {"train_labels.npy", labels}});
  EXPECT_NE(refused(shape).find("overflows"), std::string::npos) << refused(shape);
  const std::string shortish = dir.str() + "/short.npz";
  write_zip(shortish, {{"train_images.npy", npy("|u1", {3, 2, 2}, {1, 2, 3, 4, 5, 6, 7, 8})},
                       {"train_labels.npy", labels}});
  e = refused(shortish);
  EXPECT_NE(e.find("need 12"), std::string::npos) << e;
}

TEST(Npz, NonFiniteImagesAreRefusedOrZeroed) {
  testkit::TempDir dir;
  const std::string file = dir.str() + "/nan.npz";
  std::vector<double> v = {0.1, 0.2, 0.3, 0.4, 0.5, std::nan(""), 0.7, 0.8};
  write_zip(file, {{"train_images.npy", npy("<f4", {2, 2, 2}, v)},
                   {"train_labels.npy", npy("<i8", {2, 1}, {0, 1})},
                   {"test_images.npy", npy("<f4", {1, 2, 2}, {0.1, 0.2, 0.3, 0.4})},
                   {"test_labels.npy", npy("<i8", {1, 1}, {1})}});
  const std::string e = error_of([&] { make({{"path", make_value(file)}})->load({1, {}}); });
  EXPECT_NE(e.find("nan.npz"), std::string::npos) << e;
  EXPECT_NE(e.find("train_images[1]"), std::string::npos) << e;
  auto fed = make({{"path", make_value(file)}, {"non_finite", make_value("zero")}})->load({1, {}});
  EXPECT_EQ(fed.sites[0].train[1].image.at(1, 0), 0.f);
  EXPECT_FLOAT_EQ(fed.sites[0].train[1].image.at(0, 0), 0.5f);
}
