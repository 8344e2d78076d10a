// Durable output (concord/durable_output.h): what appears under a final name is complete, a
// failed write leaves the old output and no temporary, a folder is replaced as a whole.
#include <concord/durable_output.h>
#include <concord/error.h>

#include <sys/resource.h>

#include <csignal>
#include <fstream>
#include <iterator>
#include <mutex>
#include <vector>

#include "testing.h"

using namespace concord;
namespace fs = std::filesystem;

namespace {

std::string slurp(const fs::path& f) {
  std::ifstream in(f, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

void put(const fs::path& f, const std::string& text) {
  fs::create_directories(f.parent_path());
  std::ofstream(f, std::ios::binary) << text;
}

// Every entry below `dir` (relative paths, sorted), hidden ones included.
std::vector<std::string> tree(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    out.push_back(fs::relative(e.path(), dir).string());
  std::sort(out.begin(), out.end());
  return out;
}

// Files may grow to `bytes` only while this lives (write() then fails with EFBIG, as on a full
// disk); SIGXFSZ is ignored so that the failure is an error, not the end of the process.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    getrlimit(RLIMIT_FSIZE, &old_);
    old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
    rlimit l = old_;
    l.rlim_cur = bytes;
    setrlimit(RLIMIT_FSIZE, &l);
  }
  ~FileSizeLimit() {
    setrlimit(RLIMIT_FSIZE, &old_);
    std::signal(SIGXFSZ, old_handler_);
  }

 private:
  rlimit old_{};
  void (*old_handler_)(int);
};

}  // namespace

TEST(WriteFileAtomic, WritesTheContentAndReplacesTheOldFile) {
  testkit::TempDir dir;
  const fs::path f = dir.path() / "sub" / "out.txt";  // missing folders are made
  write_file_atomic(f.string(), std::string("hello"));
  EXPECT_EQ(slurp(f), "hello");
  const std::string big(3 << 20, 'x');
  write_file_atomic(f.string(), big.data(), big.size());
  EXPECT_EQ(slurp(f), big);
  write_file_atomic(f.string(), std::string());
  EXPECT_TRUE(fs::exists(f));
  EXPECT_EQ(fs::file_size(f), 0u);
  EXPECT_EQ(tree(dir.path() / "sub"), std::vector<std::string>{"out.txt"});
}

// A write that fails half-way (the file system refuses more bytes) throws naming the file,
// leaves the existing output as it was and removes its temporary.
TEST(WriteFileAtomic, FailedWriteLeavesTheOldFileAndNoTemporary) {
  testkit::TempDir dir;
  const fs::path f = dir.path() / "model.state";
  write_file_atomic(f.string(), std::string("the old state"));
  const std::string big(1 << 20, 'n');
  std::string error;
  {
    FileSizeLimit limit(64 << 10);
    error = testkit::error_of([&] { write_file_atomic(f.string(), big.data(), big.size()); });
  }
  EXPECT_NE(error.find(f.string()), std::string::npos) << error;
  EXPECT_NE(error.find("File too large"), std::string::npos) << error;
  EXPECT_EQ(slurp(f), "the old state");
  EXPECT_EQ(tree(dir.path()), std::vector<std::string>{"model.state"});
}

TEST(WriteFileAtomic, RefusesATargetItCannotReplace) {
  testkit::TempDir dir;
  // The target is a folder: the rename fails, the folder and its content stay.
  put(dir.path() / "out" / "keep.txt", "kept");
  std::string e = testkit::error_of([&] { write_file_atomic((dir.path() / "out").string(), "x"); });
  EXPECT_NE(e.find((dir.path() / "out").string()), std::string::npos) << e;
  EXPECT_EQ(slurp(dir.path() / "out" / "keep.txt"), "kept");
  // The parent is a file.
  put(dir.path() / "file", "f");
  e = testkit::error_of([&] { write_file_atomic((dir.path() / "file" / "x").string(), "x"); });
  EXPECT_NE(e.find((dir.path() / "file").string()), std::string::npos) << e;
  EXPECT_EQ(tree(dir.path()), (std::vector<std::string>{"file", "out", "out/keep.txt"}));
}

TEST(CopyAtomic, CopiesAFileOverAnOldOne) {
  testkit::TempDir dir;
  const std::string bytes = std::string("mask\0data", 9) + std::string(2 << 20, '\7');
  put(dir.path() / "in" / "mask.nii.gz", bytes);
  put(dir.path() / "out" / "mask.nii.gz", "old");
  copy_atomic((dir.path() / "in" / "mask.nii.gz").string(),
              (dir.path() / "out" / "mask.nii.gz").string());
  EXPECT_EQ(slurp(dir.path() / "out" / "mask.nii.gz"), bytes);
  EXPECT_EQ(tree(dir.path() / "out"), std::vector<std::string>{"mask.nii.gz"});
  // A missing source or a device: an error naming it, the old copy untouched.
  std::string e = testkit::error_of([&] {
    copy_atomic((dir.path() / "in" / "gone.nii.gz").string(),
                (dir.path() / "out" / "mask.nii.gz").string());
  });
  EXPECT_NE(e.find("gone.nii.gz"), std::string::npos) << e;
  e = testkit::error_of([&] { copy_atomic("/dev/null", (dir.path() / "out" / "x").string()); });
  EXPECT_NE(e.find("not a regular file"), std::string::npos) << e;
  EXPECT_EQ(slurp(dir.path() / "out" / "mask.nii.gz"), bytes);
  EXPECT_EQ(tree(dir.path() / "out"), std::vector<std::string>{"mask.nii.gz"});
}

// A folder (a DICOM mask series) replaces the old one as a whole: no file of the old series
// survives beside the new ones, and nothing else is left behind.
TEST(CopyAtomic, ReplacesAFolderAsAWhole) {
  testkit::TempDir dir;
  put(dir.path() / "in" / "series" / "1.dcm", "one");
  put(dir.path() / "in" / "series" / "sub" / "2.dcm", "two");
  put(dir.path() / "out" / "series" / "old.dcm", "old");
  copy_atomic((dir.path() / "in" / "series").string(), (dir.path() / "out" / "series").string());
  EXPECT_EQ(tree(dir.path() / "out"),
            (std::vector<std::string>{"series", "series/1.dcm", "series/sub", "series/sub/2.dcm"}));
  EXPECT_EQ(slurp(dir.path() / "out" / "series" / "sub" / "2.dcm"), "two");
  // A trailing slash names the same folder.
  copy_atomic((dir.path() / "in" / "series").string(),
              (dir.path() / "out" / "again").string() + "/");
  EXPECT_EQ(slurp(dir.path() / "out" / "again" / "1.dcm"), "one");
}

TEST(ScratchFolder, PublishesFilesAndLeavesNothingWhenAbandoned) {
  testkit::TempDir dir;
  const fs::path target = dir.path() / "out" / "image.mhd";
  put(target, "old header");
  {
    ScratchFolder s(target);
    EXPECT_EQ(s.path().parent_path(), target.parent_path());
    EXPECT_TRUE(is_temporary_name(s.path().filename().string())) << s.path();
    s.write("image.mhd", "header", 6);
    s.write("image.raw", "voxels", 6);
    EXPECT_EQ(slurp(target), "old header");  // nothing visible before publishing
    s.publish_files();
  }
  EXPECT_EQ(slurp(target), "header");
  EXPECT_EQ(slurp(dir.path() / "out" / "image.raw"), "voxels");
  EXPECT_EQ(tree(dir.path() / "out"), (std::vector<std::string>{"image.mhd", "image.raw"}));
  {
    ScratchFolder s(target);  // written, never published (the writer failed)
    s.write("image.mhd", "half", 4);
  }
  EXPECT_EQ(slurp(target), "header");
  EXPECT_EQ(tree(dir.path() / "out"), (std::vector<std::string>{"image.mhd", "image.raw"}));
}

TEST(ScratchFolder, PublishFolderReplacesTheOldFolder) {
  testkit::TempDir dir;
  const fs::path target = dir.path() / "series";
  put(target / "old-1.dcm", "a");
  put(target / "old-2.dcm", "b");
  {
    ScratchFolder s(target);
    fs::create_directory(s.path() / "new");
    put(s.path() / "new" / "new-1.dcm", "c");
    s.publish_folder("new");
    EXPECT_EQ(tree(target), std::vector<std::string>{"new-1.dcm"});
  }
  EXPECT_EQ(tree(dir.path()), (std::vector<std::string>{"series", "series/new-1.dcm"}));
  // Without an old folder as well.
  ScratchFolder s(dir.path() / "fresh");
  fs::create_directory(s.path() / "new");
  put(s.path() / "new" / "x.dcm", "x");
  s.publish_folder("new");
  EXPECT_EQ(slurp(dir.path() / "fresh" / "x.dcm"), "x");
}

TEST(OutputPublisher, RunsStepsInOrderAndReportsFailures) {
  testkit::TempDir dir;
  std::mutex m;
  std::vector<std::pair<std::string, std::string>> done;
  OutputPublisher publisher(
      [&](const std::string& path, const std::string& error) {
        std::lock_guard<std::mutex> lock(m);
        done.push_back({path, error});
      },
      2);
  for (int i = 0; i < 6; ++i) {
    auto s = std::make_shared<ScratchFolder>(dir.path() / ("f" + std::to_string(i)));
    s->write("f" + std::to_string(i), "x", 1);
    if (i == 3)  // a step that fails: reported for its path, the others go on
      publish_output(s, &publisher, [](const ScratchFolder&) { throw Error("disk on fire"); });
    else
      publish_output(s, &publisher);
  }
  publisher.finish();
  ASSERT_EQ(done.size(), 6u);
  for (int i = 0; i < 6; ++i) {
    const std::string path = (dir.path() / ("f" + std::to_string(i))).string();
    EXPECT_EQ(done[size_t(i)].first, path);
    EXPECT_EQ(done[size_t(i)].second, i == 3 ? "disk on fire" : "") << path;
    EXPECT_EQ(fs::exists(path), i != 3) << path;
  }
  // Scratch folders are gone once their step ran, whether it worked or not.
  EXPECT_EQ(tree(dir.path()), (std::vector<std::string>{"f0", "f1", "f2", "f4", "f5"}));
  EXPECT_NE(testkit::error_of([&] { publisher.submit("late", [] {}); }).find("already finished"),
            std::string::npos);
}

TEST(DurableOutput, TemporaryNames) {
  EXPECT_TRUE(is_temporary_name(".out.nii.gz.concord-tmp-123-4"));
  EXPECT_TRUE(is_temporary_name("manifest.csv.tmp-4242-981723"));  // an older version's
  EXPECT_FALSE(is_temporary_name("scan.tmp-reading.nii.gz"));
  EXPECT_FALSE(is_temporary_name("case.tmp-"));
  EXPECT_FALSE(is_temporary_name("image.nii.gz"));
}
