#include <concord/protocol.h>

#include "aggregator_testing.h"

using namespace concord;
using namespace concord::aggtest;

TEST(FedProx, DeclaresMuForTheSitesAndAveragesLikeFedAvg) {
  auto prox = make("fedprox", {{"mu", make_value(0.05)}});
  const auto settings = prox->client_settings();
  ASSERT_EQ(settings.size(), 1u);
  EXPECT_DOUBLE_EQ(settings.at(protocol::kProximalMu), 0.05);
  EXPECT_DOUBLE_EQ(make("fedprox")->client_settings().at(protocol::kProximalMu), 0.01);

  NamedArrays global{{"w", vec({0, 0})}};
  std::vector<SiteUpdate> ups = {update("a", {{"w", vec({1, 2})}}, 1),
                                 update("b", {{"w", vec({4, 8})}}, 3)};
  const NamedArrays out = prox->aggregate(global, ups, {1, 1, 0});
  EXPECT_FLOAT_EQ(values(out, "w")[0], (1 * 1 + 3 * 4) / 4.0f);
  EXPECT_FLOAT_EQ(values(out, "w")[1], (1 * 2 + 3 * 8) / 4.0f);
  EXPECT_TRUE(identical(out, make("fedavg")->aggregate(global, ups, {1, 1, 0})));
  EXPECT_TRUE(make("fedavg")->client_settings().empty());
}

TEST(FedProx, RejectsNegativeMu) {
  const auto& desc = testkit::builtin_registry().get(Kind::Aggregator, "fedprox");
  EXPECT_THROW(make_args("fedprox", desc.args, {{"mu", make_value(-1.0)}}), Error);
}
