// A bounded, seeded random-mutation test of the message decoder and the statistics-file reader:
// every mutated input is either decoded or refused with concord::Error. No other exception, no
// crash (run under -DCONCORD_SANITIZE=ON to also catch reads out of bounds), and decoding never
// allocates more than a small multiple of the input (a length or count field cannot make it
// reserve memory the bytes do not back).
#include <concord/harmonizer.h>
#include <concord/message.h>
#include <concord/protocol.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <random>

#include "testing.h"

using namespace concord;

// ---- allocation accounting (operator new of this test executable) ---------------------------

namespace {
std::atomic<bool> g_counting{false};
std::atomic<size_t> g_allocated{0};
}  // namespace

// GCC cannot see that this operator delete pairs with the operator new above.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(size_t n) {
  if (g_counting.load(std::memory_order_relaxed))
    g_allocated.fetch_add(n, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, size_t) noexcept {
  std::free(p);
}
#pragma GCC diagnostic pop

namespace {

std::vector<uint8_t> bytes_of(const Bytes& b) {
  return std::vector<uint8_t>(b->data(), b->data() + b->size());
}

Bytes to_buffer(const std::vector<uint8_t>& v) {
  auto b = std::make_shared<Buffer>(v.size());
  if (!v.empty()) std::memcpy(b->data(), v.data(), v.size());
  return b;
}

// Valid messages of every shape the format has: scalars, text, each dtype, 0-d, empty, padded.
std::vector<std::vector<uint8_t>> seeds() {
  std::vector<std::vector<uint8_t>> out;
  Message a;
  a.type = protocol::kUpdate;
  a.round = 3;
  a.site = "BIDMC";
  a.scalars = {{protocol::kNumSamples, 12}, {protocol::kTrainLoss, 0.5}};
  a.text = {{protocol::kPhase, protocol::kPhaseGlobal}, {"note", ""}};
  a.arrays["conv.weight"] = Array::from(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3, 1});
  a.arrays["bn.num_batches_tracked"] = Array::from(std::vector<int64_t>{42}, {});
  a.arrays["mask"] = Array::from(std::vector<uint8_t>(19, 7));
  a.arrays["f64"] = Array::from(std::vector<double>{0.25, -1});
  a.arrays["i32"] = Array::from(std::vector<int32_t>{-3, 4, 5});
  a.arrays["empty"] = Array(DType::F32, {0, 3});
  out.push_back(bytes_of(encode(a)));
  Message b;
  b.type = protocol::kBroadcast;
  out.push_back(bytes_of(encode(b)));
  Stats s;
  s.weight = 4;
  s.scalars["mean"] = 0.5;
  s.arrays["spectrum"] = Array::from(std::vector<float>(40, 0.5f), {5, 8});
  Message st = stats_message(s, protocol::kSetStatistics);
  st.text[protocol::kMethod] = "amplitude";
  out.push_back(bytes_of(encode(st)));
  return out;
}

// One random change: a bit flip, a random byte, a huge value in a length/count/dim/total field,
// bytes inserted or removed, a truncation; then, half the time, the total field made consistent
// so the decoder gets past its first check.
void mutate(std::vector<uint8_t>& v, std::mt19937_64& rng) {
  auto pick = [&](size_t n) { return n ? size_t(rng() % n) : 0; };
  // Most fields live in the first bytes: aim there more often.
  auto where = [&] { return rng() % 4 ? pick(std::min<size_t>(v.size(), 192)) : pick(v.size()); };
  static const uint64_t kHuge[] = {
      0xFFFFFFFFu, 0x7FFFFFFFu, 0x80000000u, 0xFFFFFFFFFFFFFFFFull, (1ull << 62) + 16, 1ull << 32,
      0x10000,     64,          17};
  switch (rng() % 7) {
    case 0:
      if (!v.empty()) v[where()] ^= uint8_t(1u << (rng() % 8));
      break;
    case 1:
      if (!v.empty()) v[where()] = uint8_t(rng());
      break;
    case 2: {
      uint64_t x = kHuge[pick(std::size(kHuge))];
      size_t width = rng() % 2 ? 4 : 8, at = where();
      for (size_t i = 0; i < width && at + i < v.size(); ++i) v[at + i] = uint8_t(x >> (8 * i));
      break;
    }
    case 3: {
      size_t n = 1 + pick(80);
      v.insert(v.begin() + std::ptrdiff_t(where()), n, uint8_t(rng()));
      break;
    }
    case 4: {
      size_t at = where(), n = std::min(v.size() - at, 1 + pick(80));
      v.erase(v.begin() + std::ptrdiff_t(at), v.begin() + std::ptrdiff_t(at + n));
      break;
    }
    case 5:
      v.resize(pick(v.size() + 1));
      break;
    case 6:  // a small int64 (likely a dim, a round or the total) made huge
      for (size_t tries = 0; tries < 64 && v.size() >= 8; ++tries) {
        size_t at = pick(v.size() - 7);
        int64_t x;
        std::memcpy(&x, v.data() + at, 8);
        if (x > 0 && x < 1000) {
          x = int64_t(kHuge[pick(std::size(kHuge))]);
          std::memcpy(v.data() + at, &x, 8);
          break;
        }
      }
      break;
  }
  if (rng() % 2 && v.size() >= 16) {
    uint64_t total = v.size();
    std::memcpy(v.data() + 8, &total, 8);
  }
}

// Reads every byte of every decoded array (a view past the buffer shows up under ASan) and
// re-encodes: what decode accepts must encode and decode again to the same message.
void use(const Message& m) {
  uint64_t sum = 0;
  for (const auto& [name, a] : m.arrays) {
    const auto* p = static_cast<const uint8_t*>(a.raw());
    for (size_t i = 0; i < a.nbytes(); ++i) sum += p[i];
  }
  Message again = decode(encode(m));
  EXPECT_EQ(again.arrays.size(), m.arrays.size());
  EXPECT_EQ(again.scalars.size(), m.scalars.size());
  EXPECT_GE(sum, 0u);
}

}  // namespace

TEST(Mutation, DecodeEitherSucceedsOrThrowsErrorWithinAnAllocationBound) {
  const auto inputs = seeds();
  std::mt19937_64 rng(20261201);
  int accepted = 0, refused = 0;
  for (int i = 0; i < 6000; ++i) {
    std::vector<uint8_t> v = inputs[size_t(i) % inputs.size()];
    for (int k = 0, n = 1 + int(rng() % 3); k < n; ++k) mutate(v, rng);
    Bytes b = to_buffer(v);
    Message m;
    bool ok = false;
    g_allocated = 0;
    g_counting = true;
    try {
      m = decode(b);
      ok = true;
    } catch (const Error&) {
      ++refused;
    } catch (const std::exception& e) {
      g_counting = false;
      FAIL() << "mutation " << i << ": decode threw " << typeid(e).name() << ": " << e.what();
    }
    g_counting = false;
    // Names, keys and table entries are each backed by input bytes, and so is an error's text:
    // no length or count field can make decode reserve memory the input does not hold.
    ASSERT_LE(g_allocated, 64 * v.size() + 4096) << "mutation " << i << " of " << v.size();
    if (!ok) continue;
    ++accepted;
    use(m);
  }
  // Both paths ran: the mutations reach past the first checks.
  EXPECT_GT(accepted, 100);
  EXPECT_GT(refused, 1000);
}

TEST(Mutation, StatisticsFileReaderEitherLoadsOrThrowsErrorNamingTheFile) {
  testkit::TempDir dir;
  const std::string file = dir.str() + "/mutated.stats";
  const std::vector<uint8_t> valid = seeds().back();
  std::mt19937_64 rng(99);
  int loaded = 0;
  for (int i = 0; i < 200; ++i) {
    std::vector<uint8_t> v = valid;
    for (int k = 0, n = 1 + int(rng() % 3); k < n; ++k) mutate(v, rng);
    std::ofstream(file, std::ios::binary | std::ios::trunc)
        .write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size()));
    try {
      Stats s = load_stats(file);
      ++loaded;
      EXPECT_GE(s.weight, 0) << "mutation " << i;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      FAIL() << "mutation " << i << ": load_stats threw " << typeid(e).name() << ": " << e.what();
    }
  }
  EXPECT_GT(loaded, 10);
}
