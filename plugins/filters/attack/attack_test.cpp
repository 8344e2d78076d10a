#include <concord/filter.h>

#include <cmath>
#include <cstring>
#include <random>

#include "filtering.h"
#include "testing.h"

using namespace concord;

namespace {

std::unique_ptr<Filter> make(std::map<std::string, Value> given) {
  const Registry& reg = testkit::builtin_registry();
  const auto& desc = reg.get(Kind::Filter, "attack");
  return reg.create<Filter>(Kind::Filter, "attack", make_args("attack", desc.args, given));
}

std::unique_ptr<Filter> make(const std::string& mode, double factor,
                             std::vector<std::string> sites = {"site-B"}) {
  return make(
      {{"sites", make_value(sites)}, {"mode", make_value(mode)}, {"factor", make_value(factor)}});
}

// global w = {1, 2, -3}; the site trained to {1.5, 1, -3}: Δ = {0.5, -1, 0}.
struct States {
  NamedArrays global{{"w", Array::from(std::vector<float>{1, 2, -3})},
                     {"steps", Array::from(std::vector<int64_t>{4})}};
  NamedArrays update{{"w", Array::from(std::vector<float>{1.5f, 1, -3})},
                     {"steps", Array::from(std::vector<int64_t>{9})}};
};

void apply(Filter& f, NamedArrays& update, const NamedArrays& global, const std::string& site,
           uint64_t seed = 1) {
  std::mt19937_64 rng(seed);
  FilterContext ctx{site, 2, &rng};
  f.apply(update, global, ctx);
}

std::vector<float> w(const NamedArrays& s) {
  return s.at("w").to_vector<float>();
}

}  // namespace

TEST(Attack, OnlyTheListedSitesAreTouched) {
  for (const char* mode : {"scale", "noise", "sign-flip"}) {
    auto f = make(mode, -10.0, {"site-B", "site-D"});
    for (const char* site : {"site-A", "site-C", "site-E"}) {
      States s;
      apply(*f, s.update, s.global, site);
      EXPECT_EQ(w(s.update), (std::vector<float>{1.5f, 1, -3})) << mode << " " << site;
      EXPECT_EQ(s.update.at("steps").data<int64_t>()[0], 9) << mode << " " << site;
    }
    for (const char* site : {"site-B", "site-D"}) {
      States s;
      apply(*f, s.update, s.global, site);
      EXPECT_NE(w(s.update), (std::vector<float>{1.5f, 1, -3})) << mode << " " << site;
      // Non-float entries are never changed.
      EXPECT_EQ(s.update.at("steps").data<int64_t>()[0], 9) << mode << " " << site;
    }
  }
}

TEST(Attack, ScaleMultipliesTheDelta) {
  States s;
  apply(*make("scale", -10.0), s.update, s.global, "site-B");
  // 1 + (-10)(0.5) = -4;  2 + (-10)(-1) = 12;  -3 + 0 = -3.
  EXPECT_EQ(w(s.update), (std::vector<float>{-4, 12, -3}));
  States t;
  apply(*make("scale", 3.0), t.update, t.global, "site-B");
  EXPECT_EQ(w(t.update), (std::vector<float>{2.5f, -1, -3}));
}

TEST(Attack, SignFlipReversesTheDeltaAndIgnoresFactor) {
  for (double factor : {-10.0, 1.0, 7.0}) {
    States s;
    apply(*make("sign-flip", factor), s.update, s.global, "site-B");
    EXPECT_EQ(w(s.update), (std::vector<float>{0.5f, 3, -3})) << factor;
  }
}

TEST(Attack, NoiseReplacesTheUpdateWithGlobalPlusGaussianNoise) {
  States s;
  apply(*make("noise", -2.0), s.update, s.global, "site-B", 99);
  // By hand: the same stream's standard normals z_k give global + |factor| z_k.
  std::mt19937_64 rng(99);
  filtering::StandardNormal z(rng);
  const std::vector<float> g = {1, 2, -3};
  for (int k = 0; k < 3; ++k) EXPECT_FLOAT_EQ(w(s.update)[k], float(g[k] + 2.0 * z())) << k;

  // Statistically: mean 0, std |factor| around the global (not the trained update).
  const int64_t n = 100000;
  NamedArrays global{{"w", Array(DType::F32, {n})}};
  NamedArrays update{{"w", Array(DType::F32, {n})}};
  for (int64_t k = 0; k < n; ++k) update["w"].data<float>()[k] = 5.0f;  // trained far away
  apply(*make("noise", 0.5), update, global, "site-B", 4);
  double sum = 0, sum2 = 0;
  for (int64_t k = 0; k < n; ++k) {
    const double e = update["w"].data<float>()[k];
    sum += e;
    sum2 += e * e;
  }
  const double mean = sum / n;
  EXPECT_NEAR(mean, 0.0, 0.01);                                // SE 0.0016
  EXPECT_NEAR(std::sqrt(sum2 / n - mean * mean), 0.5, 0.005);  // SE 0.0011

  // Deterministic from the context's stream.
  States a, b, c;
  apply(*make("noise", 1.0), a.update, a.global, "site-B", 8);
  apply(*make("noise", 1.0), b.update, b.global, "site-B", 8);
  apply(*make("noise", 1.0), c.update, c.global, "site-B", 9);
  EXPECT_EQ(w(a.update), w(b.update));
  EXPECT_NE(w(a.update), w(c.update));
}

TEST(Attack, ErrorsAndArguments) {
  States s;
  NamedArrays global;
  global["steps"] = s.global.at("steps");
  try {
    apply(*make("scale", -10.0), s.update, global, "site-B");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("attack (site 'site-B', round 2)"), std::string::npos) << m;
    EXPECT_NE(m.find("'w'"), std::string::npos) << m;
  }
  const auto& desc = testkit::builtin_registry().get(Kind::Filter, "attack");
  EXPECT_THROW(make_args("attack", desc.args, {}), Error);  // `sites` is required
  EXPECT_THROW(make_args("attack", desc.args,
                         {{"sites", make_value(std::vector<std::string>{"site-A"})},
                          {"mode", make_value("gradient-ascent")}}),
               Error);
  Args defaults =
      make_args("attack", desc.args, {{"sites", make_value(std::vector<std::string>{"site-A"})}});
  EXPECT_EQ(defaults.str("mode"), "scale");
  EXPECT_EQ(defaults.real("factor"), -10.0);
}
