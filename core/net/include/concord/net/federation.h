// What `concord server` and `concord site` tell each other when a site registers: the
// fingerprint of the pipeline both run (a mismatch is refused), the shape of the site's data (the
// server builds the model for it) and the server run a site serves (a new one: the site starts
// afresh, as a resumed simulation rebuilds its sites).
#pragma once

#include <concord/engine.h>
#include <concord/pipeline.h>

#include <string>

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
};
std::string encode_site_hello(const SiteHello& hello);
// Throws concord::Error saying what is wrong (not JSON, a field missing, out of range).
SiteHello decode_site_hello(const std::string& info);

// WELCOME's info from the server.
struct ServerWelcome {
  std::string pipeline;  // pipeline_fingerprint
  std::string session;   // this server process's run: changes when the server restarts
};
std::string encode_server_welcome(const ServerWelcome& welcome);
ServerWelcome decode_server_welcome(const std::string& info);

}  // namespace concord::net
