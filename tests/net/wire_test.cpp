// Frames: encoding, decoding across slice boundaries, every declared length checked, payload
// reassembly, and random mutations that must be refused cleanly.
#include <concord/error.h>
#include <concord/net/wire.h>
#include <concord/seed.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>

#include "testing.h"

using namespace concord;
using namespace concord::net;

namespace {

// `bytes` cut into pieces at the given offsets (as gRPC slices would be).
std::vector<Span> pieces(const std::string& bytes, std::vector<size_t> cuts) {
  std::vector<Span> out;
  size_t at = 0;
  cuts.push_back(bytes.size());
  for (size_t c : cuts) {
    c = std::min(c, bytes.size());
    if (c < at) continue;
    out.push_back({reinterpret_cast<const uint8_t*>(bytes.data()) + at, c - at});
    at = c;
  }
  return out;
}

FrameHeader payload_header(FrameKind kind, uint64_t id, uint64_t total, uint64_t offset,
                           uint32_t index, uint32_t count) {
  FrameHeader h;
  h.kind = kind;
  h.call_id = id;
  h.total_size = total;
  h.offset = offset;
  h.chunk_index = index;
  h.chunk_count = count;
  return h;
}

std::string chunk_bytes(const Frame& f) {
  std::string s;
  for (const Span& p : f.chunk) s.append(reinterpret_cast<const char*>(p.data), p.size);
  return s;
}

std::string decode_error(const std::string& bytes) {
  return testkit::error_of([&] { decode_frame(pieces(bytes, {})); });
}

}  // namespace

TEST(NetWire, RoundTripAcrossSliceBoundaries) {
  FrameHeader h = payload_header(FrameKind::Reply, 7, 10, 3, 1, 3);
  h.text = "hello";
  const std::string bytes = encode_frame(h, "abcde", 5);
  for (size_t a = 0; a <= bytes.size(); ++a)
    for (size_t b : {a, a + 1, a + 7}) {
      Frame f = decode_frame(pieces(bytes, {a, b}));
      EXPECT_EQ(f.header.kind, FrameKind::Reply);
      EXPECT_EQ(f.header.call_id, 7u);
      EXPECT_EQ(f.header.total_size, 10u);
      EXPECT_EQ(f.header.offset, 3u);
      EXPECT_EQ(f.header.chunk_index, 1u);
      EXPECT_EQ(f.header.chunk_count, 3u);
      EXPECT_EQ(f.header.text, "hello");
      EXPECT_EQ(f.chunk_size, 5u);
      EXPECT_EQ(chunk_bytes(f), "abcde");
    }
  // Control frames.
  FrameHeader r;
  r.kind = FrameKind::Register;
  r.site = "site-a";
  Frame f = decode_frame(pieces(encode_frame(r), {}));
  EXPECT_EQ(f.header.site, "site-a");
  EXPECT_EQ(f.chunk_size, 0u);
}

TEST(NetWire, DeclaredLengthsAndFieldsAreChecked) {
  EXPECT_NE(decode_error("").find("without a header"), std::string::npos);
  EXPECT_NE(decode_error("\x0a\x05\x08").find("FrameHeader"), std::string::npos);
  // A header claiming 1 GB.
  EXPECT_NE(decode_error(std::string("\x0a\x80\x80\x80\x80\x04", 6)).find("frame header of"),
            std::string::npos);
  // A chunk declaring more bytes than present.
  std::string trunc =
      encode_frame(payload_header(FrameKind::Request, 1, 8, 0, 0, 1), "abcdefgh", 8);
  trunc.resize(trunc.size() - 3);
  EXPECT_NE(decode_error(trunc).find("8 bytes declared, 5 present"), std::string::npos)
      << decode_error(trunc);
  // A chunk over the 4 MiB ceiling, declared only.
  std::string big = encode_frame_prefix(payload_header(FrameKind::Request, 1, 1, 0, 0, 1), 1);
  big.resize(big.size() - 1);
  big += std::string("\x80\x80\x80\x04", 4);  // varint 8 MiB
  EXPECT_NE(decode_error(big).find("at most"), std::string::npos) << decode_error(big);
  auto err = [](FrameHeader h, size_t n = 0) {
    std::string data(n, 'x');
    return decode_error(encode_frame(h, data.data(), n));
  };
  EXPECT_NE(err(payload_header(FrameKind::Request, 0, 4, 0, 0, 1), 4).find("without a call id"),
            std::string::npos);
  EXPECT_NE(err(payload_header(FrameKind::Request, 1, 4, 0, 1, 1), 4).find("chunk index 1 of 1"),
            std::string::npos);
  EXPECT_NE(err(payload_header(FrameKind::Request, 1, 4, 2, 0, 1), 4).find("runs past"),
            std::string::npos);
  EXPECT_NE(err(payload_header(FrameKind::Request, 1, UINT64_MAX, UINT64_MAX - 1, 0, 9), 4)
                .find("overflows"),
            std::string::npos);
  EXPECT_NE(err(payload_header(FrameKind::Request, 1, 4, 0, 0, 2), 0).find("is empty"),
            std::string::npos);
  EXPECT_NE(err(payload_header(FrameKind::Request, 1, 2, 0, 0, 3), 1).find("3 chunks for 2 bytes"),
            std::string::npos);
  FrameHeader v;
  v.version = 2;
  EXPECT_NE(err(v).find("wire version 2"), std::string::npos);
  FrameHeader k;
  k.kind = FrameKind(42);
  EXPECT_NE(err(k).find("unknown kind 42"), std::string::npos);
  FrameHeader hb;
  EXPECT_NE(err(hb, 3).find("heartbeat frame carries payload"), std::string::npos);
  FrameHeader reg;
  reg.kind = FrameKind::Register;
  EXPECT_NE(err(reg).find("names no site"), std::string::npos);
}

TEST(NetWire, AssemblerChecksOrderAndTotalBeforeAllocating) {
  const std::string data = "0123456789";
  auto frame_of = [&](uint64_t total, uint64_t offset, uint32_t index, uint32_t count, size_t n,
                      std::string& storage) {
    storage = encode_frame(payload_header(FrameKind::Reply, 3, total, offset, index, count),
                           data.data() + offset, n);
    return decode_frame(pieces(storage, {}));
  };
  std::string s1, s2, s3;
  PayloadAssembler a(1000);
  EXPECT_FALSE(a.add(frame_of(10, 0, 0, 3, 4, s1)));
  EXPECT_FALSE(a.add(frame_of(10, 4, 1, 3, 4, s2)));
  EXPECT_TRUE(a.add(frame_of(10, 8, 2, 3, 2, s3)));
  Bytes b = a.take();
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b->data()), b->size()), data);

  PayloadAssembler out_of_order(1000);
  out_of_order.add(frame_of(10, 0, 0, 3, 4, s1));
  EXPECT_NE(testkit::error_of([&] {
              out_of_order.add(frame_of(10, 8, 2, 3, 2, s3));
            }).find("expected chunk 1/3 at offset 4"),
            std::string::npos);
  PayloadAssembler late_start(1000);
  EXPECT_NE(testkit::error_of([&] {
              late_start.add(frame_of(10, 4, 1, 3, 4, s2));
            }).find("first chunk is chunk 1"),
            std::string::npos);
  PayloadAssembler small(5);
  EXPECT_NE(testkit::error_of([&] {
              small.add(frame_of(10, 0, 0, 3, 4, s1));
            }).find("over the limit of 5 bytes"),
            std::string::npos);
  EXPECT_FALSE(small.started());  // nothing allocated
  PayloadAssembler short_end(1000);
  short_end.add(frame_of(10, 0, 0, 2, 4, s1));
  EXPECT_NE(testkit::error_of([&] {
              short_end.add(frame_of(10, 4, 1, 2, 4, s2));
            }).find("last chunk ends at byte 8 of 10"),
            std::string::npos);
}

TEST(NetWire, ChunkSizeRange) {
  EXPECT_EQ(chunk_count_for(0, 4096), 1u);
  EXPECT_EQ(chunk_count_for(4096, 4096), 1u);
  EXPECT_EQ(chunk_count_for(4097, 4096), 2u);
  EXPECT_EQ(chunk_count_for(size_t(5) << 30, size_t(1) << 20), 5120u);  // a 5 GiB payload
  EXPECT_NE(testkit::error_of([] { check_chunk_bytes(8 << 20); }).find("4 KiB .. 4 MiB"),
            std::string::npos);
  unsetenv("CONCORD_NET_CHUNK_KB");
  EXPECT_EQ(chunk_bytes_from_env(), size_t(1) << 20);
  setenv("CONCORD_NET_CHUNK_KB", "256", 1);
  EXPECT_EQ(chunk_bytes_from_env(), size_t(256) << 10);
  setenv("CONCORD_NET_CHUNK_KB", "8192", 1);
  EXPECT_NE(testkit::error_of([] { chunk_bytes_from_env(); }).find("CONCORD_NET_CHUNK_KB=8192"),
            std::string::npos);
  setenv("CONCORD_NET_CHUNK_KB", "1", 1);
  EXPECT_NE(testkit::error_of([] { chunk_bytes_from_env(); }).find("4 KiB .. 4 MiB"),
            std::string::npos);
  unsetenv("CONCORD_NET_CHUNK_KB");
}

// Random byte flips, truncations and insertions in valid frames: each is decoded or refused
// with concord::Error; accepted ones reassemble within their declared bounds.
TEST(NetWire, RandomMutationsAreRefusedCleanly) {
  std::vector<std::string> seeds;
  const std::string data(300, 'z');
  seeds.push_back(
      encode_frame(payload_header(FrameKind::Request, 5, 300, 0, 0, 1), data.data(), 300));
  seeds.push_back(
      encode_frame(payload_header(FrameKind::Reply, 9, 1000, 300, 1, 4), data.data(), 300));
  FrameHeader e;
  e.kind = FrameKind::Error;
  e.call_id = 3;
  e.text = "boom";
  seeds.push_back(encode_frame(e));
  FrameHeader r;
  r.kind = FrameKind::Register;
  r.site = "site-a";
  seeds.push_back(encode_frame(r));
  SeededRandom rng(derive_seed(1, "net-wire-mutation"));
  int accepted = 0, refused = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string m = seeds[size_t(rng.below(int64_t(seeds.size())))];
    const int edits = 1 + int(rng.below(4));
    for (int k = 0; k < edits && !m.empty(); ++k) {
      const size_t at = size_t(rng.below(int64_t(m.size())));
      switch (rng.below(4)) {
        case 0:
          m[at] = char(rng.below(256));
          break;
        case 1:
          m.resize(at);
          break;
        case 2:
          m.insert(at, 1, char(rng.below(256)));
          break;
        default:
          m[at] = char(m[at] ^ (1 << rng.below(8)));
      }
    }
    try {
      Frame f = decode_frame(pieces(m, {size_t(rng.below(int64_t(m.size() + 1)))}));
      ++accepted;
      if (f.header.kind == FrameKind::Request || f.header.kind == FrameKind::Reply) {
        PayloadAssembler a(1 << 20);
        try {
          a.add(f);
          EXPECT_LE(a.received(), a.total());
        } catch (const Error&) {
        }
      }
    } catch (const Error&) {
      ++refused;
    }
  }
  EXPECT_GT(accepted, 100);
  EXPECT_GT(refused, 1000);
}

// The data link's header (wire.h): every declared field is checked before anything is allocated,
// and random mutations of valid headers are refused cleanly or decode to a header within limits.
TEST(NetWire, DataHeadersAreCheckedAndMutationsRefusedCleanly) {
  auto bytes = [](const DataHeader& h) {
    std::string b(kDataHeaderBytes, '\0');
    encode_data_header(h, reinterpret_cast<uint8_t*>(b.data()));
    return b;
  };
  auto decoded = [](const std::string& b, size_t max = 1 << 20) {
    return decode_data_header(reinterpret_cast<const uint8_t*>(b.data()), b.size(), max);
  };
  auto error = [&](const std::string& b, size_t max = 1 << 20) {
    return testkit::error_of([&] { decoded(b, max); });
  };
  const DataHeader reply{DataKind::Reply, 42, 1000};
  const DataHeader d = decoded(bytes(reply));
  EXPECT_EQ(d.kind, DataKind::Reply);
  EXPECT_EQ(d.call_id, 42u);
  EXPECT_EQ(d.size, 1000u);
  EXPECT_NE(error(bytes(reply), 999).find("reply of 1000 bytes is over the limit of 999"),
            std::string::npos);
  std::string b = bytes(reply);
  EXPECT_NE(error(b.substr(0, 31)).find("of 31 bytes"), std::string::npos);
  b[0] = 'X';
  EXPECT_NE(error(b).find("bad magic"), std::string::npos);
  b = bytes(reply);
  b[4] = 2;
  EXPECT_NE(error(b).find("wire version 2"), std::string::npos);
  b = bytes(reply);
  b[8] = 77;
  EXPECT_NE(error(b).find("unknown kind 77"), std::string::npos);
  b = bytes(reply);
  b[12] = 1;
  EXPECT_NE(error(b).find("reserved"), std::string::npos);
  EXPECT_NE(error(bytes({DataKind::Reply, 0, 10})).find("call id 0"), std::string::npos);
  EXPECT_NE(error(bytes({DataKind::Accept, 3, 0})).find("call id 3"), std::string::npos);
  EXPECT_NE(error(bytes({DataKind::HelloUp, 0, 31})).find("token of 31 bytes"), std::string::npos);
  EXPECT_NE(error(bytes({DataKind::Accept, 0, 1})).find("over the limit of 0"), std::string::npos);
  EXPECT_NE(error(bytes({DataKind::Refuse, 0, kMaxRefusalBytes + 1})).find("over the limit"),
            std::string::npos);
  EXPECT_EQ(decoded(bytes({DataKind::HelloDown, 0, kDataTokenBytes})).kind, DataKind::HelloDown);

  // WELCOME carries the data link's port and token; no other frame may.
  FrameHeader w;
  w.kind = FrameKind::Welcome;
  w.data_port = 7444;
  w.data_token = std::string(kDataTokenBytes, 't');
  const std::string wf = encode_frame(w);
  const Frame f = decode_frame({{reinterpret_cast<const uint8_t*>(wf.data()), wf.size()}});
  EXPECT_EQ(f.header.data_port, 7444u);
  EXPECT_EQ(f.header.data_token, w.data_token);
  w.data_token = "short";
  const std::string bad = encode_frame(w);
  EXPECT_NE(testkit::error_of([&] {
              decode_frame({{reinterpret_cast<const uint8_t*>(bad.data()), bad.size()}});
            }).find("data-link token of 5 bytes"),
            std::string::npos);
  FrameHeader hb;
  hb.kind = FrameKind::Heartbeat;
  hb.data_port = 1;
  const std::string hf = encode_frame(hb);
  EXPECT_NE(testkit::error_of([&] {
              decode_frame({{reinterpret_cast<const uint8_t*>(hf.data()), hf.size()}});
            }).find("heartbeat frame offers a data link"),
            std::string::npos);

  const std::vector<std::string> seeds = {bytes(reply), bytes({DataKind::HelloDown, 0, 32}),
                                          bytes({DataKind::Refuse, 0, 100}),
                                          bytes({DataKind::Request, 1, 0})};
  SeededRandom rng(derive_seed(1, "net-data-header-mutation"));
  int accepted = 0, refused = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string m = seeds[size_t(rng.below(int64_t(seeds.size())))];
    for (int k = 0, edits = 1 + int(rng.below(3)); k < edits; ++k) {
      const size_t at = size_t(rng.below(int64_t(m.size())));
      m[at] = rng.below(2) ? char(rng.below(256)) : char(m[at] ^ (1 << rng.below(8)));
    }
    try {
      const DataHeader h = decoded(m);
      ++accepted;
      const bool payload = h.kind == DataKind::Request || h.kind == DataKind::Reply;
      EXPECT_EQ(payload, h.call_id != 0);
      EXPECT_LE(h.size, uint64_t(1) << 20);
    } catch (const Error&) {
      ++refused;
    }
  }
  EXPECT_GT(accepted, 100);
  EXPECT_GT(refused, 10000);
}
