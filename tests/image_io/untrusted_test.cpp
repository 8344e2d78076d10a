// read_image on files nobody cleaned: sizes a header declares are checked before anything is
// allocated (against the file and the CONCORD_MAX_IMAGE_MB ceiling), compressed streams are
// counted with a cap, DICOM pixel data shorter than its geometry is refused, non-finite voxels
// and grey-as-RGB follow the ReadOptions policies, and folder scans survive symlink loops.
// Every hostile file is generated here from a small valid one.
#include <concord/error.h>
#include <concord/image_io.h>

#include "testing.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <typeinfo>

namespace fs = std::filesystem;
using namespace concord;

namespace {

long peak_rss_mib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6)) / 1024;
  return 0;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void spit(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
}

template <class T>
void patch(const fs::path& p, size_t offset, T value) {
  std::string b = slurp(p);
  ASSERT_LE(offset + sizeof(T), b.size());
  std::memcpy(&b[offset], &value, sizeof(T));
  spit(p, b);
}

void gzip(const fs::path& in, const fs::path& out) {
  ASSERT_EQ(testkit::run_command("gzip -c '" + in.string() + "' > '" + out.string() + "'"), 0);
}

// The error read_image throws for `path` (with `opt`), checked to name the file.
std::string refusal(const std::string& path, const ReadOptions& opt = {}) {
  const std::string e = testkit::error_of([&] { read_image(path, opt); });
  EXPECT_NE(e.find(path), std::string::npos) << "error does not name the file: " << e;
  return e;
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

Image ramp(std::array<int64_t, 3> size, PixelType t, int channels = 1) {
  Image im(size[2] > 1 ? 3 : 2, channels, size);
  im.pixel_type = t;
  for (size_t i = 0; i < im.data.size(); ++i) im.data[i] = float(i % 200);
  return im;
}

const fs::path kPydicom = "/usr/lib/python3/dist-packages/pydicom/data/test_files";

}  // namespace

// Class 2: a few bytes that declare gigabytes, in every format, are refused before the decoder
// allocates: the error names the file and the declared size, and the peak memory stays small.
TEST(ImageIoUntrusted, HugeDeclaredSizesAreRefusedBeforeAllocating) {
  testkit::TempDir tmp;
  const fs::path d = tmp.path();
  const long before = peak_rss_mib();
  std::vector<std::string> files;

  // NIfTI: dim[1..3] (int16 at byte 42) = 1024^3 int16 = 4 GiB as float32.
  write_image(ramp({8, 8, 8}, PixelType::I16), (d / "big.nii").string());
  for (int i = 0; i < 3; ++i) patch<int16_t>(d / "big.nii", 42 + 2 * i, 1024);
  files.push_back((d / "big.nii").string());
  gzip(d / "big.nii", d / "big.nii.gz");
  files.push_back((d / "big.nii.gz").string());
  // A size that fits the ceiling but not the file: the file check refuses it, not an allocation.
  write_image(ramp({8, 8, 8}, PixelType::I16), (d / "mid.nii").string());
  for (int i = 0; i < 3; ++i) patch<int16_t>(d / "mid.nii", 42 + 2 * i, 600);
  files.push_back((d / "mid.nii").string());

  // NRRD attached and detached, MetaImage local and detached (+ compressed).
  spit(d / "big.nrrd",
       "NRRD0004\ntype: short\ndimension: 3\nsizes: 4096 4096 4096\n"
       "encoding: raw\nendian: little\n\n0123456789");
  spit(d / "mid.nrrd",
       "NRRD0004\ntype: short\ndimension: 3\nsizes: 512 512 512\n"
       "encoding: raw\nendian: little\n\n0123456789");
  spit(d / "big.nhdr",
       "NRRD0004\ntype: short\ndimension: 3\nsizes: 512 512 512\n"
       "encoding: raw\nendian: little\ndata file: big.raw\n");
  spit(d / "big.raw", std::string(1000, '\0'));
  spit(d / "big.mha",
       "ObjectType = Image\nNDims = 3\nDimSize = 4096 4096 4096\n"
       "ElementType = MET_SHORT\nElementDataFile = LOCAL\n0123456789");
  spit(d / "mid.mha",
       "ObjectType = Image\nNDims = 3\nDimSize = 512 512 512\n"
       "ElementType = MET_SHORT\nElementDataFile = LOCAL\n0123456789");
  spit(d / "big.mhd",
       "ObjectType = Image\nNDims = 3\nDimSize = 512 512 512\n"
       "ElementType = MET_SHORT\nCompressedData = True\n"
       "CompressedDataSize = 99999999999\nElementDataFile = big.zraw\n");
  spit(d / "big.zraw", std::string(100, 'x'));
  for (const char* f : {"big.nrrd", "mid.nrrd", "big.nhdr", "big.mha", "mid.mha", "big.mhd"})
    files.push_back((d / f).string());

  // PNG IHDR (width, height big-endian at 16 and 20) = 100000 x 100000.
  write_image(ramp({8, 8, 1}, PixelType::U8), (d / "big.png").string());
  patch<uint32_t>(d / "big.png", 16, __builtin_bswap32(100000));
  patch<uint32_t>(d / "big.png", 20, __builtin_bswap32(100000));
  files.push_back((d / "big.png").string());
  // JPEG SOF0: height and width after the marker, length and precision = 65535 x 65535.
  write_image(ramp({8, 8, 1}, PixelType::U8), (d / "big.jpg").string());
  {
    std::string b = slurp(d / "big.jpg");
    const size_t sof = b.find("\xFF\xC0");
    ASSERT_NE(sof, std::string::npos);
    for (int k = 5; k < 9; ++k) b[sof + size_t(k)] = '\xFF';
    spit(d / "big.jpg", b);
  }
  files.push_back((d / "big.jpg").string());
  // BMP (uncompressed): 30000 x 30000 declared in a file of a few hundred bytes.
  write_image(ramp({8, 8, 1}, PixelType::U8), (d / "big.bmp").string());
  patch<int32_t>(d / "big.bmp", 18, 30000);
  patch<int32_t>(d / "big.bmp", 22, 30000);
  files.push_back((d / "big.bmp").string());
  // TIFF: one directory declaring 100000 x 100000 grey pixels.
  {
    std::string t("II*\0\x08\0\0\0", 8);
    auto u16 = [&](uint16_t v) { t.append(reinterpret_cast<const char*>(&v), 2); };
    auto u32 = [&](uint32_t v) { t.append(reinterpret_cast<const char*>(&v), 4); };
    u16(3);
    for (uint16_t tag : {256, 257}) u16(tag), u16(4), u32(1), u32(100000);
    u16(277), u16(3), u32(1), u32(1);
    u32(0);
    spit(d / "big.tif", t);
  }
  files.push_back((d / "big.tif").string());

  // DICOM: a value length of 3.75 GiB in a 6 KB file (GDCM would allocate all of it).
  if (fs::exists(kPydicom / "CT_small.dcm")) {
    std::string b = slurp(kPydicom / "CT_small.dcm");
    const size_t pixels = b.rfind(std::string("\xE0\x7F\x10\x00OW\0\0", 8));
    ASSERT_NE(pixels, std::string::npos);
    const uint32_t vl = 0xF0000000u;
    std::memcpy(&b[pixels + 8], &vl, 4);
    spit(d / "big.dcm", b.substr(0, pixels + 200));
    files.push_back((d / "big.dcm").string());
  }

  for (const auto& f : files) {
    SCOPED_TRACE(f);
    const std::string e = refusal(f);
    EXPECT_TRUE(contains(e, "MiB") || contains(e, "truncated") || contains(e, "declares")) << e;
  }
  EXPECT_LT(peak_rss_mib() - before, 64) << "peak memory grew while refusing";
}

// A gzip bomb (a header declaring a plausible size, a stream far longer) and the opposite (a
// large declared size, a short stream) are refused without inflating into memory.
TEST(ImageIoUntrusted, CompressedStreamsAreCountedAgainstTheHeader) {
  testkit::TempDir tmp;
  const fs::path d = tmp.path();
  const long before = peak_rss_mib();
  // NIfTI 64^3 int16 (512 KiB of data) followed by 64 MiB of zeros: a ~70 KB .nii.gz.
  write_image(ramp({64, 64, 64}, PixelType::I16), (d / "bomb.nii").string());
  fs::resize_file(d / "bomb.nii", fs::file_size(d / "bomb.nii") + (size_t(64) << 20));
  gzip(d / "bomb.nii", d / "bomb.nii.gz");
  fs::remove(d / "bomb.nii");
  EXPECT_LT(fs::file_size(d / "bomb.nii.gz"), size_t(2) << 20);
  std::string e = refusal((d / "bomb.nii.gz").string());
  EXPECT_TRUE(contains(e, "more than")) << e;
  // Declares 512^3 int16 (512 MiB as float32: under the ceiling) but holds 8^3 voxels.
  write_image(ramp({8, 8, 8}, PixelType::I16), (d / "short.nii").string());
  for (int i = 0; i < 3; ++i) patch<int16_t>(d / "short.nii", 42 + 2 * i, 512);
  gzip(d / "short.nii", d / "short.nii.gz");
  e = refusal((d / "short.nii.gz").string());
  EXPECT_TRUE(contains(e, "truncated")) << e;
  // The same two shapes for NRRD (gzip encoding) and MetaImage (compressed data).
  const std::string zeros = (d / "zeros.gz").string();
  ASSERT_EQ(testkit::run_command("head -c 67108864 /dev/zero | gzip -c > " + zeros), 0);
  const std::string z = slurp(zeros);
  spit(d / "bomb.nrrd",
       "NRRD0004\ntype: short\ndimension: 3\nsizes: 64 64 64\n"
       "encoding: gzip\nendian: little\n\n" +
           z);
  spit(d / "bomb.mha",
       "ObjectType = Image\nNDims = 3\nDimSize = 64 64 64\n"
       "ElementType = MET_SHORT\nCompressedData = True\n"
       "ElementDataFile = LOCAL\n" +
           z);
  spit(d / "short.nrrd",
       "NRRD0004\ntype: short\ndimension: 3\nsizes: 2048 2048 64\n"
       "encoding: gzip\nendian: little\n\n" +
           z);
  spit(d / "short.mha",
       "ObjectType = Image\nNDims = 3\nDimSize = 2048 2048 64\n"
       "ElementType = MET_SHORT\nCompressedData = True\n"
       "ElementDataFile = LOCAL\n" +
           z);
  for (const char* f : {"bomb.nrrd", "bomb.mha"})
    EXPECT_TRUE(contains(refusal((d / f).string()), "more than")) << f;
  for (const char* f : {"short.nrrd", "short.mha"})
    EXPECT_TRUE(contains(refusal((d / f).string()), "truncated")) << f;
  EXPECT_LT(peak_rss_mib() - before, 64) << "peak memory grew while refusing";
  // Control: well-formed compressed files of each kind still read.
  write_image(ramp({64, 64, 64}, PixelType::I16), (d / "good.nii.gz").string());
  EXPECT_EQ(read_image((d / "good.nii.gz").string()).size, (std::array<int64_t, 3>{64, 64, 64}));
}

// The ceiling comes from CONCORD_MAX_IMAGE_MB, and ReadOptions::max_bytes overrides it per call.
TEST(ImageIoUntrusted, CeilingFromEnvironmentAndOptions) {
  testkit::TempDir tmp;
  const std::string f = tmp.str() + "/v.nrrd";
  write_image(ramp({128, 128, 64}, PixelType::I16), f);  // 4 MiB as float32
  ::setenv("CONCORD_MAX_IMAGE_MB", "2", 1);
  const std::string e = refusal(f);
  EXPECT_TRUE(contains(e, "limit of 2 MiB")) << e;
  ReadOptions big;
  big.max_bytes = size_t(8) << 20;
  EXPECT_EQ(read_image(f, big).size, (std::array<int64_t, 3>{128, 128, 64}));
  ::setenv("CONCORD_MAX_IMAGE_MB", "lots", 1);
  EXPECT_TRUE(contains(testkit::error_of([&] { read_image(f); }), "CONCORD_MAX_IMAGE_MB"));
  ::unsetenv("CONCORD_MAX_IMAGE_MB");
  EXPECT_EQ(default_max_image_bytes(), size_t(2048) << 20);
  EXPECT_EQ(read_image(f).size[2], 64);
}

// Class 6: DICOM pixel data shorter than Rows x Columns x bits, which GDCM pads with zeros, is
// refused naming the file, as a single file and inside a series folder.
TEST(ImageIoUntrusted, TruncatedDicomIsRefused) {
  const fs::path ct = kPydicom / "CT_small.dcm";
  if (!fs::exists(ct)) GTEST_SKIP() << ct << " absent (Debian package python3-pydicom)";
  testkit::TempDir tmp;
  fs::create_directory(tmp.path() / "series");
  const fs::path cut = tmp.path() / "series" / "CT_small.dcm";
  fs::copy_file(ct, cut);
  fs::resize_file(cut, fs::file_size(ct) - 5000);
  std::string e = refusal(cut.string());
  EXPECT_TRUE(contains(e, "pixel data is truncated")) << e;
  e = testkit::error_of([&] { read_image((tmp.path() / "series").string()); });
  EXPECT_TRUE(contains(e, cut.string()) && contains(e, "truncated")) << e;
  // Pixel data complete but its geometry claims more (Rows doubled): refused as well.
  std::string b = slurp(ct);
  const size_t rows = b.find(std::string("\x28\x00\x10\x00US\x02\x00", 8));
  ASSERT_NE(rows, std::string::npos);
  b[rows + 8] = '\0';
  b[rows + 9] = '\x01';  // 256 rows
  spit(tmp.path() / "tall.dcm", b);
  e = refusal((tmp.path() / "tall.dcm").string());
  EXPECT_TRUE(contains(e, "Rows 256")) << e;
  // Control: the intact file reads.
  EXPECT_EQ(read_image(ct.string()).size, (std::array<int64_t, 3>{128, 128, 1}));
}

// Class 7: NaN/Inf voxels are refused by default (naming the file and the count), replaced by 0
// or kept on request; integer images never carry them.
TEST(ImageIoUntrusted, NonFiniteVoxelsFollowThePolicy) {
  testkit::TempDir tmp;
  Image im = ramp({6, 5, 4}, PixelType::F32);
  im.data[3] = std::nanf("");
  im.data[10] = INFINITY;
  im.data[11] = -INFINITY;
  for (const char* ext : {".nii.gz", ".nrrd", ".mha"}) {
    const std::string f = tmp.str() + "/nan" + ext;
    write_image(im, f, false);
    const std::string e = refusal(f);
    EXPECT_TRUE(contains(e, "3 of 120 voxels are not finite")) << e;
    ReadOptions zero;
    zero.non_finite = NonFinite::Zero;
    const Image z = read_image(f, zero);
    EXPECT_EQ(z.data[3], 0.f);
    EXPECT_EQ(z.data[10], 0.f);
    EXPECT_EQ(z.data[4], im.data[4]);
    EXPECT_EQ(z.meta.at("concord.non_finite_replaced"), "3");
    ReadOptions keep;
    keep.non_finite = NonFinite::Keep;
    // NIfTI's library replaces them by 0 while reading: Keep then reports how many it did.
    const Image k = read_image(f, keep);
    if (std::string(ext) == ".nii.gz")
      EXPECT_EQ(k.meta.at("concord.non_finite_replaced"), "3");
    else
      EXPECT_TRUE(std::isnan(k.data[3]));
  }
  // All-NaN, and doubles beyond float range (which become Inf as float32).
  Image all = ramp({4, 4, 1}, PixelType::F32);
  for (auto& v : all.data) v = std::nanf("");
  write_image(all, tmp.str() + "/all.tif", false);
  EXPECT_TRUE(contains(refusal(tmp.str() + "/all.tif"), "16 of 16"));
  spit(
      tmp.path() / "huge.nrrd",
      std::string("NRRD0004\ntype: double\ndimension: 1\nsizes: 2\nencoding: raw\n"
                  "endian: little\n\n") +
          std::string(reinterpret_cast<const char*>(std::array<double, 2>{1e300, 1.0}.data()), 16));
  EXPECT_TRUE(contains(refusal(tmp.str() + "/huge.nrrd"), "1 of 2"));
}

// Class 7: grey stored as 3 identical channels is grey; true colour stays colour unless the
// policy asks for grey; Keep returns what is stored.
TEST(ImageIoUntrusted, ChannelPolicyCollapsesGreyStoredAsColour) {
  testkit::TempDir tmp;
  Image grey3 = ramp({9, 7, 1}, PixelType::U8, 3);
  for (int c = 1; c < 3; ++c)
    std::copy(grey3.channel(0), grey3.channel(0) + grey3.voxels(), grey3.channel(c));
  Image colour = ramp({9, 7, 1}, PixelType::U8, 3);
  for (int64_t i = 0; i < colour.voxels(); ++i)
    colour.channel(2)[i] = 255.f - colour.data[size_t(i)];
  for (const char* ext : {".png", ".bmp", ".tif", ".nii"}) {
    SCOPED_TRACE(ext);
    const std::string g = tmp.str() + "/grey3" + ext, c = tmp.str() + "/colour" + ext;
    write_image(grey3, g);
    write_image(colour, c);
    const Image a = read_image(g);
    EXPECT_EQ(a.channels, 1);
    EXPECT_EQ(std::vector<float>(a.data.begin(), a.data.end()),
              std::vector<float>(grey3.channel(0), grey3.channel(0) + grey3.voxels()));
    ReadOptions keep;
    keep.channels = ChannelPolicy::Keep;
    EXPECT_EQ(read_image(g, keep).channels, 3);
    EXPECT_EQ(read_image(c).channels, 3);
    ReadOptions grey;
    grey.channels = ChannelPolicy::Grey;
    const Image l = read_image(c, grey);
    ASSERT_EQ(l.channels, 1);
    const size_t i = 5;
    EXPECT_NEAR(l.data[i],
                0.299f * colour.channel(0)[i] + 0.587f * colour.channel(1)[i] +
                    0.114f * colour.channel(2)[i],
                1e-3);
  }
  // RGBA: an opaque alpha is dropped (then grey collapses), a real one is kept.
  Image rgba = ramp({5, 5, 1}, PixelType::U8, 4);
  for (int c = 1; c < 3; ++c)
    std::copy(rgba.channel(0), rgba.channel(0) + rgba.voxels(), rgba.channel(c));
  std::fill(rgba.channel(3), rgba.channel(3) + rgba.voxels(), 255.f);
  write_image(rgba, tmp.str() + "/opaque.png");
  EXPECT_EQ(read_image(tmp.str() + "/opaque.png").channels, 1);
  rgba.channel(3)[0] = 7.f;
  write_image(rgba, tmp.str() + "/alpha.png");
  EXPECT_EQ(read_image(tmp.str() + "/alpha.png").channels, 4);
}

// Class 7 and issue item 6: a folder is scanned entry by entry; a symlink loop or an unreadable
// entry is reported by name, DICOM files and other images beside them are told apart.
TEST(ImageIoUntrusted, ScanDicomDirSeparatesImagesAndSurvivesSymlinkLoops) {
  testkit::TempDir tmp;
  const fs::path dir = tmp.path() / "mixed";
  write_image(ramp({6, 6, 3}, PixelType::I16), dir.string());  // a DICOM series folder
  write_image(ramp({6, 6, 3}, PixelType::I16), (dir / "extra.nii.gz").string());
  spit(dir / "notes.txt", "hello");
  fs::create_symlink("loop", dir / "loop");        // points at itself
  fs::create_directory_symlink("..", dir / "up");  // a folder loop
  const DicomDirInfo info = scan_dicom_dir(dir.string());
  EXPECT_EQ(info.dicom_files.size(), 3u);
  ASSERT_EQ(info.image_files.size(), 1u);
  EXPECT_EQ(info.image_files[0], (dir / "extra.nii.gz").string());
  ASSERT_EQ(info.skipped.size(), 1u);
  EXPECT_TRUE(contains(info.skipped[0], (dir / "loop").string())) << info.skipped[0];
  EXPECT_TRUE(is_dicom_dir(dir.string()));
  EXPECT_EQ(read_image(dir.string()).size, (std::array<int64_t, 3>{6, 6, 3}));
  EXPECT_FALSE(scan_dicom_dir(tmp.str()).has_dicom());
  EXPECT_THROW(scan_dicom_dir((tmp.path() / "absent").string()), Error);
}

// D: empty images, unusable geometry, files that are not regular files.
TEST(ImageIoUntrusted, OddHeadersAreRefusedNamingTheFile) {
  testkit::TempDir tmp;
  const fs::path d = tmp.path();
  write_image(ramp({8, 8, 1}, PixelType::U8), (d / "empty.png").string());
  patch<uint32_t>(d / "empty.png", 16, 0);
  EXPECT_TRUE(contains(refusal((d / "empty.png").string()), "empty image"));
  write_image(ramp({4, 4, 4}, PixelType::I16), (d / "nanspacing.nii").string());
  // NaN in the qform offset and the sform: VNL would abort() the process building the matrix.
  patch<float>(d / "nanspacing.nii", 268, std::nanf(""));
  patch<float>(d / "nanspacing.nii", 292, std::nanf(""));
  EXPECT_TRUE(contains(refusal((d / "nanspacing.nii").string()), "unusable"));
  // A finite but absurd sform offset (1.7e38): ITK's SVD of it ran for minutes.
  write_image(ramp({4, 4, 4}, PixelType::I16), (d / "farorigin.nii").string());
  patch<float>(d / "farorigin.nii", 308, 1.7e38f);
  EXPECT_TRUE(contains(refusal((d / "farorigin.nii").string()), "unusable"));
  fs::create_symlink("/dev/zero", d / "zero.nii");
  EXPECT_TRUE(contains(refusal((d / "zero.nii").string()), "not a regular file"));
  spit(d / "dev.mhd",
       "ObjectType = Image\nNDims = 2\nDimSize = 64 64\nElementType = MET_UCHAR\n"
       "ElementDataFile = /dev/zero\n");
  EXPECT_TRUE(contains(refusal((d / "dev.mhd").string()), "not a regular file"));
  spit(d / "text.png", "GIF89a but named .png");
  refusal((d / "text.png").string());
}

// The reader is the one the extension names: DICOM bytes in a file named .mha, .mhd, .nrrd or
// .nhdr (which their own readers refuse) never reach GDCM, which ITK's factory offered every
// refused file to, bypassing the DICOM walk (GDCM aborts or allocates gigabytes on bad files;
// fuzz finding "dicom-in-other-extension", notes/fuzz-findings). A valid DICOM file is used: before
// the fix it was read as an image.
TEST(ImageIoUntrusted, DicomBytesUnderAnotherExtensionAreNotParsedByGdcm) {
  testkit::TempDir tmp;
  const fs::path series = tmp.path() / "series";
  write_image(ramp({6, 6, 2}, PixelType::I16), series.string());  // a DICOM series folder
  fs::path one;
  for (const auto& e : fs::directory_iterator(series)) one = e.path();
  ASSERT_FALSE(one.empty());
  const std::string dicom = slurp(one);
  const fs::path as_dcm = tmp.path() / "one.dcm";
  spit(as_dcm, dicom);
  EXPECT_EQ(read_image(as_dcm.string()).size, (std::array<int64_t, 3>{6, 6, 1}));
  for (const char* name : {"dicom.mha", "dicom.mhd", "dicom.nrrd", "dicom.nhdr"}) {
    const fs::path p = tmp.path() / name;
    spit(p, dicom);
    const std::string e = refusal(p.string());
    // .mha/.mhd: MetaImage's header check refuses the binary first (a 666-byte field name)
    EXPECT_TRUE(contains(e, "not a readable") || contains(e, "MetaImage header"))
        << name << ": " << e;
  }
}

// MetaImage headers that ITK's MetaIO cannot survive are refused before it reads them (fuzz
// findings on merged main, notes/fuzz-findings): a field name of 255+ bytes (strcpy into a
// 255-byte name: abort), a huge NDims (a loop of billions of reads; more values than MetaIO's
// table), and a '%' pattern or LIST as ElementDataFile (the pattern becomes sprintf's format,
// and the step a divisor). The control reads.
TEST(ImageIoUntrusted, MetaImageHeadersMetaIoCannotSurviveAreRefused) {
  testkit::TempDir tmp;
  const std::string head =
      "ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_UCHAR\n";
  const std::string pixels(16, '\x07');
  auto mha = [&](const std::string& name, const std::string& text) {
    const fs::path p = tmp.path() / name;
    spit(p, text);
    return p.string();
  };
  const std::string ok = mha("ok.mha", head + "ElementDataFile = LOCAL\n" + pixels);
  EXPECT_EQ(read_image(ok).size, (std::array<int64_t, 3>{4, 4, 1}));
  const std::string long_key =
      mha("longkey.mha", "ObjectType = Image\n" + std::string(300, 'B') + " = 1\n" +
                             head.substr(19) + "ElementDataFile = LOCAL\n" + pixels);
  EXPECT_TRUE(contains(refusal(long_key), "300-byte field name"));
  // without '=' the name runs to the line's end (MetaIO then looks for '=' on the next lines)
  const std::string bare_key = mha(
      "barekey.mha", std::string(400, 'x') + "\n" + head + "ElementDataFile = LOCAL\n" + pixels);
  EXPECT_TRUE(contains(refusal(bare_key), "400-byte field name"));
  const std::string ndims = mha("ndims.mha", "ObjectType = Image\nNDims = 3111111111111\n" +
                                                 head.substr(29) + "ElementDataFile = LOCAL\n");
  EXPECT_TRUE(contains(refusal(ndims), "NDims"));
  EXPECT_TRUE(
      contains(refusal(mha("ndims0.mha", "NDims = 0\nElementDataFile = LOCAL\n")), "NDims"));
  EXPECT_TRUE(
      contains(refusal(mha("ndimsexp.mha", "NDims = 1e9\nElementDataFile = LOCAL\n")), "NDims"));
  // Well-formed slice lists (one 4-byte row per file), which MetaIO would read.
  for (int i = 1; i <= 4; ++i) spit(tmp.path() / ("slice" + std::to_string(i) + ".raw"), "abcd");
  const std::string pattern = mha("pattern.mhd", head + "ElementDataFile = slice%d.raw 1 4 1\n");
  EXPECT_TRUE(contains(refusal(pattern), "'%' pattern"));
  const std::string list =
      mha("list.mhd",
          head + "ElementDataFile = LIST\nslice1.raw\nslice2.raw\nslice3.raw\nslice4.raw\n");
  EXPECT_TRUE(contains(refusal(list), "LIST"));
}

// A bounded random-mutation run over every reader (the fuzz targets go further, outside the
// suite): seeded byte flips and truncations of small valid files either read or throw
// concord::Error naming the file; nothing else escapes, nothing aborts, memory stays bounded.
TEST(ImageIoUntrusted, RandomMutationsEitherReadOrThrowError) {
  testkit::TempDir tmp;
  std::vector<fs::path> seeds;
  for (const char* ext : {".nii", ".nii.gz", ".nrrd", ".mha", ".png", ".bmp", ".tif", ".jpg"}) {
    const fs::path f = tmp.path() / (std::string("seed") + ext);
    const bool flat = std::string(ext) == ".png" || std::string(ext) == ".bmp" ||
                      std::string(ext) == ".tif" || std::string(ext) == ".jpg";
    write_image(ramp({12, 10, flat ? 1 : 4}, flat ? PixelType::U8 : PixelType::I16), f.string());
    seeds.push_back(f);
  }
  if (fs::exists(kPydicom / "CT_small.dcm")) seeds.push_back(kPydicom / "CT_small.dcm");
  std::mt19937_64 rng(8);
  const long before = peak_rss_mib();
  int read = 0, refused = 0;
  for (const auto& seed : seeds) {
    const std::string bytes = slurp(seed);
    const fs::path mutant = tmp.path() / ("mutant" + seed.filename().string().substr(4));
    for (int k = 0; k < 60; ++k) {
      std::string b = bytes;
      if (k % 5 == 4) {
        b.resize(rng() % b.size());
      } else {
        for (int n = 1 + int(rng() % 6); n > 0; --n) {
          // Headers are where lengths live: most flips land in the first 600 bytes.
          const size_t at =
              (rng() % 3 ? rng() % std::min<size_t>(600, b.size()) : rng() % b.size());
          b[at] = char(rng() % 4 ? rng() : (rng() % 2 ? 0xFF : 0x7F));
        }
      }
      spit(mutant, b);
      ReadOptions opt;  // a low ceiling: what a mutant may allocate stays small
      opt.non_finite = NonFinite::Zero;
      opt.max_bytes = size_t(32) << 20;
      try {
        read_image(mutant.string(), opt);
        ++read;
      } catch (const Error& e) {
        ++refused;
        EXPECT_NE(std::string(e.what()).find(mutant.string()), std::string::npos) << e.what();
      } catch (const std::exception& e) {
        ADD_FAILURE() << seed << " mutant " << k << ": " << typeid(e).name() << ": " << e.what();
      }
      if (peak_rss_mib() - before >= 160) {
        ADD_FAILURE() << seed << " mutant " << k << " raised the peak memory by "
                      << peak_rss_mib() - before << " MiB";
        break;
      }
    }
  }
  EXPECT_GT(refused, 0);
  EXPECT_LT(peak_rss_mib() - before, 160) << read << " read, " << refused << " refused";
}
