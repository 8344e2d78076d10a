// Server optimisers: moments over two rounds computed by hand (Reddi et al. 2021, Algorithm 2),
// and bit-identical resume from state().
#include <cmath>
#include <random>

#include "aggregator_testing.h"

using namespace concord;
using namespace concord::aggtest;

namespace {

struct Hand {
  float m = 0, v;
};

// One coordinate of the server step, in float like the plugin.
float step(const std::string& variant, Hand& h, float x, float mean, float eta, float b1, float b2,
           float tau) {
  const float d = mean - x;
  h.m = b1 * h.m + (1 - b1) * d;
  if (variant == "fedadam") h.v = b2 * h.v + (1 - b2) * d * d;
  if (variant == "fedadagrad") h.v = h.v + d * d;
  if (variant == "fedyogi") {
    const float diff = h.v - d * d;
    h.v = h.v - (1 - b2) * d * d * float((diff > 0) - (diff < 0));
  }
  return x + eta * h.m / (std::sqrt(h.v) + tau);
}

}  // namespace

TEST(FedOpt, TwoRoundsMatchTheHandComputedMoments) {
  const float eta = 0.5f, b1 = 0.9f, b2 = 0.99f, tau = 0.1f;
  for (const std::string variant : {"fedadam", "fedyogi", "fedadagrad"}) {
    std::map<std::string, Value> args = {{"eta", make_value(double(eta))},
                                         {"beta1", make_value(double(b1))},
                                         {"tau", make_value(double(tau))},
                                         {"weighting", make_value("uniform")}};
    if (variant != "fedadagrad") args["beta2"] = make_value(double(b2));
    auto opt = make(variant, args);
    // Round 1: global 1, sites 2 and 4 -> mean 3, delta 2. Round 2: sites 0 and 1.
    NamedArrays global{{"w", vec({1.0f})}};
    NamedArrays out = opt->aggregate(
        global, {update("a", {{"w", vec({2})}}), update("b", {{"w", vec({4})}})}, {1, 2, 0});
    Hand h{0, tau * tau};
    const float x1 = step(variant, h, 1.0f, 3.0f, eta, b1, b2, tau);
    // By hand for Adam: m = 0.2, v = 0.99*0.01 + 0.01*4 = 0.0499, x = 1 + 0.5*0.2/(0.22338+0.1).
    if (variant == "fedadam") {
      EXPECT_NEAR(x1, 1.0f + 0.1f / (std::sqrt(0.0499f) + 0.1f), 1e-6);
    }
    if (variant == "fedadagrad") {
      EXPECT_NEAR(x1, 1.0f + 0.1f / (std::sqrt(4.01f) + 0.1f), 1e-6);
    }
    // Yogi: v0 = 0.01 < d^2 = 4, so v = 0.01 + 0.01*4 = 0.05.
    if (variant == "fedyogi") {
      EXPECT_NEAR(x1, 1.0f + 0.1f / (std::sqrt(0.05f) + 0.1f), 1e-6);
    }
    EXPECT_NEAR(values(out, "w")[0], x1, 1e-6) << variant;

    NamedArrays s = opt->state();
    EXPECT_NEAR(s.at("m/w").data<float>()[0], 0.2f, 1e-7) << variant;
    EXPECT_NEAR(s.at("v/w").data<float>()[0], h.v, 1e-7) << variant;
    EXPECT_EQ(s.at("steps").data<int64_t>()[0], 1);

    out = opt->aggregate(out, {update("a", {{"w", vec({0})}}), update("b", {{"w", vec({1})}})},
                         {2, 2, 0});
    const float x2 = step(variant, h, x1, 0.5f, eta, b1, b2, tau);
    EXPECT_NEAR(values(out, "w")[0], x2, 1e-6) << variant;
    s = opt->state();
    // m_2 = 0.9 * 0.2 + 0.1 * (0.5 - x1)
    EXPECT_NEAR(s.at("m/w").data<float>()[0], 0.9f * 0.2f + 0.1f * (0.5f - x1), 1e-6) << variant;
    EXPECT_NEAR(s.at("v/w").data<float>()[0], h.v, 1e-6) << variant;
    EXPECT_EQ(s.at("steps").data<int64_t>()[0], 2);
  }
}

TEST(FedOpt, ResumeFromStateIsBitIdentical) {
  std::mt19937 rng(11);
  for (const std::string variant : {"fedadam", "fedyogi", "fedadagrad"}) {
    NamedArrays start = random_state(rng, 0.0f, 1.0f);
    std::vector<std::vector<SiteUpdate>> rounds;
    for (int r = 0; r < 4; ++r) {
      std::vector<SiteUpdate> ups;
      for (int s = 0; s < 3; ++s)
        ups.push_back(update("s" + std::to_string(s), random_state(rng, 0.1f * r, 0.5f), 10 + s));
      rounds.push_back(std::move(ups));
    }
    // Uninterrupted run.
    auto a = make(variant);
    NamedArrays ga = start;
    for (int r = 0; r < 4; ++r) ga = a->aggregate(ga, rounds[r], {r + 1, 4, 0});
    // Interrupted after round 2: a new instance resumes from the saved state.
    auto b = make(variant);
    NamedArrays g2 = start;
    for (int r = 0; r < 2; ++r) g2 = b->aggregate(g2, rounds[r], {r + 1, 4, 0});
    const NamedArrays saved = b->state();
    b->aggregate(g2, rounds[2], {3, 4, 0});  // the old instance moves on: must not matter
    auto c = make(variant);
    c->load_state(saved);
    NamedArrays gc = g2;
    for (int r = 2; r < 4; ++r) gc = c->aggregate(gc, rounds[r], {r + 1, 4, 0});
    EXPECT_TRUE(identical(ga, gc)) << variant;
    EXPECT_TRUE(identical(a->state(), c->state())) << variant;
    // Resuming without the state gives another result: the comparison can fail.
    auto fresh = make(variant);
    NamedArrays gf = g2;
    for (int r = 2; r < 4; ++r) gf = fresh->aggregate(gf, rounds[r], {r + 1, 4, 0});
    EXPECT_FALSE(identical(ga, gf)) << variant;
  }
}

TEST(FedOpt, LoadStateRejectsForeignEntries) {
  auto opt = make("fedadam");
  EXPECT_THROW(opt->load_state({{"bogus", vec({1})}}), Error);
  // A stored moment of another shape is refused when used.
  opt->load_state({{"m/w", vec({0, 0})}, {"v/w", vec({1, 1})}});
  EXPECT_THROW(opt->aggregate({{"w", vec({1})}}, {update("a", {{"w", vec({2})}})}, {1, 1, 0}),
               Error);
}
