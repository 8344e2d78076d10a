#include <concord/dataset.h>
#include <concord/image_io.h>

#include <cmath>
#include <filesystem>
#include <functional>

#include "testing.h"

using namespace concord;
namespace fs = std::filesystem;

namespace {

std::unique_ptr<Dataset> make(const std::map<std::string, Value>& given) {
  return testkit::make_plugin<Dataset>(Kind::Dataset, "folder", given);
}

using testkit::error_of;

// An 8-bit grey image w x h: value = base + x; or a mask with 255 in the left half.
void write_png(const fs::path& p, int w, int h, int base, bool mask = false) {
  fs::create_directories(p.parent_path());
  Image img(2, 1, {w, h, 1});
  img.pixel_type = PixelType::U8;
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) img.at(x, y) = mask ? (x < w / 2 ? 255.f : 0.f) : float(base + x);
  write_image(img, p.string());
}

// root/{A,B}/{train,test}/{image,mask}/s.png; site B's images are `b_size` wide.
std::string tiny_tree(const testkit::TempDir& dir, int b_size = 8) {
  const fs::path root = dir.path() / "tree";
  for (std::string site : {"A", "B"})
    for (std::string split : {"train", "test"}) {
      const int w = site == "A" ? 8 : b_size;
      write_png(root / site / split / "image" / "s1.png", w, 6, 10);
      write_png(root / site / split / "mask" / "s1.png", w, 6, 0, true);
      write_png(root / site / split / "image" / "s2.png", w, 6, 50);
      write_png(root / site / split / "mask" / "s2.png", w, 6, 0, true);
    }
  return root.string();
}

}  // namespace

TEST(Folder, SegmentationTreeWithDefaultsAndMaskValues) {
  testkit::TempDir dir;
  const std::string root = tiny_tree(dir);
  auto fed = make({{"root", make_value(root)}})->load({1, {}});
  EXPECT_EQ(fed.task, Task::Segmentation);
  ASSERT_EQ(fed.sites.size(), 2u);
  EXPECT_EQ(fed.sites[0].name, "A");
  EXPECT_EQ(fed.num_classes, 2);
  ASSERT_EQ(fed.sites[1].train.size(), 2u);
  const Sample& s = fed.sites[0].train[0];
  EXPECT_NE(s.id.find("s1.png"), std::string::npos);
  // minmax: base + x over x = 0..7 -> x / 7
  EXPECT_FLOAT_EQ(s.image.at(7, 2), 1.0f);
  EXPECT_FLOAT_EQ(s.image.at(0, 2), 0.0f);
  EXPECT_NEAR(s.image.at(3, 2), 3 / 7.0, 1e-6);
  // default: {0, 255} -> {0, 1}
  EXPECT_EQ(s.mask->at(0, 0), 1.0f);
  EXPECT_EQ(s.mask->at(7, 0), 0.0f);

  auto inv = make({{"root", make_value(root)},
                   {"mask_values", make_value(std::vector<std::string>{"255", "0"})},
                   {"normalize", make_value("type")},
                   {"sites", make_value(std::vector<std::string>{"B"})}})
                 ->load({1, {}});
  ASSERT_EQ(inv.sites.size(), 1u);
  EXPECT_EQ(inv.sites[0].name, "B");
  EXPECT_EQ(inv.sites[0].train[0].mask->at(0, 0), 0.0f);  // 255 -> class 0
  EXPECT_EQ(inv.sites[0].train[0].mask->at(7, 0), 1.0f);  // 0 -> class 1
  EXPECT_FLOAT_EQ(inv.sites[0].train[1].image.at(2, 0), 52 / 255.0f);

  const std::string e = error_of([&] {
    make({{"root", make_value(root)}, {"mask_values", make_value(std::vector<std::string>{"255"})}})
        ->load({1, {}});
  });
  EXPECT_NE(e.find("s1.png"), std::string::npos) << e;
  EXPECT_NE(e.find("mask_values"), std::string::npos) << e;
}

TEST(Folder, MixedSizesNeedTheSizeArgument) {
  testkit::TempDir dir;
  const std::string root = tiny_tree(dir, 12);
  const std::string e = error_of([&] { make({{"root", make_value(root)}})->load({1, {}}); });
  EXPECT_NE(e.find("size"), std::string::npos) << e;
  EXPECT_NE(e.find("'B'"), std::string::npos) << e;
  auto fed = make({{"root", make_value(root)},
                   {"size", make_value(int64_t(16))},
                   {"channels", make_value(int64_t(3))}})
                 ->load({1, {}});
  for (const auto& site : fed.sites)
    for (const auto& s : site.train) {
      EXPECT_EQ(s.image.size[0], 16);
      EXPECT_EQ(s.image.size[1], 16);
      EXPECT_EQ(s.image.channels, 3);
      EXPECT_EQ(s.mask->size[0], 16);
      for (float v : s.mask->data) EXPECT_TRUE(v == 0.f || v == 1.f);  // nearest, no blends
    }
  EXPECT_EQ(fed.channels, 3);
}

TEST(Folder, MissingMaskErrorOrSkip) {
  testkit::TempDir dir;
  const std::string root = tiny_tree(dir);
  write_png(fs::path(root) / "A" / "train" / "image" / "orphan.png", 8, 6, 0);
  const std::string e = error_of([&] { make({{"root", make_value(root)}})->load({1, {}}); });
  EXPECT_NE(e.find("orphan.png"), std::string::npos) << e;
  auto fed =
      make({{"root", make_value(root)}, {"missing_mask", make_value("skip")}})->load({1, {}});
  EXPECT_EQ(fed.sites[0].train.size(), 2u);
  EXPECT_EQ(fed.notes.at("folder.skipped_without_mask"), "1");
}

TEST(Folder, VolumesAreSlicedAxially) {
  testkit::TempDir dir;
  const fs::path root = dir.path() / "vol";
  Image vol(3, 1, {6, 5, 4}), mask(3, 1, {6, 5, 4});
  for (int z = 0; z < 4; ++z)
    for (int y = 0; y < 5; ++y)
      for (int x = 0; x < 6; ++x) {
        vol.at(x, y, z) = float(100 * z + x);
        mask.at(x, y, z) = x < 2 ? 1.f : 0.f;
      }
  vol.pixel_type = PixelType::I16;
  mask.pixel_type = PixelType::U8;
  for (std::string split : {"train", "test"}) {
    fs::create_directories(root / "S" / split / "image");
    fs::create_directories(root / "S" / split / "mask");
    write_image(vol, (root / "S" / split / "image" / "v.nii.gz").string());
    write_image(mask, (root / "S" / split / "mask" / "v.nii.gz").string());
  }
  auto center = make({{"root", make_value(root.string())}})->load({1, {}});
  ASSERT_EQ(center.sites[0].train.size(), 1u);
  EXPECT_NE(center.sites[0].train[0].id.find("#z=2"), std::string::npos);
  EXPECT_EQ(center.sites[0].train[0].image.dim, 2);
  EXPECT_EQ(center.sites[0].train[0].mask->at(1, 3), 1.f);
  auto all = make({{"root", make_value(root.string())},
                   {"slices", make_value("all")},
                   {"normalize", make_value("none")}})
                 ->load({1, {}});
  ASSERT_EQ(all.sites[0].train.size(), 4u);
  EXPECT_FLOAT_EQ(all.sites[0].train[3].image.at(5, 0), 305.f);
}

TEST(Folder, ClassificationLayout) {
  testkit::TempDir dir;
  const fs::path root = dir.path() / "cls";
  for (std::string site : {"H1", "H2"})
    for (std::string split : {"train", "test"}) {
      write_png(root / site / split / "normal" / "a.png", 8, 8, 0);
      write_png(root / site / split / "tumour" / "b.png", 8, 8, 0);
      write_png(root / site / split / "tumour" / "c.png", 8, 8, 0);
    }
  auto fed = make({{"root", make_value(root.string())}, {"task", make_value("classification")}})
                 ->load({1, {}});
  EXPECT_EQ(fed.task, Task::Classification);
  EXPECT_EQ(fed.num_classes, 2);
  ASSERT_EQ(fed.sites[0].train.size(), 3u);
  EXPECT_EQ(fed.sites[0].train[0].label, 0);
  EXPECT_EQ(fed.sites[0].train[2].label, 1);
  EXPECT_FALSE(fed.sites[0].train[0].mask.has_value());
  auto ordered = make({{"root", make_value(root.string())},
                       {"task", make_value("classification")},
                       {"classes", make_value(std::vector<std::string>{"tumour", "normal"})}})
                     ->load({1, {}});
  EXPECT_EQ(ordered.sites[0].train[0].label, 0);  // tumour listed first now
  EXPECT_NE(ordered.sites[0].train[0].id.find("tumour"), std::string::npos);
}

TEST(Folder, MultisiteProstate) {
  CONCORD_REQUIRE_SHARED_DATA("multisite-prostate");
  const std::string root = testkit::shared_data() + "/multisite-prostate";
  const std::string e = error_of([&] { make({{"root", make_value(root)}})->load({1, {}}); });
  EXPECT_NE(e.find("I2CVB/train/image/00_01.png"), std::string::npos) << e;
  auto fed =
      make({{"root", make_value(root)},
            {"sites", make_value(std::vector<std::string>{"BIDMC", "BMC", "HK", "RUNMC", "UCL"})},
            {"mask_values", make_value(std::vector<std::string>{"255", "0"})},
            {"size", make_value(int64_t(96))}})
          ->load({1, {}});
  ASSERT_EQ(fed.sites.size(), 5u);
  EXPECT_EQ(fed.num_classes, 2);
  for (const auto& site : fed.sites) {
    ASSERT_EQ(site.train.size(), 1u);
    double prostate = 0;
    for (float v : site.train[0].mask->data) prostate += v == 1.f;
    prostate /= site.train[0].mask->data.size();
    // 0 = prostate after inversion: a small organ, not the background
    EXPECT_GT(prostate, 0.002) << site.name;
    EXPECT_LT(prostate, 0.3) << site.name;
  }
}

TEST(Folder, MultisiteFundus) {
  CONCORD_REQUIRE_SHARED_DATA("multisite-fundus");
  auto fed = make({{"root", make_value(testkit::shared_data() + "/multisite-fundus")},
                   {"image_dir", make_value("ROIs/image")},
                   {"mask_dir", make_value("ROIs/mask")},
                   {"mask_values", make_value(std::vector<std::string>{"255", "128", "0"})},
                   {"size", make_value(int64_t(64))}})
                 ->load({1, {}});
  ASSERT_EQ(fed.sites.size(), 4u);
  EXPECT_EQ(fed.num_classes, 3);
  EXPECT_EQ(fed.channels, 3);
  for (const auto& site : fed.sites) {
    int counts[3] = {0, 0, 0};
    for (float v : site.train[0].mask->data) counts[int(v)]++;
    EXPECT_GT(counts[0], counts[1]) << site.name;  // background largest
    EXPECT_GT(counts[1], 0) << site.name;          // disc present
    EXPECT_GT(counts[2], 0) << site.name;          // cup present
  }
}

// A symlink loop or an unreadable entry in the tree is skipped and named (notes and log); the
// other images still load.
TEST(Folder, SymlinkLoopsAreSkippedAndReported) {
  testkit::TempDir dir;
  const fs::path root = dir.path() / "cls";
  for (std::string split : {"train", "test"}) {
    write_png(root / "H1" / split / "normal" / "a.png", 8, 8, 0);
    write_png(root / "H1" / split / "tumour" / "b.png", 8, 8, 0);
  }
  fs::create_symlink("self.png", root / "H1" / "train" / "normal" / "self.png");  // a loop
  fs::create_directory_symlink("..", root / "H1" / "train" / "tumour" / "up");
  fs::create_symlink("loop", root / "loop");
  auto fed = make({{"root", make_value(root.string())}, {"task", make_value("classification")}})
                 ->load({1, {}});
  ASSERT_EQ(fed.sites.size(), 1u);
  EXPECT_EQ(fed.sites[0].train.size(), 2u);
  const std::string skipped = fed.notes["folder.skipped_entries"];
  EXPECT_NE(skipped.find("self.png"), std::string::npos) << skipped;
  EXPECT_NE(skipped.find("cls/loop"), std::string::npos) << skipped;
}

// NaN voxels refuse the file by name unless non_finite: zero; grey stored as RGB is grey, and a
// grey image joins a colour set as 3 channels.
TEST(Folder, NonFiniteAndChannelPolicies) {
  testkit::TempDir dir;
  const fs::path root = dir.path() / "cls";
  for (std::string split : {"train", "test"})
    write_png(root / "H1" / split / "a" / "grey.png", 8, 8, 0);
  Image grey3(2, 3, {8, 8, 1});
  grey3.pixel_type = PixelType::U8;
  for (int64_t i = 0; i < 64; ++i)
    for (int c = 0; c < 3; ++c) grey3.channel(c)[i] = float(i);
  write_image(grey3, (root / "H1" / "train" / "a" / "rgb_grey.png").string());
  auto fed = make({{"root", make_value(root.string())}, {"task", make_value("classification")}})
                 ->load({1, {}});
  EXPECT_EQ(fed.channels, 1);
  ASSERT_EQ(fed.sites[0].train.size(), 2u);
  EXPECT_EQ(fed.sites[0].train[1].image.channels, 1);

  Image colour = grey3;
  colour.channel(2)[5] = 200.f;
  write_image(colour, (root / "H1" / "train" / "a" / "zcolour.png").string());
  fed = make({{"root", make_value(root.string())}, {"task", make_value("classification")}})
            ->load({1, {}});
  EXPECT_EQ(fed.channels, 3);
  for (const auto& s : fed.sites[0].train) EXPECT_EQ(s.image.channels, 3) << s.id;

  Image nan(2, 1, {8, 8, 1});
  nan.pixel_type = PixelType::F32;
  nan.data[7] = std::nanf("");
  const fs::path bad = root / "H1" / "test" / "a" / "nan.tif";
  write_image(nan, bad.string(), false);
  const std::string e = error_of([&] {
    make({{"root", make_value(root.string())}, {"task", make_value("classification")}})
        ->load({1, {}});
  });
  EXPECT_NE(e.find(bad.string()), std::string::npos) << e;
  EXPECT_NE(e.find("not finite"), std::string::npos) << e;
  fed = make({{"root", make_value(root.string())},
              {"task", make_value("classification")},
              {"non_finite", make_value("zero")}})
            ->load({1, {}});
  EXPECT_EQ(fed.sites[0].test.size(), 2u);
}
