// Secure aggregation through the engine (the pipeline's `secure_aggregation:`): the same model as
// plain FedAvg within quantization error, no plain update on the wire, a site that drops after
// sharing keys recovered, a round below the threshold aborted while the next one proceeds, and
// aggregators that need individual updates refused.
#include <concord/engine.h>
#include <concord/error.h>
#include <concord/protocol.h>

#include <spdlog/sinks/sink.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <mutex>
#include <set>

#include "testing.h"

using namespace concord;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string pipeline(int rounds, const std::string& extra = "") {
  return "name: secagg-test\nseed: 3\n"
         "data:\n  dataset: {type: brainsim, args: {sites: 4, train_per_site: 10, test_per_site: "
         "4, size: 32}}\n"
         "model: {type: cnn, args: {width: 8, depth: 2}}\n"
         "training: {local_epochs: 1, batch_size: 5, lr: 0.01}\n"
         "federation: {rounds: " +
         std::to_string(rounds) + "}\n" + extra;
}

// The range must hold every delta value, BatchNorm running variances included.
const std::string kSecure = "secure_aggregation: {secrets: seeded, range: 8, bits: 20}\n";
const double kStep = 16.0 / ((1 << 20) - 1);  // one quantization step of [-8, 8]

PipelineConfig config(const std::string& text, std::vector<std::string> sets = {}) {
  return parse_pipeline(text, "secagg-test.yaml", sets, testkit::builtin_registry());
}

// Records every exchange (request and reply) and fails chosen (site, message type, round).
class Wire : public Channel {
 public:
  struct Exchange {
    std::string site;
    Message request, reply;
  };
  Wire(Channel& inner, std::vector<Exchange>& log,
       std::set<std::tuple<std::string, std::string, int>> fail)
      : inner_(inner), log_(log), fail_(std::move(fail)) {}
  Bytes call(const std::string& site, const Bytes& request) override {
    Message in = decode(request);
    if (fail_.count({site, in.type, int(in.round)}))
      throw SiteError(site, "connection lost (test)");
    Bytes reply = inner_.call(site, request);
    log_.push_back({site, in, decode(reply)});
    return reply;
  }

 private:
  Channel& inner_;
  std::vector<Exchange>& log_;
  std::set<std::tuple<std::string, std::string, int>> fail_;
};

struct Ran {
  RunSummary summary;
  NamedArrays global;
  std::vector<Wire::Exchange> log;
  std::vector<json> lines;
};

Ran run(const PipelineConfig& c, std::set<std::tuple<std::string, std::string, int>> fail = {}) {
  testkit::TempDir dir;
  Experiment e(c, testkit::builtin_registry());
  Ran r;
  e.interpose_channel(
      [&](Channel& inner) { return std::make_unique<Wire>(inner, r.log, std::move(fail)); });
  RunOptions o;
  o.run_dir = dir.str();
  r.summary = e.run(o);
  r.global = e.global_state();
  std::ifstream in(dir.path() / "metrics.jsonl");
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) r.lines.push_back(json::parse(line));
  return r;
}

// Largest difference over the float32 entries.
double max_diff(const NamedArrays& a, const NamedArrays& b) {
  double d = 0;
  for (const auto& [name, x] : a) {
    if (x.dtype() != DType::F32) continue;
    const Array& y = b.at(name);
    for (int64_t k = 0; k < x.numel(); ++k)
      d = std::max(d, std::fabs(double(x.data<float>()[k]) - double(y.data<float>()[k])));
  }
  return d;
}

std::vector<std::string> sites_of(const Ran& r) {
  std::set<std::string> s;
  for (const auto& e : r.log) s.insert(e.site);
  return {s.begin(), s.end()};
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += x + "\n";
  return s;
}

bool aggregated(const Ran& r, int round) {
  for (const auto& l : r.lines)
    if (l["round"] == round) return l["aggregated"].get<bool>();
  return false;
}

}  // namespace

TEST(SecureRound, FinalModelEqualsPlainFedAvgWithinQuantizationError) {
  const Ran plain = run(config(pipeline(1)));
  const Ran secure = run(config(pipeline(1, kSecure)));
  EXPECT_TRUE(secure.summary.failures.empty());
  // One round: every value of the mean is off by less than one quantization step (each site's
  // rounding error is below a step; the mean's too), plus float32 rounding.
  const double d = max_diff(plain.global, secure.global);
  EXPECT_LE(d, kStep + 1e-6) << d;
  EXPECT_GT(d, 0.0);  // quantized: not bit-identical (the comparison can fail)
  // And over two rounds the models stay together.
  const double d2 =
      max_diff(run(config(pipeline(2))).global, run(config(pipeline(2, kSecure))).global);
  EXPECT_LE(d2, 1e-3) << d2;
}

// What crosses the wire in a secure run: no update message, and every site's upload is a masked
// vector of 64-bit words (no float32 array leaves a site while rounds train).
TEST(SecureRound, NoPlainUpdateCrossesTheChannel) {
  const Ran r = run(config(pipeline(2, kSecure)));
  size_t masked = 0;
  for (const auto& e : r.log) {
    EXPECT_NE(e.reply.type, protocol::kUpdate) << e.site;
    EXPECT_NE(e.request.type, protocol::kTrain) << e.site;
    if (e.reply.type == protocol::kSecAggMasked) {
      ++masked;
      ASSERT_EQ(e.reply.arrays.size(), 1u);
      EXPECT_EQ(e.reply.arrays.begin()->second.dtype(), DType::I64);
      EXPECT_FALSE(e.reply.scalars.count(protocol::kNumSamples));
    }
    if (std::string(e.request.type).rfind("secagg-", 0) == 0) {
      for (const auto& [k, a] : e.reply.arrays) {
        EXPECT_NE(a.dtype(), DType::F32) << k;
      }
    }
  }
  EXPECT_EQ(masked, 8u);  // 4 sites x 2 rounds
}

// A site that shared its keys and then drops (its train request fails) is recovered from its
// neighbours' shares: the round aggregates the other three, as plain FedAvg does without it.
TEST(SecureRound, ASiteDroppingAfterKeySharingIsRecovered) {
  const auto sites = sites_of(run(config(pipeline(1))));
  ASSERT_EQ(sites.size(), 4u);
  const std::string gone = sites[1];
  const Ran secure = run(config(pipeline(1, kSecure)), {{gone, protocol::kSecAggTrain, 1}});
  EXPECT_TRUE(aggregated(secure, 1));
  ASSERT_EQ(secure.summary.failures.size(), 1u);
  EXPECT_NE(secure.summary.failures[0].find(gone), std::string::npos);
  const Ran plain = run(config(pipeline(1)), {{gone, protocol::kTrain, 1}});
  EXPECT_LE(max_diff(plain.global, secure.global), kStep + 1e-6);
  // The unmask request told the survivors who dropped.
  bool told = false;
  for (const auto& e : secure.log)
    if (e.request.type == std::string(protocol::kSecAggUnmask))
      told = told || e.request.arrays.at("dropped").numel() == 1;
  EXPECT_TRUE(told);
}

// With threshold 3 and two sites lost after sharing keys, the round cannot be unmasked: it is
// not aggregated, named in the failures, and the next round proceeds.
TEST(SecureRound, BelowTheThresholdTheRoundAbortsAndTheNextProceeds) {
  const auto sites = sites_of(run(config(pipeline(1))));
  const Ran r = run(config(pipeline(2, "secure_aggregation: {secrets: seeded, threshold: 3}\n")),
                    {{sites[0], protocol::kSecAggTrain, 1}, {sites[2], protocol::kSecAggTrain, 1}});
  EXPECT_FALSE(aggregated(r, 1));
  EXPECT_TRUE(aggregated(r, 2));
  bool named = false;
  for (const auto& f : r.summary.failures)
    named = named || (f.find("round 1: not aggregated") != std::string::npos &&
                      f.find("secure aggregation aborted") != std::string::npos);
  EXPECT_TRUE(named) << join(r.summary.failures);
}

TEST(SecureRound, AggregatorsThatNeedIndividualUpdatesAreRefused) {
  for (const std::string agg : {"median", "krum", "trimmed-mean"}) {
    Experiment e(config(pipeline(1, kSecure + "aggregator: " + agg + "\n")),
                 testkit::builtin_registry());
    testkit::TempDir dir;
    RunOptions o;
    o.run_dir = dir.str();
    const std::string err = testkit::error_of([&] { e.run(o); });
    EXPECT_NE(err.find("secagg-test.yaml:8:"), std::string::npos) << err;
    EXPECT_NE(err.find("aggregator '" + agg + "'"), std::string::npos) << err;
    EXPECT_NE(err.find("needs the individual updates"), std::string::npos) << err;
  }
}

// A site whose pipeline asks for secure aggregation refuses a plain train request.
TEST(SecureRound, SitesRefuseAPlainTrainRequest) {
  const auto sites = sites_of(run(config(pipeline(1))));
  Experiment e(config(pipeline(1, kSecure)), testkit::builtin_registry());
  std::string refusal;
  e.interpose_channel([&](Channel& inner) {
    struct Probe : Channel {
      Channel& in;
      std::string& out;
      std::string site;
      Probe(Channel& i, std::string& o, std::string s) : in(i), out(o), site(std::move(s)) {}
      Bytes call(const std::string& s, const Bytes& request) override {
        if (out.empty() && decode(request).type == std::string(protocol::kSecAggSetup)) {
          try {
            in.call(s, encode(protocol::train_request(1, {{protocol::kLocalEpochs, 1}})));
            out = "accepted";
          } catch (const std::exception& e) {
            out = e.what();
          }
        }
        return in.call(s, request);
      }
    };
    return std::make_unique<Probe>(inner, refusal, sites[0]);
  });
  testkit::TempDir dir;
  RunOptions o;
  o.run_dir = dir.str();
  e.run(o);
  EXPECT_NE(refusal.find("refusing a plain train request"), std::string::npos) << refusal;
}

// Local DP noise composes with secure aggregation: epsilon is accounted per round.
TEST(SecureRound, ComposesWithLocalDifferentialPrivacy) {
  const Ran r =
      run(config(pipeline(2, kSecure + "privacy: {epsilon: 8, mode: local, clip: 0.5}\n")));
  EXPECT_TRUE(r.summary.failures.empty()) << join(r.summary.failures);
  EXPECT_TRUE(aggregated(r, 2));
  EXPECT_NE(r.summary.privacy.find("local noise"), std::string::npos) << r.summary.privacy;
  for (const auto& e : r.log) {
    if (e.request.type == std::string(protocol::kSecAggTrain)) {
      EXPECT_GT(e.request.scalars.at(protocol::kDpNoiseStd), 0.0);
    }
  }
}

// The coordinator sees the survivors' weights only as their sum: under weighted FedAvg that is
// the round's total of training samples, logged as round_num_samples; no site's own count is
// logged (the aggregator's per-site weight 1 is not a count). Under equal weights nothing is.
TEST(SecureRound, TheRoundsTotalSampleCountIsLoggedNotEachSites) {
  for (const std::string weights : {"samples", "equal"}) {
    const Ran r = run(config(pipeline(1, kSecure), {"secure_aggregation.weights=" + weights}));
    EXPECT_TRUE(r.summary.failures.empty()) << join(r.summary.failures);
    int trained = 0;
    for (const auto& l : r.lines) {
      if (!l.contains("train_loss")) continue;
      ++trained;
      EXPECT_FALSE(l.contains("num_samples")) << l.dump();
      if (weights == "samples") {
        EXPECT_EQ(l["round_num_samples"], 40) << l.dump();  // 4 sites x 10 training samples
      } else {
        EXPECT_FALSE(l.contains("round_num_samples")) << l.dump();
      }
    }
    EXPECT_EQ(trained, 4) << weights;
  }
}

// Sample-level DP (each site's upload is already private) under secure aggregation: the
// coordinator accounts each site from the sizes it knew at set-up (simulation).
TEST(SecureRound, ComposesWithSampleLevelDifferentialPrivacy) {
  const Ran r = run(config(pipeline(2, kSecure + "privacy: {level: sample, epsilon: 8}\n"),
                           {"model.args.norm=group"}));
  EXPECT_TRUE(r.summary.failures.empty()) << join(r.summary.failures);
  EXPECT_TRUE(aggregated(r, 2));
  EXPECT_NE(r.summary.privacy.find("sample level"), std::string::npos) << r.summary.privacy;
  for (const auto& l : r.lines) {
    EXPECT_EQ(l["privacy"]["site_epsilon"].size(), 4u);
    EXPECT_GT(l["privacy"]["epsilon"].get<double>(), 0.0);
  }
}

namespace {

// Keeps the text of every message logged (no formatting: the payload only).
class KeepingSink : public spdlog::sinks::sink {
 public:
  void log(const spdlog::details::log_msg& m) override {
    std::lock_guard<std::mutex> lock(mutex_);
    lines_.emplace_back(m.payload.data(), m.payload.size());
  }
  void flush() override {}
  void set_pattern(const std::string&) override {}
  void set_formatter(std::unique_ptr<spdlog::formatter>) override {}
  int count(const std::string& needle) {
    std::lock_guard<std::mutex> lock(mutex_);
    int n = 0;
    for (const auto& l : lines_) n += l.find(needle) != std::string::npos;
    return n;
  }

 private:
  std::mutex mutex_;
  std::vector<std::string> lines_;
};

}  // namespace

// The default range (64, at 24 bits) holds every delta value of a model with BatchNorm on the
// built-in data, running variances included: no site warns that it clipped, and the model is
// plain FedAvg's within one quantization step. The control: range 1 (the former default) clips.
TEST(SecureRound, TheDefaultRangeHoldsBatchNormStatisticsOnBuiltInData) {
  auto sink = std::make_shared<KeepingSink>();
  auto& sinks = spdlog::default_logger()->sinks();
  sinks.push_back(sink);
  const auto clipped = [&] { return sink->count("are clipped"); };
  const Ran plain = run(config(pipeline(1)));
  const Ran secure = run(config(pipeline(1, "secure_aggregation: {secrets: seeded}\n")));
  EXPECT_EQ(clipped(), 0);
  EXPECT_LE(max_diff(plain.global, secure.global), 128.0 / ((1 << 24) - 1) + 1e-6);
  bool has_running_var = false;
  for (const auto& [name, a] : secure.global)
    has_running_var |= name.find("running_var") != std::string::npos;
  EXPECT_TRUE(has_running_var);  // BatchNorm statistics are in the masked sum
  run(config(pipeline(1, "secure_aggregation: {secrets: seeded, range: 1, bits: 16}\n")));
  EXPECT_GT(clipped(), 0);
  sinks.pop_back();
}
