// Round trips through every format read_image/write_image support: values, geometry, pixel type,
// channels; atomic output; errors that name the file.
#include <concord/durable_output.h>
#include <concord/error.h>
#include <concord/image_io.h>

#include "testing.h"

#include <cmath>
#include <fstream>
#include <mutex>
#include <random>
#include <set>

namespace fs = std::filesystem;
using namespace concord;

namespace {

// A 3D volume with distinct, reproducible values and an oblique, anisotropic geometry.
Image make_volume(std::array<int64_t, 3> size, PixelType t, int channels = 1, uint64_t seed = 7) {
  Image im(3, channels, size);
  im.pixel_type = t;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> u(t == PixelType::U8 ? 0 : -1000,
                                       t == PixelType::U8 ? 255 : 3000);
  for (auto& v : im.data) v = float(u(rng));
  if (t == PixelType::U16 || t == PixelType::U8)
    for (auto& v : im.data) v = std::abs(v);
  im.geometry.spacing = {0.8, 0.7, 2.5};
  im.geometry.origin = {-12.5, 30.25, 4.0};
  // Rotation of 30 degrees about z: columns are the axis directions.
  const double c = std::cos(M_PI / 6), s = std::sin(M_PI / 6);
  im.geometry.direction = {c, -s, 0, s, c, 0, 0, 0, 1};
  return im;
}

void expect_same_geometry(const Geometry& a, const Geometry& b, double tol = 1e-4) {
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(a.spacing[i], b.spacing[i], tol) << "spacing[" << i << "]";
    EXPECT_NEAR(a.origin[i], b.origin[i], tol) << "origin[" << i << "]";
  }
  for (int i = 0; i < 9; ++i)
    EXPECT_NEAR(a.direction[i], b.direction[i], tol) << "direction[" << i << "]";
}

void expect_same_values(const Image& a, const Image& b, float tol = 0) {
  ASSERT_EQ(a.data.size(), b.data.size());
  size_t bad = 0;
  for (size_t i = 0; i < a.data.size(); ++i)
    if (std::abs(a.data[i] - b.data[i]) > tol) ++bad;
  EXPECT_EQ(bad, 0u) << "voxels differing by more than " << tol;
}

// Files left in a folder, to check no temporary survives a write.
std::set<std::string> listing(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

struct Case {
  const char* ext;
  PixelType type;
  int channels;
};

}  // namespace

TEST(ImageIo, ItkFormatsRoundTripValuesGeometryAndPixelType) {
  testkit::TempDir tmp;
  const Case cases[] = {{".nii", PixelType::I16, 1},  {".nii.gz", PixelType::U16, 1},
                        {".nrrd", PixelType::U8, 1},  {".nrrd", PixelType::I16, 2},
                        {".mha", PixelType::F32, 1},  {".mhd", PixelType::I32, 1},
                        {".nhdr", PixelType::F64, 1}, {".nii.gz", PixelType::F32, 3}};
  int n = 0;
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.ext) + " channels " + std::to_string(c.channels));
    Image im = make_volume({9, 7, 5}, c.type, c.channels, 100 + n);
    if (c.type == PixelType::F32 || c.type == PixelType::F64)
      for (auto& v : im.data) v *= 0.37f;
    std::string file = (tmp.path() / ("v" + std::to_string(n++) + c.ext)).string();
    write_image(im, file);
    ASSERT_TRUE(fs::exists(file));
    Image back = read_image(file);
    EXPECT_EQ(back.dim, 3);
    EXPECT_EQ(back.channels, c.channels);
    EXPECT_EQ(back.size, im.size);
    EXPECT_EQ(back.pixel_type, c.type);
    expect_same_values(im, back);
    expect_same_geometry(im.geometry, back.geometry);
  }
  // MetaImage/NRRD detached headers bring their data file; no temporary is left behind.
  std::set<std::string> files = listing(tmp.path());
  for (const auto& f : files) EXPECT_EQ(f.find("concord-tmp"), std::string::npos) << f;
  EXPECT_TRUE(files.count("v5.mhd") && files.count("v5.raw"));
}

TEST(ImageIo, TwoDimensionalNiftiStaysTwoDimensional) {
  testkit::TempDir tmp;
  Image im(2, 1, {6, 4, 1});
  for (size_t i = 0; i < im.data.size(); ++i) im.data[i] = float(i);
  im.pixel_type = PixelType::U8;
  im.geometry.spacing = {0.5, 0.25, 1};
  write_image(im, tmp.str() + "/flat.nii");
  Image back = read_image(tmp.str() + "/flat.nii");
  EXPECT_EQ(back.dim, 2);
  EXPECT_EQ(back.size, im.size);
  EXPECT_NEAR(back.geometry.spacing[1], 0.25, 1e-6);
  expect_same_values(im, back);
}

TEST(ImageIo, KeepPixelTypeRoundsAndClamps) {
  testkit::TempDir tmp;
  Image im(2, 1, {4, 1, 1});
  im.pixel_type = PixelType::U8;
  im.data = {-5.f, 3.6f, 300.f, 2.4f};
  write_image(im, tmp.str() + "/c.nrrd", /*keep_pixel_type=*/true);
  Image back = read_image(tmp.str() + "/c.nrrd");
  EXPECT_EQ(back.pixel_type, PixelType::U8);
  EXPECT_EQ(back.data, (std::vector<float>{0.f, 4.f, 255.f, 2.f}));
  // 16-bit, signed: ties round to even, NaN becomes 0, both ends clamp, infinities too; long
  // enough (40 voxels) that the vectorized loop, not only its scalar tail, is checked.
  Image s(3, 1, {40, 1, 1});
  s.pixel_type = PixelType::I16;
  const std::vector<float> in = {2.5f,          3.5f,     -2.5f,    -0.5f,    0.5f,
                                 std::nanf(""), 40000.f,  -40000.f, 32767.4f, 32767.6f,
                                 -32768.6f,     INFINITY, -INFINITY};
  const std::vector<float> want = {2.f,      4.f,     -2.f,    -0.f,     0.f,     0.f,     32767.f,
                                   -32768.f, 32767.f, 32767.f, -32768.f, 32767.f, -32768.f};
  for (size_t i = 0; i < s.data.size(); ++i) s.data[i] = in[i % in.size()];
  write_image(s, tmp.str() + "/s.nii", /*keep_pixel_type=*/true);
  const Image sb = read_image(tmp.str() + "/s.nii");
  EXPECT_EQ(sb.pixel_type, PixelType::I16);
  for (size_t i = 0; i < s.data.size(); ++i)
    EXPECT_EQ(sb.data[i], want[i % want.size()]) << "input " << in[i % in.size()];
  // float32 policy keeps the fractions.
  write_image(im, tmp.str() + "/f.nii.gz", /*keep_pixel_type=*/false);
  Image f = read_image(tmp.str() + "/f.nii.gz");
  EXPECT_EQ(f.pixel_type, PixelType::F32);
  EXPECT_EQ(f.data, im.data);
}

TEST(ImageIo, Png16BitGreyRoundTrip) {
  testkit::TempDir tmp;
  Image im(2, 1, {17, 5, 1});
  im.pixel_type = PixelType::U16;
  for (size_t i = 0; i < im.data.size(); ++i) im.data[i] = float((i * 3851) % 65536);
  im.data[0] = 65535;
  write_image(im, tmp.str() + "/g16.png");
  Image back = read_image(tmp.str() + "/g16.png");
  EXPECT_EQ(back.dim, 2);
  EXPECT_EQ(back.channels, 1);
  EXPECT_EQ(back.pixel_type, PixelType::U16);
  EXPECT_EQ(back.size, im.size);
  expect_same_values(im, back);
}

TEST(ImageIo, PngRgbKeepsChannelsInOrder) {
  testkit::TempDir tmp;
  Image im(2, 3, {8, 6, 1});
  im.pixel_type = PixelType::U8;
  for (int c = 0; c < 3; ++c)
    for (int64_t i = 0; i < im.voxels(); ++i) im.channel(c)[i] = float((c * 80 + i * 5) % 256);
  write_image(im, tmp.str() + "/rgb.png");
  Image back = read_image(tmp.str() + "/rgb.png");
  EXPECT_EQ(back.channels, 3);
  EXPECT_EQ(back.pixel_type, PixelType::U8);
  expect_same_values(im, back);
  // The same picture through a colour NIfTI must agree channel for channel (RGB, not BGR).
  write_image(back, tmp.str() + "/rgb.nii");
  expect_same_values(im, read_image(tmp.str() + "/rgb.nii"));
}

TEST(ImageIo, JpegAndBmpAndTiff) {
  testkit::TempDir tmp;
  Image im(2, 1, {32, 32, 1});
  im.pixel_type = PixelType::U8;
  for (int64_t y = 0; y < 32; ++y)
    for (int64_t x = 0; x < 32; ++x) im.at(x, y) = float(4 * x + 2 * y);
  write_image(im, tmp.str() + "/a.jpg");
  Image j = read_image(tmp.str() + "/a.jpg");
  EXPECT_EQ(j.pixel_type, PixelType::U8);
  expect_same_values(im, j, 6.f);  // lossy, smooth ramp
  write_image(im, tmp.str() + "/a.bmp");
  expect_same_values(im, read_image(tmp.str() + "/a.bmp"));
  Image fl = im;
  fl.pixel_type = PixelType::F32;
  for (auto& v : fl.data) v = v / 7.f;
  write_image(fl, tmp.str() + "/a.tif");
  Image t = read_image(tmp.str() + "/a.tif");
  EXPECT_EQ(t.pixel_type, PixelType::F32);
  expect_same_values(fl, t);
}

TEST(ImageIo, CorruptAndMissingFilesNameTheFile) {
  testkit::TempDir tmp;
  const std::string png = tmp.str() + "/broken.png";
  const std::string nii = tmp.str() + "/broken.nii.gz";
  std::ofstream(png) << "this is not a png";
  std::ofstream(nii) << "neither is this a NIfTI file";
  for (const auto& f : {png, nii}) {
    try {
      read_image(f);
      ADD_FAILURE() << "no error for " << f;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
    }
  }
  // Files whose data is cut short, in each ITK format.
  Image im = make_volume({16, 16, 8}, PixelType::I16);
  for (const char* ext : {".nii", ".nii.gz", ".nrrd", ".mha"}) {
    const std::string whole = tmp.str() + "/whole" + ext, cut = tmp.str() + "/cut" + ext;
    write_image(im, whole);
    fs::copy_file(whole, cut);
    fs::resize_file(cut, fs::file_size(whole) * 2 / 3);
    EXPECT_THROW(read_image(cut), Error) << ext;
  }
  EXPECT_THROW(read_image(tmp.str() + "/absent.nii"), Error);
  EXPECT_THROW(read_image(tmp.str() + "/x.unknown"), Error);
  EXPECT_THROW(write_image(im, tmp.str() + "/vol.png"), Error);  // 3D into a 2D format
}

TEST(ImageIo, FileKindPredicates) {
  EXPECT_TRUE(is_image_file("a/b.nii.gz"));
  EXPECT_TRUE(is_image_file("B.PNG"));
  EXPECT_TRUE(is_image_file("x.mhd"));
  EXPECT_FALSE(is_image_file("x.raw"));
  EXPECT_FALSE(is_image_file("notes.txt"));
  testkit::TempDir tmp;
  EXPECT_FALSE(is_dicom_dir(tmp.str()));
  EXPECT_FALSE(is_dicom_dir(tmp.str() + "/absent"));
}

TEST(ImageIo, DicomSeriesRoundTripKeepsTagsAndRenewsUids) {
  testkit::TempDir tmp;
  Image im = make_volume({12, 10, 6}, PixelType::I16);
  im.meta["0010|0010"] = "Test^Patient";
  im.meta["0010|0020"] = "ID-42";
  im.meta["0008|0060"] = "MR";
  im.meta["0020|000d"] = "1.2.826.0.1.3680043.2.1125.1.1";
  im.meta["0020|000e"] = "1.2.826.0.1.3680043.2.1125.1.2";
  const std::string dir = tmp.str() + "/series";
  write_image(im, dir);
  ASSERT_TRUE(is_dicom_dir(dir));
  EXPECT_EQ(listing(dir).size(), 6u);
  for (const auto& f : listing(tmp.path())) EXPECT_EQ(f.find("concord-tmp"), std::string::npos);
  Image back = read_image(dir);
  EXPECT_EQ(back.dim, 3);
  EXPECT_EQ(back.size, im.size);
  EXPECT_EQ(back.pixel_type, PixelType::I16);
  expect_same_values(im, back);
  expect_same_geometry(im.geometry, back.geometry, 1e-3);
  auto tag = [&](const char* k) { return back.meta.count(k) ? back.meta.at(k) : std::string(); };
  EXPECT_NE(tag("0010|0010").find("Test^Patient"), std::string::npos);
  EXPECT_NE(tag("0010|0020").find("ID-42"), std::string::npos);
  EXPECT_NE(tag("0020|000d").find("1.2.826.0.1.3680043.2.1125.1.1"), std::string::npos);
  EXPECT_EQ(tag("0020|000e").find("1.2.826.0.1.3680043.2.1125.1.2"), std::string::npos)
      << "series UID must change when pixel data changed";
  EXPECT_FALSE(tag("0020|000e").empty());

  // Without new UIDs the series keeps its identity; rewriting replaces the folder as a whole.
  WriteOptions same;
  same.new_uids = false;
  write_image(back, dir, same);
  Image again = read_image(dir);
  EXPECT_EQ(listing(dir).size(), 6u);
  EXPECT_EQ(again.meta.at("0020|000e"), back.meta.at("0020|000e"));
}

TEST(ImageIo, DicomStoresFloatImagesWithRescale) {
  testkit::TempDir tmp;
  Image im = make_volume({8, 8, 3}, PixelType::F32);
  for (auto& v : im.data) v = v * 0.01f;  // range about [-10, 30]
  write_image(im, tmp.str() + "/f");
  Image back = read_image(tmp.str() + "/f");
  EXPECT_EQ(back.pixel_type, PixelType::F32);
  expect_same_values(im, back, 40.f / 65535.f);  // one 16-bit step of the rescaled range
  // keep_pixel_type=false on an integer image also takes the rescaled path.
  Image ints = make_volume({8, 8, 3}, PixelType::U16);
  write_image(ints, tmp.str() + "/g", false);
  expect_same_values(ints, read_image(tmp.str() + "/g"), 0.1f);
}

// Outputs finished on a publisher thread: every format lands complete under its final name, in
// submission order; a publishing failure goes to the callback (not lost, not thrown at the
// worker); nothing is accepted after finish().
TEST(ImageIo, PublisherFinishesOutputsInOrderAndReportsFailures) {
  testkit::TempDir dir;
  std::vector<std::pair<std::string, std::string>> done;
  std::mutex m;
  OutputPublisher publisher(
      [&](const std::string& path, const std::string& error) {
        std::lock_guard<std::mutex> lock(m);
        done.emplace_back(path, error);
      },
      2);
  const Image vol = make_volume({9, 7, 5}, PixelType::I16);
  Image flat(2, 1, {6, 4, 1});
  flat.pixel_type = PixelType::U8;
  for (size_t i = 0; i < flat.data.size(); ++i) flat.data[i] = float(i * 9);
  WriteOptions wo;
  wo.publisher = &publisher;
  std::vector<std::string> want;
  for (int i = 0; i < 6; ++i) {
    const std::string nii = (dir.path() / ("v" + std::to_string(i) + ".nii.gz")).string();
    const std::string png = (dir.path() / ("p" + std::to_string(i) + ".png")).string();
    write_image(vol, nii, wo);
    write_image(flat, png, wo);
    want.push_back(nii);
    want.push_back(png);
  }
  const std::string series = (dir.path() / "series").string();
  write_image(vol, series, wo);
  want.push_back(series);
  // A target that cannot be replaced: a non-empty folder where a file should go.
  const fs::path blocked = dir.path() / "blocked.nii";
  fs::create_directories(blocked / "occupied");
  EXPECT_NO_THROW(write_image(vol, blocked.string(), wo));
  want.push_back(blocked.string());
  publisher.finish();

  ASSERT_EQ(done.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(done[i].first, want[i]) << "published out of submission order at " << i;
    if (i + 1 < want.size()) {
      EXPECT_EQ(done[i].second, "") << want[i];
    }
  }
  EXPECT_NE(done.back().second.find("blocked.nii"), std::string::npos) << done.back().second;
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(read_image((dir.path() / ("v" + std::to_string(i) + ".nii.gz")).string()).data,
              vol.data);
    EXPECT_EQ(read_image((dir.path() / ("p" + std::to_string(i) + ".png")).string()).data,
              flat.data);
  }
  EXPECT_EQ(read_image(series).data, vol.data);
  // No scratch folder is left behind once everything is published or failed.
  for (const auto& e : fs::directory_iterator(dir.path()))
    EXPECT_EQ(e.path().filename().string().find(".concord-tmp"), std::string::npos) << e.path();
  EXPECT_THROW(write_image(vol, (dir.path() / "late.nii").string(), wo), Error);
}

TEST(ImageIo, FolderWithTwoSeriesIsRefused) {
  testkit::TempDir tmp;
  Image a = make_volume({6, 6, 2}, PixelType::I16, 1, 1),
        b = make_volume({6, 6, 2}, PixelType::I16, 1, 2);
  write_image(a, tmp.str() + "/a");
  write_image(b, tmp.str() + "/b");
  fs::create_directory(tmp.path() / "mixed");
  for (const char* s : {"a", "b"})
    for (const auto& e : fs::directory_iterator(tmp.path() / s))
      fs::copy_file(e.path(),
                    tmp.path() / "mixed" / (std::string(s) + e.path().filename().string()));
  try {
    read_image(tmp.str() + "/mixed");
    ADD_FAILURE() << "two series accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("2 DICOM series"), std::string::npos) << e.what();
  }
}

TEST(ImageIo, RealNiftiColin27) {
  const std::string file = "/usr/share/mricron/templates/ch2bet.nii.gz";
  if (!fs::exists(file)) GTEST_SKIP() << file << " absent (Debian package mricron-data)";
  Image im = read_image(file);
  EXPECT_EQ(im.dim, 3);
  EXPECT_EQ(im.size, (std::array<int64_t, 3>{181, 217, 181}));
  EXPECT_NEAR(im.geometry.spacing[0], 1.0, 1e-6);
  double sum = 0;
  for (float v : im.data) sum += v;
  EXPECT_GT(sum, 0);
  testkit::TempDir tmp;
  write_image(im, tmp.str() + "/colin.nrrd");
  Image back = read_image(tmp.str() + "/colin.nrrd");
  EXPECT_EQ(back.pixel_type, im.pixel_type);
  expect_same_values(im, back);
  expect_same_geometry(im.geometry, back.geometry);
}

TEST(ImageIo, RealDicomFilesFromPydicom) {
  const fs::path dir = "/usr/lib/python3/dist-packages/pydicom/data/test_files";
  const fs::path file = dir / "CT_small.dcm";
  if (!fs::exists(file)) GTEST_SKIP() << file << " absent (Debian package python3-pydicom)";
  // One real CT slice as a one-file series: 128x128, signed 16-bit with a modality rescale.
  testkit::TempDir tmp;
  fs::create_directory(tmp.path() / "ct");
  fs::copy_file(file, tmp.path() / "ct" / "CT_small.dcm");
  ASSERT_TRUE(is_dicom_dir(tmp.str() + "/ct"));
  Image im = read_image(tmp.str() + "/ct");
  EXPECT_EQ(im.size, (std::array<int64_t, 3>{128, 128, 1}));
  EXPECT_FALSE(im.meta.empty());
  write_image(im, tmp.str() + "/out");
  Image back = read_image(tmp.str() + "/out");
  EXPECT_EQ(back.pixel_type, im.pixel_type);
  expect_same_values(im, back);
  EXPECT_EQ(back.meta.at("0010|0010"), im.meta.at("0010|0010"));
}
