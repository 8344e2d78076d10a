// Secure aggregation: the coordinator's decoded sum equals the plain sum within the quantization
// error, a masked upload is uncorrelated with its update, sites that drop after sharing keys are
// recovered, too few shares abort with a clear error, and the same secrets give the same masks.
#include <concord/error.h>
#include <concord/secagg.h>
#include <concord/seed.h>

#include <gtest/gtest.h>

#include <cmath>
#include <set>

using namespace concord;
using namespace concord::secagg;

namespace {

std::vector<std::vector<float>> random_updates(uint32_t sites, int64_t length, uint64_t seed,
                                               double spread = 1.0) {
  SeededRandom rng(seed);
  std::vector<std::vector<float>> x(sites, std::vector<float>(size_t(length)));
  for (auto& v : x)
    for (auto& e : v) e = float(rng.uniform(-spread, spread));
  return x;
}

struct Drops {
  std::set<uint32_t> before_sharing;  // advertise, then nothing
  std::set<uint32_t> after_sharing;   // share keys, then nothing (recovered from shares)
  std::set<uint32_t> after_input;     // send the masked input, then no unmask reply
};

struct Round {
  Aggregate aggregate;
  std::vector<MaskedInput> uploads;  // what the coordinator received (for the tests' eyes only)
};

// One round as the engine would run it: every stage, sites in order, with the given dropouts.
Round run_round(const Config& c, const std::vector<std::vector<float>>& x,
                const std::vector<uint64_t>& weights, uint64_t seed, const Drops& drops = {},
                int64_t round = 1) {
  std::vector<Site> sites;
  for (uint32_t u = 0; u < c.sites; ++u)
    sites.emplace_back(c, u, simulation_secret(seed, "site-" + std::to_string(u), round));
  Coordinator coord(c);
  for (auto& s : sites) coord.add_advert(s.advertise());
  for (uint32_t u = 0; u < c.sites; ++u) {
    if (drops.before_sharing.count(u)) continue;
    const auto keys = coord.keys_for(u);
    coord.add_shares(sites[u].share_keys(keys));
  }
  Round r;
  for (uint32_t u = 0; u < c.sites; ++u) {
    if (drops.before_sharing.count(u) || drops.after_sharing.count(u)) continue;
    const ShareDelivery d = coord.delivery_for(u);
    r.uploads.push_back(sites[u].masked_input(d, x[u].data(), int64_t(x[u].size()), weights[u]));
    coord.add_masked_input(r.uploads.back());
  }
  const UnmaskRequest req = coord.unmask_request();
  for (uint32_t u : req.survivors)
    if (!drops.after_input.count(u)) coord.add_unmask_reply(sites[u].unmask(req));
  r.aggregate = coord.finish();
  return r;
}

// sum over `included` of w_u * clamp(x_u, clip)
std::vector<double> plain_sum(const std::vector<std::vector<float>>& x,
                              const std::vector<uint64_t>& w, const std::set<uint32_t>& included,
                              double clip) {
  std::vector<double> s(x[0].size(), 0.0);
  for (uint32_t u : included)
    for (size_t j = 0; j < s.size(); ++j)
      s[j] += double(w[u]) * std::clamp(double(x[u][j]), -clip, clip);
  return s;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

double correlation(const std::vector<double>& a, const std::vector<double>& b) {
  const double n = double(a.size());
  double ma = 0, mb = 0;
  for (size_t i = 0; i < a.size(); ++i) ma += a[i] / n, mb += b[i] / n;
  double sab = 0, saa = 0, sbb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    sab += (a[i] - ma) * (b[i] - mb);
    saa += (a[i] - ma) * (a[i] - ma);
    sbb += (b[i] - mb) * (b[i] - mb);
  }
  return sab / std::sqrt(saa * sbb);
}

std::set<uint32_t> all_but(uint32_t n, const std::set<uint32_t>& out) {
  std::set<uint32_t> s;
  for (uint32_t u = 0; u < n; ++u)
    if (!out.count(u)) s.insert(u);
  return s;
}

}  // namespace

TEST(SecAgg, MaskedSumEqualsPlainSumWithinQuantizationError) {
  Config c = Config::defaults(8, 10000, 42);
  EXPECT_EQ(c.neighbours, 7u);  // complete graph at 8 sites
  EXPECT_EQ(c.threshold, 4u);
  const auto x = random_updates(8, 10000, 1, 1.2);  // some values beyond the clip of 1
  const std::vector<uint64_t> ones(8, 1);
  const Round r = run_round(c, x, ones, 7);
  EXPECT_EQ(r.aggregate.total_weight, 8u);
  EXPECT_EQ(r.aggregate.survivors.size(), 8u);
  EXPECT_TRUE(r.aggregate.recovered.empty());
  const auto expected = plain_sum(x, ones, all_but(8, {}), c.clip);
  const double err = max_abs_diff(r.aggregate.weighted_sum, expected);
  EXPECT_LE(err, quantization_error_bound(c, 8));
  EXPECT_GT(err, 0);  // quantized: not bit-exact
  // Stochastic rounding is unbiased: the mean error over 1e4 entries is far below one step.
  double bias = 0;
  for (size_t j = 0; j < expected.size(); ++j)
    bias += (r.aggregate.weighted_sum[j] - expected[j]) / double(expected.size());
  EXPECT_LT(std::fabs(bias), 0.05 * quantization_error_bound(c, 8));

  // Weighted FedAvg: the weight travels inside the masked vector.
  Config w = c;
  w.max_weight = 1000;
  const std::vector<uint64_t> weights = {10, 250, 3, 0, 999, 40, 77, 5};
  const Round rw = run_round(w, x, weights, 8);
  EXPECT_EQ(rw.aggregate.total_weight, 1384u);
  const auto wexp = plain_sum(x, weights, all_but(8, {}), c.clip);
  EXPECT_LE(max_abs_diff(rw.aggregate.weighted_sum, wexp), quantization_error_bound(w, 1384));
  const auto mean = rw.aggregate.mean();
  EXPECT_NEAR(mean[17], wexp[17] / 1384.0, quantization_error_bound(w, 1384) / 1384.0);
  // 8-byte mask words with a modulus of 2^64: the same sum within the same bound.
  Config w64 = w;
  w64.modulus_bits = 64;
  const Round r64 = run_round(w64, x, weights, 8);
  EXPECT_LE(max_abs_diff(r64.aggregate.weighted_sum, wexp), quantization_error_bound(w, 1384));
  EXPECT_NE(r64.uploads[0].values, rw.uploads[0].values);
}

TEST(SecAgg, AMaskedUploadIsUncorrelatedWithItsUpdate) {
  Config c = Config::defaults(8, 10000, 3);
  c.modulus_bits = 32;
  const std::vector<uint64_t> ones(8, 1);
  double mean_r = 0, mean_level = 0;
  const int trials = 20;
  for (int t = 0; t < trials; ++t) {
    const auto x = random_updates(8, 10000, 100 + t);
    const Round r = run_round(c, x, ones, 500 + t);
    std::vector<double> update(x[0].begin(), x[0].end()), seen;
    for (uint64_t y : r.uploads[0].values) seen.push_back(std::ldexp(double(y), -32));
    seen.pop_back();  // the masked weight
    const double rho = correlation(update, seen);
    EXPECT_LT(std::fabs(rho), 0.05) << "trial " << t;  // 5 standard errors (1 / sqrt(1e4))
    mean_r += rho / trials;
    for (double v : seen) mean_level += v / double(seen.size()) / trials;
    // Control: the decoded sum is strongly correlated with the updates' sum (the measure sees
    // dependence where there is some).
    const auto sum = plain_sum(x, ones, all_but(8, {}), c.clip);
    EXPECT_GT(correlation(sum, r.aggregate.weighted_sum), 0.999);
  }
  EXPECT_LT(std::fabs(mean_r), 0.012);  // 1 / sqrt(2e5) = 0.0022
  EXPECT_NEAR(mean_level, 0.5, 0.01);   // uniform over [0, 2^32)
}

TEST(SecAgg, DropoutOfOneAndTwoOfEightIsRecovered) {
  for (const Config base : {Config::defaults(8, 2000, 5), [] {
                              Config s = Config::defaults(8, 2000, 5);
                              s.neighbours = 6;  // sparse: each site misses one other
                              s.threshold = 4;
                              return s;
                            }()}) {
    Config c = base;
    c.max_weight = 50;
    const auto x = random_updates(8, 2000, 9);
    const std::vector<uint64_t> w = {5, 6, 7, 8, 9, 10, 11, 12};
    for (const std::set<uint32_t>& dropped :
         {std::set<uint32_t>{3}, std::set<uint32_t>{2, 6}, std::set<uint32_t>{0, 7}}) {
      const Round r = run_round(c, x, w, 11, {{}, dropped, {}});
      EXPECT_EQ(std::set<uint32_t>(r.aggregate.recovered.begin(), r.aggregate.recovered.end()),
                dropped)
          << "k " << c.neighbours;
      const auto survivors = all_but(8, dropped);
      uint64_t total = 0;
      for (uint32_t u : survivors) total += w[u];
      EXPECT_EQ(r.aggregate.total_weight, total);
      EXPECT_LE(max_abs_diff(r.aggregate.weighted_sum, plain_sum(x, w, survivors, c.clip)),
                quantization_error_bound(c, total))
          << "k " << c.neighbours << ", " << dropped.size() << " dropped";
    }
    // A site dropping before it shares keys is simply left out; one that drops after sending
    // its input (no unmask reply) is still in the sum.
    const Round r = run_round(c, x, w, 12, {{1}, {}, {6}});
    EXPECT_TRUE(r.aggregate.recovered.empty());
    const auto included = all_but(8, {1});
    uint64_t total = 0;
    for (uint32_t u : included) total += w[u];
    EXPECT_EQ(r.aggregate.total_weight, total);
    EXPECT_LE(max_abs_diff(r.aggregate.weighted_sum, plain_sum(x, w, included, c.clip)),
              quantization_error_bound(c, total));
  }
}

TEST(SecAgg, BelowTheThresholdTheRoundAbortsWithAClearError) {
  const Config c = Config::defaults(8, 100, 5);  // k 7, t 4
  const auto x = random_updates(8, 100, 9);
  const std::vector<uint64_t> ones(8, 1);
  // 3 drop after sharing, and 2 of the 5 survivors never answer the unmask request: every
  // secret has at most 3 shares.
  try {
    run_round(c, x, ones, 11, {{}, {0, 1, 2}, {3, 4}});
    FAIL() << "expected SecAggAbort";
  } catch (const SecAggAbort& e) {
    const std::string m = e.what();
    EXPECT_EQ(e.available(), 3u);
    EXPECT_EQ(e.needed(), 4u);
    EXPECT_NE(m.find("self-mask seed of site #3"), std::string::npos) << m;
    EXPECT_NE(m.find("3 available, 4 needed"), std::string::npos) << m;
  }
  // Too few masked inputs: 5 of 8 drop. The sites refuse to reveal shares for so small a sum,
  // and the coordinator refuses to finish.
  try {
    run_round(c, x, ones, 11, {{}, {0, 1, 2, 3, 4}, {}});
    FAIL() << "expected SecAggAbort";
  } catch (const SecAggAbort& e) {
    EXPECT_NE(std::string(e.what()).find("refuses to unmask a sum of too few sites: 3 available, "
                                         "4 needed"),
              std::string::npos)
        << e.what();
  }
  try {
    run_round(c, x, ones, 11, {{}, {0, 1, 2, 3, 4}, {5, 6, 7}});
    FAIL() << "expected SecAggAbort";
  } catch (const SecAggAbort& e) {
    EXPECT_NE(std::string(e.what()).find("too few sites sent a masked input: 3 available, 4 "
                                         "needed"),
              std::string::npos)
        << e.what();
  }
  // The next round proceeds: a fresh coordinator and sites.
  const Round next = run_round(c, x, ones, 11, {}, 2);
  EXPECT_EQ(next.aggregate.total_weight, 8u);
}

TEST(SecAgg, SameSecretsGiveTheSameMasks) {
  const Config c = Config::defaults(5, 500, 1);
  const auto x = random_updates(5, 500, 2);
  const std::vector<uint64_t> ones(5, 1);
  const Round a = run_round(c, x, ones, 77), b = run_round(c, x, ones, 77);
  const Round other = run_round(c, x, ones, 78), next_round = run_round(c, x, ones, 77, {}, 2);
  for (size_t u = 0; u < 5; ++u) {
    EXPECT_EQ(a.uploads[u].values, b.uploads[u].values);
    EXPECT_NE(a.uploads[u].values, other.uploads[u].values);
    EXPECT_NE(a.uploads[u].values, next_round.uploads[u].values);
  }
  EXPECT_EQ(a.aggregate.weighted_sum, b.aggregate.weighted_sum);
  // The simulation secret is a pure function of (seed, site, round); random ones differ.
  EXPECT_EQ(simulation_secret(1, "a", 2), simulation_secret(1, "a", 2));
  EXPECT_NE(simulation_secret(1, "a", 2), simulation_secret(1, "b", 2));
  EXPECT_NE(random_secret(), random_secret());
}

TEST(SecAgg, NeighbourGraphIsRegularSymmetricAndSeeded) {
  Config c = Config::defaults(32, 10, 9);
  EXPECT_EQ(c.neighbours, 12u);
  EXPECT_EQ(c.threshold, 7u);
  const auto g = neighbour_graph(c);
  for (uint32_t u = 0; u < 32; ++u) {
    EXPECT_EQ(g[u].size(), 12u);
    for (uint32_t v : g[u]) {
      EXPECT_NE(u, v);
      EXPECT_TRUE(std::binary_search(g[v].begin(), g[v].end(), u)) << u << " " << v;
    }
  }
  EXPECT_EQ(neighbour_graph(c), g);
  c.graph_seed = 10;
  EXPECT_NE(neighbour_graph(c), g);
}

TEST(SecAgg, ConfigurationIsCheckedIncludingOverflow) {
  auto message = [](const Config& c) {
    try {
      c.check();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  Config c = Config::defaults(32, 10, 1);
  c.quant_bits = 24;
  c.modulus_bits = 32;
  c.max_weight = 200;
  // 32 x 200 x (2^24 - 1) >= 2^32: the sum could wrap.
  EXPECT_NE(message(c).find("does not fit below the modulus 2^32"), std::string::npos)
      << message(c);
  c.modulus_bits = 40;
  EXPECT_EQ(message(c), "");
  // The defaults pick the modulus the weights need.
  EXPECT_EQ(Config::defaults(32, 10, 1).modulus_bits, 32u);
  EXPECT_EQ(Config::defaults(32, 10, 1, 2000).modulus_bits, 32u);  // 32 * 2000 * 65535 < 2^32
  EXPECT_EQ(Config::defaults(32, 10, 1, 100000).modulus_bits, 64u);
  EXPECT_EQ(message(Config::defaults(32, 10, 1, 100000)), "");
  c.neighbours = 5;  // odd and below n - 1
  EXPECT_NE(message(c).find("even"), std::string::npos);
  c.neighbours = 6;
  c.threshold = 7;
  EXPECT_NE(message(c).find("threshold"), std::string::npos);
  c.threshold = 1;
  EXPECT_NE(message(c).find("threshold"), std::string::npos);
  EXPECT_NE(message(Config::defaults(2, 10, 1)).find("at least 3 sites"), std::string::npos);
}

TEST(SecAgg, UntrustedMessagesAreRefused) {
  const Config c = Config::defaults(4, 10, 1);
  std::vector<Site> sites;
  for (uint32_t u = 0; u < 4; ++u) sites.emplace_back(c, u, simulation_secret(3, "s", u));
  Coordinator coord(c);
  KeyAdvert a0 = sites[0].advertise();
  coord.add_advert(a0);
  EXPECT_THROW(coord.add_advert(a0), Error);  // twice
  KeyAdvert stranger = a0;
  stranger.site = 9;
  EXPECT_THROW(coord.add_advert(stranger), Error);  // no such site
  for (uint32_t u = 1; u < 4; ++u) coord.add_advert(sites[u].advertise());
  std::vector<ShareKeys> shares;
  for (uint32_t u = 0; u < 4; ++u) shares.push_back(sites[u].share_keys(coord.keys_for(u)));
  ShareKeys short_box = shares[0];
  short_box.shares[0].box.pop_back();
  EXPECT_THROW(coord.add_shares(short_box), Error);
  // A share tampered with in transit does not decrypt at its recipient.
  ShareKeys tampered = shares[1];
  for (auto& e : tampered.shares)
    if (e.to == 0) e.box[40] ^= 1;
  for (uint32_t u = 0; u < 4; ++u) coord.add_shares(u == 1 ? tampered : shares[u]);
  const ShareDelivery d0 = coord.delivery_for(0);
  const std::vector<float> v(10, 0.5f);
  try {
    sites[0].masked_input(d0, v.data(), 10, 1);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("share from site #1 does not decrypt"), std::string::npos)
        << e.what();
  }
  // Wrong length and out-of-range values are refused by the coordinator; the stage order holds.
  MaskedInput bad{2, std::vector<uint64_t>(5, 0)};
  EXPECT_THROW(coord.add_masked_input(bad), Error);
  EXPECT_THROW(coord.add_shares(shares[0]), Error);  // sharing closed
  EXPECT_THROW(sites[2].advertise(), Error);         // out of order
  // A site never reveals both shares of one owner.
  const ShareDelivery d3 = coord.delivery_for(3);
  sites[3].masked_input(d3, v.data(), 10, 1);
  EXPECT_THROW(sites[3].unmask({{0, 1, 2, 3}, {2}}), Error);
}

TEST(SecAgg, ModelStatesGoThroughAsDeltas) {
  NamedArrays global{{"a.weight", Array::from(std::vector<float>{1, 2, 3})},
                     {"b.bias", Array::from(std::vector<float>{-1})},
                     {"bn.num_batches_tracked", Array::from(std::vector<int64_t>{7})}};
  // Three sites' updates: global + small deltas.
  const Config c = Config::defaults(3, 4, 1);
  std::vector<std::vector<float>> deltas;
  std::vector<double> mean(4, 0.0);
  for (int u = 0; u < 3; ++u) {
    NamedArrays up{
        {"a.weight", Array::from(std::vector<float>{1.0f + 0.1f * float(u + 1), 2, 3.5f})},
        {"b.bias", Array::from(std::vector<float>{-1.25f})},
        {"bn.num_batches_tracked", Array::from(std::vector<int64_t>{9})}};
    deltas.push_back(flatten_delta(up, global));
    ASSERT_EQ(deltas.back().size(), 4u);  // the int64 counter is left out
    for (size_t j = 0; j < 4; ++j) mean[j] += deltas.back()[j] / 3.0;
  }
  const Round r = run_round(c, deltas, {1, 1, 1}, 5);
  const NamedArrays next = apply_delta(global, r.aggregate.mean());
  const double tol = quantization_error_bound(c, 3) / 3 + 1e-6;
  EXPECT_NEAR(next.at("a.weight").data<float>()[0], 1 + mean[0], tol);
  EXPECT_NEAR(next.at("a.weight").data<float>()[2], 3 + mean[2], tol);
  EXPECT_NEAR(next.at("b.bias").data<float>()[0], -1.25, tol);
  EXPECT_EQ(next.at("bn.num_batches_tracked").data<int64_t>()[0], 7);
  EXPECT_THROW(apply_delta(global, {0.0, 0.0}), Error);
  NamedArrays other{{"c", Array::from(std::vector<float>{1})}};
  EXPECT_THROW(flatten_delta(other, global), Error);
}
