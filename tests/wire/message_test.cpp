#include <concord/channel.h>
#include <concord/message.h>
#include <concord/protocol.h>

#include <cstring>

#include "testing.h"

using namespace concord;

TEST(Wire, RoundTripKeepsEverythingAndAliasesTheBuffer) {
  Message m;
  m.type = protocol::kUpdate;
  m.round = 7;
  m.site = "BIDMC";
  m.scalars = {{protocol::kNumSamples, 128}, {protocol::kTrainLoss, 0.25}};
  m.text = {{protocol::kPhase, protocol::kPhaseGlobal}};
  m.arrays["conv.weight"] = Array::from(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3});
  m.arrays["bn.num_batches_tracked"] = Array::from(std::vector<int64_t>{42});
  m.arrays["empty"] = Array(DType::F32, {0});
  Bytes b = encode(m);
  EXPECT_EQ(b->size() % 64, 0u);
  Message d = decode(b);
  EXPECT_EQ(d.type, protocol::kUpdate);
  EXPECT_EQ(d.round, 7);
  EXPECT_EQ(d.site, "BIDMC");
  EXPECT_EQ(d.scalars, m.scalars);
  EXPECT_EQ(d.text, m.text);
  ASSERT_EQ(d.arrays.size(), 3u);
  EXPECT_EQ(d.arrays["conv.weight"].shape(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(d.arrays["conv.weight"].to_vector<float>(), (std::vector<float>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(d.arrays["bn.num_batches_tracked"].data<int64_t>()[0], 42);
  EXPECT_EQ(d.arrays["empty"].numel(), 0);
  // Zero copy: array data points into the received buffer, 64-byte aligned.
  auto p = static_cast<const uint8_t*>(d.arrays["conv.weight"].raw());
  EXPECT_GE(p, b->data());
  EXPECT_LT(p, b->data() + b->size());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
}

TEST(Wire, TruncatedOrCorruptBuffersAreErrors) {
  Message m;
  m.type = "x";
  m.arrays["w"] = Array::from(std::vector<float>(100, 1.f));
  Bytes b = encode(m);
  auto cut = std::make_shared<Buffer>(b->size() - 10);
  std::memcpy(cut->data(), b->data(), cut->size());
  EXPECT_THROW(decode(cut), Error);
  auto bad = std::make_shared<Buffer>(b->size());
  std::memcpy(bad->data(), b->data(), b->size());
  bad->data()[0] = 'X';
  EXPECT_THROW(decode(bad), Error);
}

TEST(Channel, InProcessCarriesBytesAndReportsSiteErrors) {
  InProcessChannel ch;
  ch.connect("a", [](const Bytes& req) {
    Message in = decode(req);
    Message out;
    out.type = "echo";
    out.scalars["n"] = double(in.arrays.at("w").numel());
    return encode(out);
  });
  ch.connect("b", [](const Bytes&) -> Bytes { throw std::runtime_error("disk full"); });
  Message req;
  req.arrays["w"] = Array::from(std::vector<float>(10, 0.f));
  Message rep = decode(ch.call("a", encode(req)));
  EXPECT_EQ(rep.scalars["n"], 10);
  try {
    ch.call("b", encode(req));
    FAIL();
  } catch (const SiteError& e) {
    EXPECT_EQ(e.site(), "b");
    EXPECT_NE(std::string(e.what()).find("disk full"), std::string::npos);
  }
  EXPECT_THROW(ch.call("nowhere", encode(req)), SiteError);
}
