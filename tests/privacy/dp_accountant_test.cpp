// The RDP accountant against published reference values (Opacus tests/accountants_test.py,
// TF-Privacy rdp_accountant_test.py and compute_dp_sgd_privacy_test.py) and against an
// independent re-implementation run once: multi-precision (mpmath, 40 digits) exact binomial
// sums for integer orders and numerical integration of the definition of A_alpha for
// fractional ones; its values are recorded here (marked "mpmath").
#include <concord/dp_accountant.h>
#include <concord/error.h>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

using namespace concord;
using namespace concord::dp;

namespace {

// |actual - expected| <= rel * |expected|
::testing::AssertionResult near_rel(double actual, double expected, double rel) {
  if (std::fabs(actual - expected) <= rel * std::fabs(expected))
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << actual << " differs from " << expected << " by more "
                                       << "than " << rel << " relative";
}

double steps_of(int64_t n, int64_t batch, double epochs) {
  return std::ceil(epochs * double(n) / double(batch));
}

}  // namespace

TEST(RdpAccountant, SingleStepRdpMatchesTfPrivacyAndMpmath) {
  // TF-Privacy test_compute_rdp_scalar: compute_rdp(q 0.1, sigma 2, steps 10, order 5) = 0.07737.
  EXPECT_NEAR(rdp_sampled_gaussian(0.1, 2, 10, {5})[0], 0.07737, 1e-5);
  EXPECT_TRUE(near_rel(rdp_sampled_gaussian(0.1, 2, 10, {5})[0], 0.07736968489795865, 1e-9));

  // TF-Privacy test_compute_rdp_sequence: q 0.01, sigma 2.5, 50 steps (published to 1e-5
  // absolute), and the mpmath values to 1e-6 relative (integration: fractional orders).
  const std::vector<double> orders = {1.5, 2.5, 5, 50, 100};
  const std::vector<double> tf = {0.00065, 0.001085, 0.00218075, 0.023846, 167.416307};
  const std::vector<double> mp = {0.0006500708971880398, 0.0010854180569181244,
                                  0.0021807565623078807, 0.02384603753870617, 167.41630754841825};
  const auto r = rdp_sampled_gaussian(0.01, 2.5, 50, orders);
  for (size_t i = 0; i < orders.size(); ++i) {
    EXPECT_NEAR(r[i], tf[i], 1e-5) << "order " << orders[i];
    EXPECT_TRUE(near_rel(r[i], mp[i], 1e-6)) << "order " << orders[i];
  }

  // TF-Privacy test_compute_log_a_equals_mp parameters (and two of Opacus's range): mpmath.
  struct Case {
    double q, sigma, order, rdp;
  };
  for (const Case& c :
       {Case{1e-4, 1.0, 1.5, 1.2885373907673299e-08}, Case{1e-3, 1.0, 2, 1.7182803522145153e-06},
        Case{0.01, 10, 20, 1.0068263112022611e-05}, Case{0.1, 100, 20.5, 1.0252214593881177e-05},
        Case{0.04, 1.5, 2.7, 0.0012296593331470463}, Case{0.04, 1.5, 10.9, 0.006591672068072908},
        Case{0.3, 0.8, 3.5, 1.1362959070207894}})
    EXPECT_TRUE(near_rel(rdp_sampled_gaussian(c.q, c.sigma, c.order), c.rdp, 1e-6))
        << "q " << c.q << " sigma " << c.sigma << " order " << c.order;
}

TEST(RdpAccountant, EdgeCasesOfTheMechanism) {
  EXPECT_EQ(rdp_sampled_gaussian(0, 10, 20), 0);             // no data: nothing spent
  EXPECT_DOUBLE_EQ(rdp_sampled_gaussian(1, 10, 20), 0.1);    // no sampling: a / (2 sigma^2)
  EXPECT_TRUE(std::isinf(rdp_sampled_gaussian(0.5, 0, 2)));  // no noise
  EXPECT_TRUE(std::isinf(rdp_sampled_gaussian(0.5, 1, std::numeric_limits<double>::infinity())));
  EXPECT_THROW(rdp_sampled_gaussian(1.5, 1, 2), Error);
  EXPECT_THROW(rdp_sampled_gaussian(0.5, -1, 2), Error);
  EXPECT_THROW(rdp_sampled_gaussian(0.5, 1, 1.0), Error);
  // More noise, less sampling, fewer steps: less RDP.
  EXPECT_LT(rdp_sampled_gaussian(0.01, 2, 8), rdp_sampled_gaussian(0.01, 1, 8));
  EXPECT_LT(rdp_sampled_gaussian(0.01, 1, 8), rdp_sampled_gaussian(0.02, 1, 8));
}

TEST(RdpAccountant, OpacusReferenceEpsilon) {
  // Opacus test_rdp_accountant: sigma 1.5, q 0.04, int(90 / 0.04) steps, delta 1e-5
  // -> 7.32911117143 with Opacus's order grid; mpmath over the same grid: 7.329111171... (see the
  // header).
  RdpAccountant acc(opacus_orders());
  for (int i = 0; i < 2250; ++i) acc.step(1.5, 0.04);
  EXPECT_EQ(acc.history().size(), 1u);  // identical steps merge
  EXPECT_EQ(acc.total_steps(), 2250);
  EXPECT_TRUE(near_rel(acc.epsilon(1e-5).epsilon, 7.32911117143, 1e-6));
}

TEST(RdpAccountant, TfPrivacyComputeDpSgdPrivacyReferences) {
  // compute_dp_sgd_privacy_test: (n, batch, sigma, epochs, delta) -> (eps, order), default grid.
  struct Case {
    int64_t n, batch;
    double sigma, epochs, delta, eps, order;
  };
  for (const Case& c : {Case{60000, 150, 1.3, 15, 1e-5, 0.7242234026109595, 19.0},
                        Case{100000, 100, 1.0, 30, 1e-7, 1.4154988495444845, 13.0},
                        Case{100000000, 1024, 0.1, 10, 1e-7, 5907982.31138195, 1.25}}) {
    RdpAccountant acc;
    acc.step(c.sigma, double(c.batch) / double(c.n), int64_t(steps_of(c.n, c.batch, c.epochs)));
    const Epsilon e = acc.epsilon(c.delta);
    EXPECT_TRUE(near_rel(e.epsilon, c.eps, 1e-6)) << "n " << c.n;
    EXPECT_EQ(e.order, c.order) << "n " << c.n;
  }
}

TEST(RdpAccountant, ConversionMatchesTfPrivacyGetPrivacySpent) {
  // Constant RDP 1.1 over orders 2..32 (pure DP): the largest order wins, eps 1.32783806176.
  std::vector<double> orders;
  for (int a = 2; a <= 32; ++a) orders.push_back(a);
  const Epsilon e = epsilon_from_rdp(orders, std::vector<double>(orders.size(), 1.1), 1e-5);
  EXPECT_NEAR(e.epsilon, 1.32783806176, 1e-10);
  EXPECT_EQ(e.order, 32);

  // The Gaussian mechanism without sampling at sigma 4.530877117 is exactly (1, 1e-6)-DP; a fine
  // grid of orders recovers eps = 1 (TF-Privacy: assertAlmostEqual, 7 places).
  std::vector<double> fine;
  for (int i = 1001; i < 100000; ++i) fine.push_back(0.001 * i);
  const Epsilon g = epsilon_from_rdp(fine, rdp_sampled_gaussian(1, 4.530877117, 1, fine), 1e-6);
  EXPECT_NEAR(g.epsilon, 1.0, 5e-7);

  // Nothing spent yet: epsilon 0; and a large delta with little RDP: the KL bound gives 0.
  EXPECT_EQ(RdpAccountant().epsilon(1e-5).epsilon, 0);
  EXPECT_EQ(epsilon_from_rdp({2, 3}, {1e-4, 1e-4}, 0.5).epsilon, 0);
  EXPECT_THROW(epsilon_from_rdp({2, 3}, {1, 1}, 0), Error);
  EXPECT_THROW(epsilon_from_rdp({2, 3}, {1}, 1e-5), Error);
}

TEST(RdpAccountant, HeterogeneousCompositionAddsRdp) {
  // Two phases with different (q, sigma): RDP adds per order. mpmath value over the default grid.
  RdpAccountant acc;
  acc.step(1.1, 0.01, 1000);
  acc.step(2.0, 0.05, 200);
  EXPECT_EQ(acc.history().size(), 2u);
  const auto r = acc.rdp();
  const auto r1 = rdp_sampled_gaussian(0.01, 1.1, 1000, default_orders());
  const auto r2 = rdp_sampled_gaussian(0.05, 2.0, 200, default_orders());
  for (size_t i = 0; i < r.size(); ++i) EXPECT_DOUBLE_EQ(r[i], r1[i] + r2[i]);
  EXPECT_TRUE(near_rel(acc.epsilon(1e-5).epsilon, 2.4224848318259697, 1e-6));
  // Order does not matter; epsilon grows with every step.
  RdpAccountant swapped;
  swapped.step(2.0, 0.05, 200);
  swapped.step(1.1, 0.01, 1000);
  EXPECT_NEAR(swapped.epsilon(1e-5).epsilon, acc.epsilon(1e-5).epsilon, 1e-12);
  EXPECT_GT(acc.epsilon_after(1.1, 0.01, 1, 1e-5).epsilon, acc.epsilon(1e-5).epsilon);
  EXPECT_EQ(acc.total_steps(), 1200);  // epsilon_after does not record
}

TEST(RdpAccountant, NoiseMultiplierForATargetBudget) {
  // Opacus's get_noise_multiplier procedure (bracket [0, 10] doubled, bisection to tolerance
  // 0.01) on Opacus's grid: eps 8, delta 1e-5, q 0.04, int(90 / 0.04) steps. Bisection from 0
  // and 20 lands on the dyadic 1.416015625, whose epsilon (mpmath: 7.99...) is within the
  // tolerance. Opacus's test pins 1.425307617, a value from an earlier Opacus: with today's
  // accountant (and ours, and the mpmath reference: 7.91895) it spends 7.919, outside its own
  // tolerance, so it is checked here only to 1% (as other ports of that test do).
  const double sigma = noise_multiplier_for(8, 1e-5, 0.04, 2250, opacus_orders(), 0.01);
  EXPECT_EQ(sigma, 1.416015625);
  RdpAccountant at(opacus_orders());
  at.step(sigma, 0.04, 2250);
  EXPECT_LE(at.epsilon(1e-5).epsilon, 8.0);
  EXPECT_GE(at.epsilon(1e-5).epsilon, 8.0 - 0.01);
  EXPECT_TRUE(near_rel(sigma, 1.425307617, 0.01));
  RdpAccountant published(opacus_orders());
  published.step(1.425307617, 0.04, 2250);
  EXPECT_TRUE(near_rel(published.epsilon(1e-5).epsilon, 7.918950227528295, 1e-6));
  // A tight tolerance: epsilon lands just below the target, never above.
  const double tight = noise_multiplier_for(8, 1e-5, 0.04, 2250, default_orders(), 1e-7);
  RdpAccountant acc;
  acc.step(tight, 0.04, 2250);
  EXPECT_LE(acc.epsilon(1e-5).epsilon, 8.0);
  EXPECT_GT(acc.epsilon(1e-5).epsilon, 8.0 - 1e-6);
  // A budget no noise can meet is refused with the numbers.
  try {
    noise_multiplier_for(1e-9, 1e-5, 1.0, 1000000000);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no noise multiplier"), std::string::npos) << e.what();
  }
}

TEST(RdpAccountant, HistoryRoundTripsThroughNamedArrays) {
  RdpAccountant acc(opacus_orders());
  acc.step(1.1, 0.01, 30);
  acc.step(0.9, 1.0, 2);
  NamedArrays state;
  acc.save(state, "privacy/");
  EXPECT_EQ(state.size(), 4u);
  const RdpAccountant back = RdpAccountant::load(state, "privacy/");
  EXPECT_EQ(back.orders(), acc.orders());
  ASSERT_EQ(back.history().size(), 2u);
  EXPECT_EQ(back.history()[1].steps, 2);
  EXPECT_EQ(back.epsilon(1e-5).epsilon, acc.epsilon(1e-5).epsilon);

  // Untrusted: a missing entry, a wrong dtype, mismatched lengths, a bad value are named.
  auto expect_error = [](NamedArrays s, const std::string& needle) {
    try {
      RdpAccountant::load(s, "privacy/");
      ADD_FAILURE() << "expected an error naming " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  NamedArrays missing = state;
  missing.erase("privacy/sigma");
  expect_error(missing, "privacy/sigma");
  NamedArrays dtype = state;
  dtype["privacy/steps"] = Array::from(std::vector<double>{30, 2}, {2});
  expect_error(dtype, "privacy/steps");
  NamedArrays length = state;
  length["privacy/q"] = Array::from(std::vector<double>{0.01}, {1});
  expect_error(length, "differ in length");
  NamedArrays bad = state;
  bad["privacy/q"] = Array::from(std::vector<double>{0.01, 1.5}, {2});
  expect_error(bad, "history entry 1");
  NamedArrays neg = state;
  neg["privacy/steps"] = Array::from(std::vector<int64_t>{30, -2}, {2});
  expect_error(neg, "history entry 1");
}
