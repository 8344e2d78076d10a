// Test seam: a Channel that wraps another and makes sites misbehave, for tests of how the engine
// copes with failing and hostile peers. Production code never builds one; a test interposes it
// with Experiment::interpose_channel() (or wraps any Channel given to a Coordinator).
#pragma once

#include <concord/channel.h>
#include <concord/engine.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>

namespace concord::test_seam {

// Makes a site fail its train request in a given round, and lets a test rewrite any reply a site
// sends (a misbehaving peer: wrong shapes, bogus scalars) before the coordinator reads it.
struct FaultPlan {
  std::map<std::pair<std::string, int>, std::string> fail;  // (site, round) -> message
  std::function<void(const std::string& site, Message& reply)> tamper;
};

class FaultInjectingChannel : public Channel {
 public:
  FaultInjectingChannel(Channel& inner, FaultPlan plan) : inner_(inner), plan_(std::move(plan)) {}
  Bytes call(const std::string& site, const Bytes& request) override;

 private:
  Channel& inner_;
  FaultPlan plan_;
};

// Every exchange of `experiment` goes through a FaultInjectingChannel with `plan`.
inline void inject_faults(Experiment& experiment, FaultPlan plan) {
  experiment.interpose_channel([plan = std::move(plan)](Channel& inner) mutable {
    return std::make_unique<FaultInjectingChannel>(inner, std::move(plan));
  });
}

}  // namespace concord::test_seam
