// The secure-aggregation messages: what a builder writes its reader gives back, and a reply that
// names other sites, holds too many words or oversized boxes is refused with the reason.
#include <concord/protocol.h>

#include "testing.h"

using namespace concord;

TEST(SecAggProtocol, MessagesRoundTripThroughTheWireFormat) {
  secagg::Config c = secagg::Config::defaults(4, 10, 77);
  const auto setup = protocol::read_secagg_setup(decode(encode(protocol::secagg_setup(3, c, 2))));
  EXPECT_EQ(setup.index, 2u);
  EXPECT_EQ(setup.config.sites, 4u);
  EXPECT_EQ(setup.config.graph_seed, 77u);
  EXPECT_EQ(setup.config.length, 10);

  secagg::KeyAdvert a;
  a.site = 2;
  a.cipher_pk[0] = 9;
  a.mask_pk[31] = 7;
  auto got = protocol::read_secagg_advert(decode(encode(protocol::secagg_advert("s", 3, a))), 2);
  ASSERT_TRUE(got.ok()) << got.problem;
  EXPECT_EQ(got.value->cipher_pk, a.cipher_pk);
  EXPECT_EQ(got.value->mask_pk, a.mask_pk);
  EXPECT_FALSE(protocol::read_secagg_advert(decode(encode(protocol::secagg_advert("s", 3, a))), 1)
                   .ok());  // not the number it was given

  secagg::ShareKeys sk;
  sk.site = 2;
  sk.shares.push_back({2, 0, std::vector<uint8_t>(80, 1)});
  sk.shares.push_back({2, 3, std::vector<uint8_t>(80, 2)});
  auto shares =
      protocol::read_secagg_shares(decode(encode(protocol::secagg_shares("s", 3, sk))), 2, 4);
  ASSERT_TRUE(shares.ok()) << shares.problem;
  ASSERT_EQ(shares.value->shares.size(), 2u);
  EXPECT_EQ(shares.value->shares[1].to, 3u);
  EXPECT_EQ(shares.value->shares[1].box, sk.shares[1].box);
  // A recipient outside the round, and a box beyond 4 KiB, are refused.
  EXPECT_FALSE(
      protocol::read_secagg_shares(decode(encode(protocol::secagg_shares("s", 3, sk))), 2, 3).ok());
  sk.shares[0].box.assign(5000, 0);
  EXPECT_NE(protocol::read_secagg_shares(decode(encode(protocol::secagg_shares("s", 3, sk))), 2, 4)
                .problem.find("bytes"),
            std::string::npos);

  secagg::MaskedInput in;
  in.site = 2;
  in.values.assign(11, 5);
  auto masked = protocol::read_secagg_masked(
      decode(encode(protocol::secagg_masked("s", 3, in, 0.25, 4))), 2, c);
  ASSERT_TRUE(masked.ok()) << masked.problem;
  EXPECT_EQ(masked.value->input.values, in.values);
  EXPECT_DOUBLE_EQ(masked.value->train_loss, 0.25);
  in.values.push_back(1);  // L + 2 words
  EXPECT_FALSE(protocol::read_secagg_masked(
                   decode(encode(protocol::secagg_masked("s", 3, in, 0.25, 4))), 2, c)
                   .ok());

  secagg::UnmaskRequest req{{0, 1, 2}, {3}};
  const auto back =
      protocol::read_secagg_unmask(decode(encode(protocol::secagg_unmask(3, req))), 4);
  EXPECT_EQ(back.survivors, req.survivors);
  EXPECT_EQ(back.dropped, req.dropped);
  EXPECT_THROW(protocol::read_secagg_unmask(decode(encode(protocol::secagg_unmask(3, req))), 3),
               Error);
}
