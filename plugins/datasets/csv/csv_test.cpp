#include <concord/dataset.h>
#include <concord/durable_output.h>
#include <concord/image_io.h>
#include <concord/message.h>

#include <filesystem>
#include <functional>

#include "testing.h"

using namespace concord;
namespace fs = std::filesystem;

namespace {

std::unique_ptr<Dataset> make(const std::map<std::string, Value>& given) {
  return testkit::make_plugin<Dataset>(Kind::Dataset, "csv", given);
}

using testkit::error_of;

void write_png(const fs::path& p, int base, bool mask = false) {
  fs::create_directories(p.parent_path());
  Image img(2, 1, {8, 6, 1});
  img.pixel_type = PixelType::U8;
  for (int y = 0; y < 6; ++y)
    for (int x = 0; x < 8; ++x) img.at(x, y) = mask ? (x < 4 ? 255.f : 0.f) : float(base + x);
  write_image(img, p.string());
}

}  // namespace

TEST(Csv, ClassificationManifestWithNamedLabels) {
  testkit::TempDir dir;
  for (int i = 0; i < 4; ++i) write_png(dir.path() / "img" / ("p" + std::to_string(i) + ".png"), i);
  const std::string csv = dir.str() + "/manifest.csv";
  write_file_atomic(csv, std::string("path,label,site,split\n"
                                     "img/p0.png,normal,north,train\n"
                                     "img/p1.png,tumour,north,train\n"
                                     "\"img/p2.png\",tumour,south,train\n"
                                     "img/p3.png,normal,south,test\n"));
  auto fed = make({{"file", make_value(csv)}})->load({1, {}});
  EXPECT_EQ(fed.task, Task::Classification);
  EXPECT_EQ(fed.num_classes, 2);
  ASSERT_EQ(fed.sites.size(), 2u);
  EXPECT_EQ(fed.sites[0].name, "north");
  EXPECT_EQ(fed.sites[0].train.size(), 2u);
  EXPECT_EQ(fed.sites[0].train[1].label, 1);  // sorted names: normal = 0, tumour = 1
  EXPECT_EQ(fed.sites[1].test.size(), 1u);
  EXPECT_EQ(fed.sites[1].test[0].label, 0);
  auto south = make({{"file", make_value(csv)}})->load({1, {"south"}});
  ASSERT_EQ(south.sites.size(), 1u);
  EXPECT_EQ(south.sites[0].train.size(), 1u);
}

TEST(Csv, SegmentationManifest) {
  testkit::TempDir dir;
  write_png(dir.path() / "a.png", 0);
  write_png(dir.path() / "a_mask.png", 0, true);
  const std::string csv = dir.str() + "/m.csv";
  write_file_atomic(
      csv,
      std::string("site,split,path,mask\nS,train,a.png,a_mask.png\nS,test,a.png,a_mask.png\n"));
  auto fed = make({{"file", make_value(csv)}, {"size", make_value(int64_t(4))}})->load({1, {}});
  EXPECT_EQ(fed.task, Task::Segmentation);
  EXPECT_EQ(fed.sites[0].train[0].mask->at(0, 0), 1.f);
  EXPECT_EQ(fed.sites[0].train[0].mask->at(3, 0), 0.f);
  EXPECT_EQ(fed.sites[0].train[0].image.size[0], 4);
}

TEST(Csv, ErrorsNameFileAndLine) {
  testkit::TempDir dir;
  write_png(dir.path() / "a.png", 0);
  const std::string csv = dir.str() + "/bad.csv";
  write_file_atomic(csv,
                    std::string("path,label,site,split\na.png,0,S,train\nmissing.png,1,S,train\n"));
  std::string e = error_of([&] { make({{"file", make_value(csv)}})->load({1, {}}); });
  EXPECT_NE(e.find("bad.csv:3"), std::string::npos) << e;
  EXPECT_NE(e.find("missing.png"), std::string::npos) << e;

  write_file_atomic(csv, std::string("path,label,site,split\na.png,0,S,validation\n"));
  e = error_of([&] { make({{"file", make_value(csv)}})->load({1, {}}); });
  EXPECT_NE(e.find("bad.csv:2"), std::string::npos) << e;
  EXPECT_NE(e.find("validation"), std::string::npos) << e;

  write_file_atomic(csv, std::string("path,site,split\na.png,S,train\n"));
  e = error_of([&] { make({{"file", make_value(csv)}})->load({1, {}}); });
  EXPECT_NE(e.find("bad.csv:1"), std::string::npos) << e;
}

TEST(Csv, MultisiteProstateManifest) {
  CONCORD_REQUIRE_SHARED_DATA("multisite-prostate");
  testkit::TempDir dir;
  const std::string root = testkit::shared_data() + "/multisite-prostate";
  std::string text = "path,mask,site,split\n";
  for (std::string site : {"BMC", "UCL"})
    for (std::string split : {"train", "test"})
      text += root + "/" + site + "/" + split + "/image/00_00.png," + root + "/" + site + "/" +
              split + "/mask/00_00.png," + site + "," + split + "\n";
  const std::string csv = dir.str() + "/prostate.csv";
  write_file_atomic(csv, text);
  auto fed = make({{"file", make_value(csv)},
                   {"mask_values", make_value(std::vector<std::string>{"255", "0"})},
                   {"size", make_value(int64_t(64))}})
                 ->load({1, {}});
  ASSERT_EQ(fed.sites.size(), 2u);
  EXPECT_EQ(fed.num_classes, 2);
  double prostate = 0;
  for (float v : fed.sites[1].test[0].mask->data) prostate += v;
  EXPECT_GT(prostate, 0);
}
