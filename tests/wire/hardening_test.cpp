// Bytes from files and peers are untrusted: sizes are checked (overflow, ceiling) before anything
// is allocated, and encoded bytes never carry an earlier message's memory.
#include <concord/channel.h>
#include <concord/checked.h>
#include <concord/harmonizer.h>
#include <concord/message.h>
#include <concord/protocol.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>

#include "testing.h"

using namespace concord;

namespace {

constexpr int64_t kHuge = (int64_t(1) << 62) + 16;  // x4 bytes wraps to 64 in 64-bit arithmetic

// Sets an environment variable for the scope of a test.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    setenv(name, value, 1);
  }
  ~ScopedEnv() { had_ ? (void)setenv(name_, old_.c_str(), 1) : (void)unsetenv(name_); }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

// The offset of the first occurrence of `needle` in `b` (the test fails if absent).
size_t find_bytes(const Bytes& b, const std::string& needle) {
  const auto* begin = b->data();
  const auto* it = std::search(begin, begin + b->size(), needle.begin(), needle.end(),
                               [](uint8_t x, char y) { return x == uint8_t(y); });
  EXPECT_NE(it, begin + b->size()) << "not found in the encoded message";
  return size_t(it - begin);
}

// A message with one float array "w" of 16 values (64 bytes, no padding) whose dimension field
// is then overwritten with `dim`.
Bytes message_with_dim(int64_t dim, const std::string& type = protocol::kUpdate) {
  Message m;
  m.type = type;
  m.scalars[protocol::kWeight] = 1;
  m.arrays["w"] = Array::from(std::vector<float>(16, 1.f));
  Bytes b = encode(m);
  // name "w" (u32 length 1), dtype F32 (0), 1 dim (u32), then the dim as int64
  std::string field("\x01\0\0\0w\0\x01\0\0\0", 10);
  size_t at = find_bytes(b, field) + field.size();
  auto out = std::make_shared<Buffer>(b->size());
  std::memcpy(out->data(), b->data(), b->size());
  std::memcpy(out->data() + at, &dim, 8);
  return out;
}

void write_bytes(const std::string& file, const Bytes& b) {
  std::ofstream(file, std::ios::binary)
      .write(reinterpret_cast<const char*>(b->data()), std::streamsize(b->size()));
}

}  // namespace

// ---- class 3: size arithmetic that overflows ------------------------------------------------

TEST(Checked, ArithmeticThrowsInsteadOfWrapping) {
  EXPECT_EQ(checked_mul(size_t(6), 7, "x"), 42u);
  EXPECT_EQ(checked_add(int64_t(40), 2, "x"), 42);
  EXPECT_THROW(checked_mul(std::numeric_limits<size_t>::max() / 2, 3, "x"), Error);
  EXPECT_THROW(checked_add(std::numeric_limits<size_t>::max(), 1, "x"), Error);
  EXPECT_THROW(checked_mul(size_t(5), -1, "x"), Error);  // negative into unsigned
  EXPECT_EQ(checked_numel({2, 3, 4}, "a"), 24);
  EXPECT_EQ(checked_numel({}, "a"), 1);
  EXPECT_EQ(checked_nbytes(DType::F64, {3, 0}, "a"), 0u);
  std::string e = testkit::error_of([] { checked_nbytes(DType::F32, {kHuge}, "array w"); });
  EXPECT_NE(e.find("array w"), std::string::npos) << e;
  EXPECT_THROW(checked_numel({int64_t(1) << 32, int64_t(1) << 32}, "a"), Error);
  EXPECT_THROW(checked_numel({4, -1}, "a"), Error);
  EXPECT_THROW(size_limit_from_env("CONCORD_TEST_UNSET_LIMIT_XYZ", size_t(1) << 50), Error);
}

TEST(Checked, ArrayShapesAreCheckedWhenTheArrayIsMade) {
  EXPECT_THROW(Array(DType::F32, {kHuge}), Error);
  EXPECT_THROW(Array::uninitialized(DType::F32, {int64_t(1) << 40, int64_t(1) << 40}), Error);
  EXPECT_THROW(Array(DType::U8, {3, -2}), Error);
  float storage[16] = {};
  EXPECT_THROW(Array::view(DType::F32, {kHuge}, storage, nullptr), Error);
  Array ok = Array::view(DType::F32, {4, 4}, storage, nullptr);
  EXPECT_EQ(ok.numel(), 16);
  EXPECT_EQ(ok.nbytes(), 64u);
  // A shape that does not match the values would read or write past the storage.
  EXPECT_THROW(Array::from(std::vector<float>{1, 2, 3, 4}, {2}), Error);
  EXPECT_THROW(Array::from(std::vector<float>{1, 2}, {2, 2}), Error);
}

TEST(Checked, DecodeRefusesAShapeWhoseByteSizeOverflows) {
  EXPECT_EQ(decode(message_with_dim(16)).arrays.at("w").numel(), 16);  // the control
  // [2^62 + 16] float32 is 64 bytes in wrapped arithmetic: exactly the data the message holds.
  std::string e = testkit::error_of([] { decode(message_with_dim(kHuge)); });
  EXPECT_NE(e.find("array w"), std::string::npos) << e;
  EXPECT_NE(e.find("overflow"), std::string::npos) << e;
  EXPECT_THROW(decode(message_with_dim(-1)), Error);
  EXPECT_THROW(decode(message_with_dim(17)), Error);  // 68 bytes do not fit
}

// A peer chooses array names: control bytes in one reach the error text escaped (the fuzz
// finding message-overflowing-shape-accepted.msg has NULs in its name, and the refusal's reason
// was cut off at the first one), and a long name is shortened.
TEST(Checked, DecodeErrorsShowNamesFromTheBytesEscapedAndShortened) {
  for (const std::string& name : {std::string("\0\x1b[2Jw", 6), std::string(5000, 'n')}) {
    Message m;
    m.type = "update";
    m.arrays[name] = Array::from(std::vector<float>(16, 1.f));
    Bytes b = encode(m);
    // the name (u32 length, bytes), dtype F32 (0), 1 dim (u32), then the dim as int64
    std::string field(4, '\0');
    const uint32_t len = uint32_t(name.size());
    std::memcpy(&field[0], &len, 4);
    field += name + std::string("\0\x01\0\0\0", 5);
    const size_t at = find_bytes(b, field) + field.size();
    auto bad = std::make_shared<Buffer>(b->size());
    std::memcpy(bad->data(), b->data(), b->size());
    std::memcpy(bad->data() + at, &kHuge, 8);
    const std::string e = testkit::error_of([&] { decode(bad); });
    EXPECT_NE(e.find("overflow"), std::string::npos) << e;  // the reason is not cut off
    EXPECT_EQ(e.find('\0'), std::string::npos) << e;
    EXPECT_EQ(e.find('\x1b'), std::string::npos) << e;
    EXPECT_LT(e.size(), 400u) << e;
    if (name.size() == 6) {
      EXPECT_NE(e.find("array \\x00\\x1b[2Jw"), std::string::npos) << e;
    }
  }
}

TEST(Checked, StatisticsFileWithAnOverflowingShapeIsRefusedNamingTheFile) {
  testkit::TempDir dir;
  const std::string good = dir.str() + "/good.stats", bad = dir.str() + "/bad.stats";
  write_bytes(good, message_with_dim(16, protocol::kSetStatistics));
  EXPECT_EQ(load_stats(good).arrays.at("w").numel(), 16);
  write_bytes(bad, message_with_dim(kHuge, protocol::kSetStatistics));
  std::string e = testkit::error_of([&] { load_stats(bad); });
  EXPECT_NE(e.find(bad), std::string::npos) << e;
  EXPECT_NE(e.find("array w"), std::string::npos) << e;
}

// ---- class 2: memory allocated from what a file or message claims ---------------------------

TEST(Limits, ReadFileRefusesFoldersAndNonRegularFilesBeforeAllocating) {
  testkit::TempDir dir;
  std::string e = testkit::error_of([&] { read_file(dir.str()); });
  EXPECT_NE(e.find(dir.str()), std::string::npos) << e;
  EXPECT_NE(e.find("folder"), std::string::npos) << e;
  e = testkit::error_of([&] { load_stats(dir.str()); });
  EXPECT_NE(e.find("folder"), std::string::npos) << e;
  EXPECT_EQ(e.find("out of memory"), std::string::npos) << e;
  e = testkit::error_of([] { read_file("/dev/null"); });
  EXPECT_NE(e.find("not a regular file"), std::string::npos) << e;
  e = testkit::error_of([&] { read_file(dir.str() + "/missing.stats"); });
  EXPECT_NE(e.find("missing.stats"), std::string::npos) << e;
}

TEST(Limits, FilesAndMessagesAboveTheCeilingAreRefused) {
  testkit::TempDir dir;
  const std::string file = dir.str() + "/big.ckpt";
  Message m;
  m.type = protocol::kCheckpoint;
  m.arrays["w"] = Array(DType::U8, {int64_t(3) << 19});  // 1.5 MiB
  Bytes b = encode(m);
  write_bytes(file, b);
  EXPECT_EQ(read_file(file)->size(), b->size());
  EXPECT_NO_THROW(decode(b));
  ScopedEnv one_mb("CONCORD_MAX_MESSAGE_MB", "1");
  EXPECT_EQ(max_message_bytes(), size_t(1) << 20);
  std::string e = testkit::error_of([&] { read_file(file); });
  EXPECT_NE(e.find("CONCORD_MAX_MESSAGE_MB"), std::string::npos) << e;
  EXPECT_NE(e.find(file), std::string::npos) << e;
  e = testkit::error_of([&] { decode(b); });
  EXPECT_NE(e.find("CONCORD_MAX_MESSAGE_MB"), std::string::npos) << e;
  EXPECT_EQ(read_file(file, size_t(2) << 20)->size(), b->size());  // an explicit ceiling
  ScopedEnv bad("CONCORD_MAX_MESSAGE_MB", "lots");
  e = testkit::error_of([&] { read_file(file); });
  EXPECT_NE(e.find("CONCORD_MAX_MESSAGE_MB=lots"), std::string::npos) << e;
}

TEST(Limits, DefaultCeilingAllowsModelsAboveTwoGiB) {
  EXPECT_GE(max_message_bytes(), size_t(4096) << 20);
}

TEST(Limits, CountsThatTheRemainingBytesCannotHoldAreRefused) {
  Message m;
  m.type = "t";
  m.site = "s";
  Bytes b = encode(m);
  // header: magic, total, type "t", round, site "s", then the scalar count
  const size_t scalars_at = 8 + 8 + 5 + 8 + 5;
  for (uint32_t n : {0xFFFFFFFFu, 0x10000000u, 100u}) {
    auto bad = std::make_shared<Buffer>(b->size());
    std::memcpy(bad->data(), b->data(), b->size());
    std::memcpy(bad->data() + scalars_at, &n, 4);
    std::string e = testkit::error_of([&] { decode(bad); });
    EXPECT_NE(e.find("cannot fit"), std::string::npos) << n << ": " << e;
  }
}

TEST(Limits, DuplicateNamesAndTrailingBytesAreCorrupt) {
  Message m;
  m.type = "t";
  m.arrays["a"] = Array::from(std::vector<float>{1});
  m.arrays["b"] = Array::from(std::vector<float>{2});
  Bytes b = encode(m);
  auto dup = std::make_shared<Buffer>(b->size());
  std::memcpy(dup->data(), b->data(), b->size());
  dup->data()[find_bytes(b, std::string("\x01\0\0\0b", 5)) + 4] = 'a';
  std::string e = testkit::error_of([&] { decode(dup); });
  EXPECT_NE(e.find("'a' appears twice"), std::string::npos) << e;
  // 64 more bytes after the last array, with the total field saying so
  auto longer = std::make_shared<Buffer>(b->size() + 64);
  std::memcpy(longer->data(), b->data(), b->size());
  uint64_t total = longer->size();
  std::memcpy(longer->data() + 8, &total, 8);
  EXPECT_THROW(decode(longer), Error);
}

TEST(Limits, EncodeRefusesWhatTheFormatCannotHold) {
  Message m;
  m.arrays["deep"] = Array(DType::F32, std::vector<int64_t>(17, 1));
  std::string e = testkit::error_of([&] { encode(m); });
  EXPECT_NE(e.find("deep"), std::string::npos) << e;
}

TEST(Limits, StatisticsNeedAFiniteNonNegativeWeight) {
  Stats s;
  s.weight = 3;
  s.scalars["mean"] = 1.5;
  Stats back = stats_from_message(decode(encode(stats_message(s, protocol::kStats))));
  EXPECT_EQ(back.weight, 3);
  EXPECT_EQ(back.scalars, s.scalars);
  Message none;
  none.type = protocol::kStats;
  EXPECT_THROW(stats_from_message(Message(none)), Error);
  none.scalars[protocol::kWeight] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW(stats_from_message(Message(none)), Error);
  none.scalars[protocol::kWeight] = -1;
  EXPECT_THROW(stats_from_message(Message(none)), Error);
}

TEST(Limits, ACorruptReplyIsTheSitesFailureNamedBySite) {
  InProcessChannel ch;
  ch.connect("hospital-b", [](const Bytes&) -> Bytes { return message_with_dim(kHuge); });
  Message req;
  req.type = protocol::kTrain;
  try {
    ch.call("hospital-b", encode(req));
    FAIL() << "a corrupt reply was accepted";
  } catch (const SiteError& e) {
    EXPECT_EQ(e.site(), "hospital-b");
    EXPECT_NE(std::string(e.what()).find("array w"), std::string::npos) << e.what();
  }
}

// ---- class 5: stale memory in messages -------------------------------------------------------

TEST(Padding, EncodeZeroesEveryPaddingByteOfARecycledBuffer) {
  // Sizes that leave padding after each array; the whole message is >= 1 MiB, so its buffer
  // comes from the pool, where it was last filled with a pattern.
  Message m;
  m.type = protocol::kUpdate;
  m.site = "a";
  m.scalars[protocol::kNumSamples] = 3;
  m.arrays["big"] = Array::from(std::vector<float>(300001, 1.f));
  m.arrays["bias"] = Array::from(std::vector<float>{1, 2, 3});
  m.arrays["count"] = Array::from(std::vector<int64_t>{7});
  m.arrays["mask"] = Array::from(std::vector<uint8_t>(17, 1));
  m.arrays["none"] = Array(DType::F64, {0, 4});
  const size_t size = encode(m)->size();  // freed at once: its buffer goes back to the pool
  ASSERT_GE(size, size_t(1) << 20);
  const uint8_t* recycled;
  {
    Buffer poison(size);
    std::memset(poison.data(), 0xAB, size);
    recycled = poison.data();
  }
  Bytes b = encode(m);
  ASSERT_EQ(b->data(), recycled) << "the pool did not hand back the poisoned buffer";

  // header: magic, total, type, round, site, scalars, text, array table (name, dtype, dims)
  size_t header = 8 + 8 + (4 + 6) + 8 + (4 + 1) + 4 + (4 + 11 + 8) + 4 + 4;
  for (const auto& [name, a] : m.arrays) header += 4 + name.size() + 1 + 4 + 8 * a.shape().size();
  std::vector<bool> padding(size, true);
  for (size_t i = 0; i < header; ++i) padding[i] = false;
  Message d = decode(b);
  for (const auto& [name, a] : d.arrays) {
    size_t off = size_t(static_cast<const uint8_t*>(a.raw()) - b->data());
    for (size_t i = off; i < off + a.nbytes(); ++i) padding[i] = false;
  }
  size_t checked = 0;
  for (size_t i = 0; i < size; ++i)
    if (padding[i]) {
      ++checked;
      ASSERT_EQ(b->data()[i], 0) << "padding byte " << i << " of " << size << " is stale";
    }
  EXPECT_GT(checked, 64u * 3);  // header padding and the tails of bias, count, mask, big
}

TEST(Padding, ABufferFromThePoolIsZeroFilled) {
  const size_t size = (size_t(1) << 20) + 64;
  const uint8_t* recycled;
  {
    Buffer poison(size);
    std::memset(poison.data(), 0xCD, size);
    recycled = poison.data();
  }
  Buffer b(size);
  ASSERT_EQ(b.data(), recycled);
  for (size_t i = 0; i < size; ++i) ASSERT_EQ(b.data()[i], 0) << i;
}
