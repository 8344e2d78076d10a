// The coordinator's side of the harmonizer phase (see harmonization_phase.h).
#include "harmonization_phase.h"

#include <concord/error.h>
#include <concord/harmonizer.h>
#include <concord/protocol.h>

#include <spdlog/spdlog.h>

namespace concord {

std::vector<std::string> Roster::names(bool include_held_out) const {
  std::vector<std::string> out;
  for (const auto& s : order)
    if ((include_held_out || !held.count(s)) && !dropped.count(s)) out.push_back(s);
  return out;
}

void FailureLog::add(const std::string& line) {
  spdlog::error("{}", line);
  lines.push_back(line);
}

namespace {
std::unique_ptr<Harmonizer> combiner(const PipelineConfig& config, const Registry& registry,
                                     size_t i) {
  const auto& hc = config.harmonizers[i];
  return registry.create<Harmonizer>(Kind::Harmonizer, hc.type, hc.args,
                                     {config.seed, "coordinator"});
}
}  // namespace

int HarmonizationPhase::fits(int last, const std::map<int, Stats>& given) const {
  int n = 0;
  for (int i = 0; i <= last; ++i)
    if (!given.count(i) && combiner(config, registry, size_t(i))->needs_fit())
      n += int(roster.names(false).size());
  return n;
}

std::vector<Stats> HarmonizationPhase::run(int last, const std::map<int, Stats>& given) {
  const size_t n = last < 0 ? config.harmonizers.size() : size_t(last) + 1;
  std::vector<Stats> broadcast;
  for (size_t i = 0; i < n; ++i) {
    const auto& hc = config.harmonizers[i];
    const std::string label = "harmonizer " + std::to_string(i) + " (" + hc.type + ")";
    if (on_harmonizer)
      on_harmonizer("harmonizer " + hc.type, int(i), int(config.harmonizers.size()));
    auto combine = combiner(config, registry, i);
    const auto given_here = given.find(int(i));
    const bool from_given = given_here != given.end();
    const bool fit = !from_given && combine->needs_fit();
    Stats global;
    size_t contributed = 0;
    if (from_given) {
      global = given_here->second;
    } else if (fit && combine->learned()) {
      LearnedStageOptions o = learned ? *learned : LearnedStageOptions{};
      o.earlier = &broadcast;  // harmonizers 0 .. i-1
      LearnedStage stage(config, registry, coordinator, roster, failures, std::move(o));
      global = stage.run(i, *combine, [&] { return site_statistics(i, label); });
      contributed = roster.names(false).size();
    } else if (fit) {
      std::vector<Stats> parts = site_statistics(i, label);
      contributed = parts.size();
      if (parts.empty())
        throw Error(label + ": no site sent usable statistics (see the errors above)");
      try {
        global = combine->combine(parts);
      } catch (const std::exception& e) {
        throw Error(label + ": combining the statistics of " + std::to_string(parts.size()) +
                    " sites failed: " + e.what());
      }
    }
    broadcast.push_back(global);
    for (const auto& f : coordinator.set_statistics(i, std::move(global), roster.names(true))) {
      failures.add("fit: " + label + ": " + f.what + " (could not apply the statistics; site " +
                   "dropped from the run)");
      roster.dropped.insert(f.site);
    }
    const std::string how = from_given ? "given statistics"
                            : fit      ? "fitted on " + std::to_string(contributed) + " sites"
                                       : "site-local (nothing to fit)";
    spdlog::info("{}: {}, applied at {} sites", label, how, roster.names(true).size());
  }
  return broadcast;
}

std::string resend_statistics(Coordinator& coordinator, const std::vector<Stats>& stats,
                              const std::string& site) {
  for (size_t i = 0; i < stats.size(); ++i)
    for (const auto& f : coordinator.set_statistics(i, stats[i], {site})) return f.what;
  return "";
}

// Every training site's fit_site() statistics for harmonizers[i], minus the ones that fail or
// that protocol::read_statistics() refuses. The entries most sites agree on (names, dtypes,
// shapes) are the reference, so one odd site cannot make the others look wrong.
std::vector<Stats> HarmonizationPhase::site_statistics(size_t i, const std::string& label) {
  Coordinator::Failures refused;
  const std::string phase = "fit " + config.harmonizers[i].type;
  auto replies =
      coordinator.fit_statistics(i, roster.names(false), refused, [&](const std::string&) {
        if (on_fit) on_fit(phase);
      });
  for (const auto& f : refused) failures.add("fit: " + label + ": " + f.what + " (left out)");
  const Stats* reference = nullptr;
  size_t best = 0;
  for (const auto& [name, candidate] : replies) {
    size_t agree = 0;
    for (const auto& [other, s] : replies)
      agree += protocol::statistics_mismatch(s, candidate).empty();
    if (agree > best) best = agree, reference = &candidate;
  }
  std::vector<Stats> parts;
  for (const auto& [name, stats] : replies) {
    if (std::string why = protocol::statistics_mismatch(stats, *reference); !why.empty()) {
      failures.add("fit: " + label + ": site '" + name + "': " + why + " (left out)");
      continue;
    }
    parts.push_back(stats);
    parts.back().site = name;
  }
  return parts;
}

}  // namespace concord
