// What `concord server` and `concord site` tell each other when a site registers: the
// fingerprint of the pipeline both run (a mismatch is refused), the shape of the site's data (the
// server builds the model for it) and the server run a site serves (a new one: the site starts
// afresh, as a resumed simulation rebuilds its sites).
#pragma once

#include <concord/engine.h>
#include <concord/pipeline.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace concord::net {

// SHA-256 (hex) of the pipeline's federation part: the resolved pipeline without what is each
// process's own business - data.dataset, data.partition, data.scanner_shift (a site's data),
// output and training.threads. data.sites (the federation's roster) and everything that decides
// the computation (seed, model, harmonizers, adapter, training, federation, aggregator, filters,
// evaluation) are in it.
std::string pipeline_fingerprint(const PipelineConfig& config);

// REGISTER's info from a site.
struct SiteHello {
  std::string pipeline;  // pipeline_fingerprint
  DataShape shape;
  // This site process, the same at every reconnection (new_site_instance()): a new value tells
  // the server that a new process, holding none of the run's state, took the site's place.
  std::string instance;
};
std::string encode_site_hello(const SiteHello& hello);
// Throws concord::Error saying what is wrong (not JSON, a field missing, out of range).
SiteHello decode_site_hello(const std::string& info);

// A fresh instance name for SiteHello: 32 hex digits from the operating system's random source
// (an identity, not part of any computation: runs stay reproducible from their seed).
std::string new_site_instance();

// The server's count of site processes per site (RemoteSites::starts): registered() with each
// admitted registration; a site's count grows when its instance differs from the last one seen.
// Thread-safe.
class SiteStarts {
 public:
  void registered(const std::string& site, const std::string& instance);
  uint64_t count(const std::string& site) const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::pair<std::string, uint64_t>> seen_;  // site -> (instance, count)
};

// WELCOME's info from the server.
struct ServerWelcome {
  std::string pipeline;  // pipeline_fingerprint
  std::string session;   // this server process's run: changes when the server restarts
};
std::string encode_server_welcome(const ServerWelcome& welcome);
ServerWelcome decode_server_welcome(const std::string& info);

}  // namespace concord::net
