// fuzz_make_seeds OUT: small valid inputs for every fuzz target, written by Concord's own
// writers into OUT/<target>/ (scripts/fuzz adds the pipelines, npz and real DICOM seeds).
#include <concord/durable_output.h>
#include <concord/harmonizer.h>
#include <concord/image_io.h>
#include <concord/message.h>

#include <filesystem>
#include <iostream>

namespace fs = std::filesystem;
using namespace concord;

// Linked with libFuzzer's runtime for the instrumented code's trace-cmp callbacks; never called.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) {
  return 0;
}

static Image image(int dim, int channels, std::array<int64_t, 3> size, PixelType t) {
  Image im(dim, channels, size);
  for (size_t i = 0; i < im.data.size(); ++i) im.data[i] = float((i * 37) % 200);
  im.pixel_type = t;
  return im;
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: fuzz_make_seeds OUT\n";
    return 2;
  }
  const fs::path out = argv[1];
  for (const char* d : {"message", "stats", "nifti", "nrrd", "mha", "dicom", "png"})
    fs::create_directories(out / d);

  Message m;
  m.type = "update";
  m.round = 3;
  m.site = "site-a";
  m.arrays["conv.weight"] = Array::from(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3});
  m.arrays["bn.count"] = Array::from(std::vector<int64_t>{7});
  m.scalars["num_samples"] = 12;
  m.text["note"] = "seed";
  Bytes b = encode(m);
  write_file_atomic((out / "message/update.msg").string(), b->data(), b->size());
  write_file_atomic((out / "message/empty.msg").string(), encode(Message{})->data(),
                    encode(Message{})->size());

  Stats s;
  s.arrays["mean"] = Array::from(std::vector<double>{0.5, 1.5, 2.5, 3.5});
  s.scalars["count"] = 3;
  s.weight = 2;
  save_stats(s, (out / "stats/zscore.stats").string(), "zscore");

  const Image vol = image(3, 1, {6, 5, 4}, PixelType::I16);
  const Image slice = image(2, 1, {8, 6, 1}, PixelType::F32);
  write_image(vol, (out / "nifti/vol.nii").string());
  write_image(slice, (out / "nifti/slice.nii").string());
  write_image(vol, (out / "nrrd/vol.nrrd").string());
  write_image(image(2, 3, {4, 4, 1}, PixelType::U8), (out / "nrrd/rgb.nrrd").string());
  write_image(vol, (out / "mha/vol.mha").string());
  write_image(slice, (out / "mha/slice.mha").string());
  write_image(image(2, 1, {12, 10, 1}, PixelType::U8), (out / "png/grey.png").string());
  write_image(image(2, 3, {6, 6, 1}, PixelType::U8), (out / "png/rgb.png").string());
  write_image(image(2, 1, {5, 5, 1}, PixelType::U16), (out / "png/grey16.png").string());
  // DICOM is written as a series folder; every file of it is a single-file seed.
  const fs::path series = out / "dicom-series";
  write_image(image(3, 1, {6, 6, 2}, PixelType::I16), series.string());
  int k = 0;
  for (const auto& e : fs::directory_iterator(series))
    fs::copy_file(e.path(), out / "dicom" / ("series-" + std::to_string(k++) + ".dcm"));
  fs::remove_all(series);
  std::cout << "fuzz_make_seeds: wrote seeds under " << out.string() << "\n";
  return 0;
}
