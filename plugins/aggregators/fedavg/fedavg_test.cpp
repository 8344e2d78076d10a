#include <concord/aggregator.h>

#include "testing.h"

using namespace concord;

static SiteUpdate update(const std::string& site, std::vector<float> w, double n) {
  SiteUpdate u;
  u.site = site;
  u.state["w"] = Array::from(w);
  u.num_samples = n;
  return u;
}

TEST(FedAvg, WeightsBySamplesOrUniformly) {
  const Registry& reg = testkit::builtin_registry();
  const auto& desc = reg.get(Kind::Aggregator, "fedavg");
  NamedArrays global{{"w", Array::from(std::vector<float>{0, 0})}};
  std::vector<SiteUpdate> ups = {update("a", {1, 2}, 1), update("b", {4, 8}, 3)};

  auto weighted =
      reg.create<Aggregator>(Kind::Aggregator, "fedavg", make_args("fedavg", desc.args));
  auto out = weighted->aggregate(global, ups, {1, 1, 0});
  EXPECT_FLOAT_EQ(out["w"].data<float>()[0], (1 * 1 + 3 * 4) / 4.0f);
  EXPECT_FLOAT_EQ(out["w"].data<float>()[1], (1 * 2 + 3 * 8) / 4.0f);

  auto uniform = reg.create<Aggregator>(
      Kind::Aggregator, "fedavg",
      make_args("fedavg", desc.args, {{"weighting", make_value("uniform")}}));
  out = uniform->aggregate(global, ups, {1, 1, 0});
  EXPECT_FLOAT_EQ(out["w"].data<float>()[0], 2.5f);
  EXPECT_FLOAT_EQ(out["w"].data<float>()[1], 5.0f);
}

TEST(FedAvg, RejectsBadWeightingValue) {
  const auto& desc = testkit::builtin_registry().get(Kind::Aggregator, "fedavg");
  EXPECT_THROW(make_args("fedavg", desc.args, {{"weighting", make_value("bogus")}}), Error);
}
