// The site protocol's builders and readers: versions, typed fields, and what readers refuse.
#include <concord/error.h>
#include <concord/protocol.h>

#include <gtest/gtest.h>

#include <cmath>

using namespace concord;

namespace {

// The message of `e` when `f` throws an Error, "" when it does not throw.
template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

Message other_version(Message m, const std::string& version) {
  m.text[protocol::kVersionKey] = version;
  return m;
}

}  // namespace

TEST(Protocol, EveryBuilderStampsTheVersionAndRequestsRoundTripThroughTheWire) {
  const std::vector<std::pair<Message, protocol::Request>> requests = {
      {protocol::train_request(3, {{protocol::kLocalEpochs, 2}}), protocol::Request::Train},
      {protocol::broadcast(3, {}), protocol::Request::Broadcast},
      {protocol::evaluate_request(3, protocol::kPhaseGlobal), protocol::Request::Evaluate},
      {protocol::fit_request(1), protocol::Request::Fit},
      {protocol::set_statistics(1, Stats{}), protocol::Request::SetStatistics},
      {protocol::personalize_request(3), protocol::Request::Personalize},
  };
  for (const auto& [m, kind] : requests) {
    SCOPED_TRACE(m.type);
    EXPECT_EQ(m.text.at(protocol::kVersionKey), std::to_string(protocol::kVersion));
    EXPECT_EQ(protocol::request_kind(decode(encode(m))), kind);
  }
  for (const Message& m :
       {protocol::ack("a", 1), protocol::update("a", 1, {}, 1, 0.5, 2),
        protocol::empty_update("a", 1), protocol::statistics("a", Stats{}),
        protocol::metrics("a", 1, "global", 3, {}), protocol::checkpoint(protocol::Checkpoint{}),
        protocol::global_state(1, {})})
    EXPECT_EQ(protocol::version_problem(m), "") << m.type;
}

TEST(Protocol, AMessageOfAnotherVersionIsRefusedNamingBothVersions) {
  const Message train = other_version(protocol::train_request(1, {}), "99");
  const std::string why = error_of([&] { protocol::request_kind(train); });
  EXPECT_NE(why.find("message 'train' speaks protocol version '99'"), std::string::npos) << why;
  EXPECT_NE(why.find("this build speaks protocol version " + std::to_string(protocol::kVersion)),
            std::string::npos)
      << why;
  Message unversioned = protocol::train_request(1, {});
  unversioned.text.clear();
  EXPECT_NE(
      error_of([&] { protocol::request_kind(unversioned); }).find("carries no protocol version"),
      std::string::npos);
  // The coordinator's readers answer with the reason instead of throwing.
  auto update =
      protocol::read_update(other_version(protocol::update("a", 1, {}, 1, 0.5, 2), "0"), {});
  EXPECT_NE(update.problem.find("speaks protocol version '0'"), std::string::npos)
      << update.problem;
  EXPECT_NE(protocol::ack_problem(other_version(protocol::ack("a", 1), "9")).find("version '9'"),
            std::string::npos);
  EXPECT_FALSE(
      protocol::read_metrics(other_version(protocol::metrics("a", 1, "global", 1, {}), "x")).ok());
  EXPECT_FALSE(
      protocol::read_statistics(other_version(protocol::statistics("a", Stats{}), "2")).ok());
  // A checkpoint is refused the same way.
  const std::string ck = error_of([] {
    protocol::read_checkpoint(other_version(protocol::checkpoint(protocol::Checkpoint{}), "7"), {});
  });
  EXPECT_NE(ck.find("protocol version '7'"), std::string::npos) << ck;
}

TEST(Protocol, AnUnknownRequestIsRefusedByName) {
  Message m = protocol::personalize_request(1);
  m.type = "reboot";
  EXPECT_NE(error_of([&] { protocol::request_kind(m); }).find("unknown request 'reboot'"),
            std::string::npos);
}

TEST(Protocol, TheHarmonizerIndexIsAWholeNumberInRange) {
  EXPECT_EQ(protocol::read_harmonizer(decode(encode(protocol::fit_request(2))), 3), 2u);
  const std::vector<std::pair<double, std::string>> bad = {{3, "names harmonizer 3"},
                                                           {-1, "names harmonizer -1"},
                                                           {0.5, "names harmonizer 0.5"},
                                                           {NAN, "names harmonizer nan"},
                                                           {1e300, "there are 3"}};
  for (const auto& [index, expect] : bad) {
    Message m = protocol::fit_request(0);
    m.scalars[protocol::kHarmonizer] = index;
    const std::string why = error_of([&] { protocol::read_harmonizer(m, 3); });
    EXPECT_NE(why.find(expect), std::string::npos) << index << ": " << why;
  }
  Message none = protocol::fit_request(0);
  none.scalars.clear();
  EXPECT_NE(error_of([&] { protocol::read_harmonizer(none, 3); }).find("names no harmonizer"),
            std::string::npos);
}

TEST(Protocol, SetStatisticsCarriesTheIndexApartFromTheStatistics) {
  Stats s;
  s.arrays["q"] = Array::from(std::vector<double>{1, 2});
  s.scalars["bins"] = 4;
  s.weight = 7;
  protocol::SetStatistics set =
      protocol::read_set_statistics(decode(encode(protocol::set_statistics(1, s))), 2);
  EXPECT_EQ(set.harmonizer, 1u);
  EXPECT_EQ(set.stats.weight, 7);
  EXPECT_EQ(set.stats.scalars, (std::map<std::string, double>{{"bins", 4}}));  // no __harmonizer
  EXPECT_EQ(set.stats.arrays.at("q").numel(), 2);
}

TEST(Protocol, TrainSettingsAreTypedAndChecked) {
  protocol::TrainSettings none = protocol::read_train_request(protocol::train_request(1, {}));
  EXPECT_EQ(none.local_epochs, 1);
  protocol::TrainSettings t =
      protocol::read_train_request(protocol::train_request(1, {{protocol::kLocalEpochs, 3}}));
  EXPECT_EQ(t.local_epochs, 3);
  for (double e : {0.0, 2.5, -1.0, double(NAN), 1e12})
    EXPECT_NE(
        error_of([&] {
          protocol::read_train_request(protocol::train_request(1, {{protocol::kLocalEpochs, e}}));
        }).find("local_epochs"),
        std::string::npos)
        << e;
}

TEST(Protocol, EvaluateRequestNamesAKnownPhase) {
  EXPECT_EQ(
      protocol::read_evaluate_request(protocol::evaluate_request(1, protocol::kPhasePersonalized)),
      protocol::kPhasePersonalized);
  EXPECT_NE(error_of([] {
              protocol::read_evaluate_request(protocol::evaluate_request(1, "later"));
            }).find("without a phase"),
            std::string::npos);
}

TEST(Protocol, AnEmptyUpdateIsReadAsNothingTrained) {
  NamedArrays global{{"w", Array::from(std::vector<float>{0, 0})}};
  auto u = protocol::read_update(decode(encode(protocol::empty_update("a", 1))), global);
  ASSERT_TRUE(u.ok()) << u.problem;
  EXPECT_EQ(u.value->num_samples, 0);
  EXPECT_TRUE(u.value->state.empty());
  auto full = protocol::read_update(
      decode(encode(
          protocol::update("a", 1, {{"w", Array::from(std::vector<float>{1, 2})}}, 5, 0.25, 3))),
      global);
  ASSERT_TRUE(full.ok()) << full.problem;
  EXPECT_EQ(full.value->num_samples, 5);
  EXPECT_EQ(full.value->train_loss, 0.25);
  EXPECT_EQ(full.value->scalars.at(protocol::kSteps), 3);
}

TEST(Protocol, CheckpointRoundTripsAndRefusesEntriesOfUnknownSites) {
  protocol::Checkpoint c;
  c.round = 4;
  c.global["w"] = Array::from(std::vector<float>{1, 2});
  c.aggregator["m"] = Array::from(std::vector<double>{3});
  c.sites["a"] = {{{"bn", Array::from(std::vector<float>{5})}}, {}, true};
  c.sites["a/b"] = {{}, {{"x", Array::from(std::vector<float>{6})}}, false};
  c.pipeline = "name: p\n";
  c.failures = {"round 1: site 'a': slow"};
  protocol::Checkpoint back =
      protocol::read_checkpoint(decode(encode(protocol::checkpoint(c))), {"a", "a/b"});
  EXPECT_EQ(back.round, 4);
  EXPECT_EQ(back.pipeline, c.pipeline);
  EXPECT_EQ(back.failures, c.failures);
  EXPECT_EQ(back.global.at("w").data<float>()[1], 2.f);
  EXPECT_EQ(back.aggregator.at("m").data<double>()[0], 3.0);
  EXPECT_TRUE(back.sites.at("a").trained);
  EXPECT_EQ(back.sites.at("a").local.at("bn").data<float>()[0], 5.f);
  EXPECT_FALSE(back.sites.at("a/b").trained);
  EXPECT_EQ(back.sites.at("a/b").store.at("x").data<float>()[0], 6.f);
  const std::string why = error_of(
      [&] { protocol::read_checkpoint(decode(encode(protocol::checkpoint(c))), {"a/b"}); });
  EXPECT_NE(why.find("names no site of this run"), std::string::npos) << why;
}
