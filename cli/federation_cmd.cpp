// `concord server` and `concord site`: one federation across processes or machines, the sites
// connecting to the server over gRPC with mutual TLS (core/net).
//   concord server --kit KITS/server PIPELINE.yaml [--resume RUN_DIR] [--run-dir DIR] [--insecure]
//   concord site --kit KITS/site-A PIPELINE.yaml [--data KEY=VALUE]...
// The server runs the coordinator's side of `concord run` (no data: the model is built for the
// data shape the sites report); each site loads its own data and answers as in simulation.
#include "commands.h"

#include <concord/engine.h>
#include <concord/error.h>
#include <concord/net/federation.h>
#include <concord/net/kit.h>
#include <concord/protocol.h>

#include <spdlog/spdlog.h>

#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <mutex>

namespace concord::cli {

namespace {

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// Test seams (fault injection, never set in production): CONCORD_FAULT_KILL_AT="round:N" kills
// the server right after round N's checkpoint; "train:N" kills a site when round N's training
// request arrives. The process dies by SIGKILL, as a crash or `kill -9` would end it.
// CONCORD_FAULT_WAIT_AT="round:N" makes the server wait after round N's checkpoint (up to 60 s)
// until every site is registered, so that a test can restart a site process between two rounds.
int fault_at(const char* variable, const char* what) {
  const char* v = std::getenv(variable);
  if (!v) return 0;
  const std::string s(v), prefix = std::string(what) + ":";
  if (s.rfind(prefix, 0) != 0) return 0;
  return std::atoi(s.c_str() + prefix.size());
}

int kill_at(const char* what) {
  return fault_at("CONCORD_FAULT_KILL_AT", what);
}

void die_now(const std::string& why) {
  spdlog::critical("CONCORD_FAULT_KILL_AT: {}: killing this process", why);
  spdlog::default_logger()->flush();
  std::raise(SIGKILL);
}

std::string fingerprint_short(const std::string& f) {
  return f.substr(0, 12);
}

}  // namespace

void add_server_command(CLI::App& app, Globals& g) {
  auto* sub = app.add_subcommand(
      "server", "Coordinate a federation whose sites run `concord site` on other machines");
  sub->footer(
      "The sites connect to this server (mutual TLS: each site's certificate name must be in the "
      "pipeline's data.sites). The server holds no data. Exit status as `concord run`.\n");
  struct Opts {
    std::string kit, file, run_dir, resume, listen, data_listen;
    std::vector<std::string> sets;
    bool insecure = false, no_progress = false;
    double wait = 600;
  };
  auto o = std::make_shared<Opts>();
  sub->add_option("file", o->file, "Pipeline YAML file (the same federation part as the sites')");
  sub->add_option("--kit", o->kit, "The server's kit (KITS/server from `concord provision`)");
  sub->add_option("--resume", o->resume, "Continue the interrupted run in this folder");
  sub->add_option("--run-dir", o->run_dir, "Run folder (default: <output>/<name>)");
  sub->add_flag("--insecure", o->insecure,
                "No TLS and no authentication: development on this machine only (loopback)");
  sub->add_option("--listen", o->listen, "host:port to listen on (default: the kit's)");
  sub->add_option("--data-listen", o->data_listen,
                  "host:port of the data link that carries the weights, or 'off' (default: the "
                  "listen port + 1)");
  sub->add_option("--wait", o->wait, "Seconds to wait for every site before starting (600)");
  sub->add_option("--set", o->sets, "Override a key, e.g. --set federation.rounds=3 (repeatable)");
  sub->add_flag("--no-progress", o->no_progress, "No progress bar (log lines only)");
  sub->callback([&g, o] {
    PipelineConfig config =
        load_or_report(g, run_pipeline_file("server", o->file, o->resume), o->sets);
    if (config.data.sites.empty())
      throw Error(config.file +
                  ": data.sites must list the federation's sites (their certificate names) for "
                  "`concord server`");
    net::ServerOptions so;
    if (!o->kit.empty()) {
      so = net::server_options(net::load_kit(o->kit), config.data.sites);
    } else if (!o->insecure) {
      throw Error("server needs --kit KITS/server (or --insecure --listen 127.0.0.1:PORT)");
    }
    so.sites = config.data.sites;
    so.insecure = o->insecure;
    if (!o->listen.empty()) so.listen = o->listen;
    so.data_listen = o->data_listen;

    const std::string fingerprint = net::pipeline_fingerprint(config);
    const std::string session =
        std::to_string(std::chrono::system_clock::now().time_since_epoch().count()) + "-" +
        std::to_string(getpid());
    so.welcome_info = net::encode_server_welcome({fingerprint, session});
    // The data shape every site must share: the first admitted site's.
    auto shape_mu = std::make_shared<std::mutex>();
    auto shape = std::make_shared<std::optional<std::pair<std::string, DataShape>>>();
    auto starts = std::make_shared<net::SiteStarts>();  // site processes, for RemoteSites::starts
    so.admit = [fingerprint, shape_mu, shape, starts](const std::string& site,
                                                      const std::string& info) {
      const net::SiteHello h = net::decode_site_hello(info);
      if (h.pipeline != fingerprint)
        return "its pipeline differs from the server's (fingerprint " +
               fingerprint_short(h.pipeline) + " vs " + fingerprint_short(fingerprint) +
               "): both files must agree on everything but data.dataset, data.partition, "
               "data.scanner_shift, output and training.threads";
      std::lock_guard<std::mutex> lock(*shape_mu);
      if (!*shape) *shape = std::make_pair(site, h.shape);
      if (!((*shape)->second == h.shape))
        return "its data is " + h.shape.str() + " but site '" + (*shape)->first + "''s is " +
               (*shape)->second.str() + ": the model needs one shape";
      starts->registered(site, h.instance);
      return std::string();
    };
    net::GrpcServerChannel channel(so);
    spdlog::info("pipeline fingerprint {}; waiting up to {:.0f} s for {} sites: {}",
                 fingerprint_short(fingerprint), o->wait, config.data.sites.size(),
                 joined(config.data.sites));
    const auto missing = channel.wait_for_sites(config.data.sites, o->wait);
    if (missing.size() == config.data.sites.size())
      throw Error("no site registered within " + std::to_string(int(o->wait)) + " s");
    if (!missing.empty())
      spdlog::warn(
          "starting without {} (not registered after {:.0f} s): each exchange with them "
          "fails and is reported",
          joined(missing), o->wait);
    DataShape data_shape;
    {
      std::lock_guard<std::mutex> lock(*shape_mu);
      data_shape = (*shape)->second;
    }
    spdlog::info("the sites' data: {}", data_shape.str());

    Experiment exp(config, global_registry(),
                   RemoteSites{&channel, data_shape,
                               [starts](const std::string& site) { return starts->count(site); }});
    RunRequest r;
    r.run_dir = o->resume.empty() ? o->run_dir : o->resume;
    r.resume = !o->resume.empty();
    r.no_progress = o->no_progress;
    r.resume_command = "concord server --kit KIT PIPELINE --resume";
    const int kill_round = kill_at("round");
    const int wait_round = fault_at("CONCORD_FAULT_WAIT_AT", "round");
    r.after_round = [kill_round, wait_round, &channel, &config](int round) {
      if (round == kill_round) die_now("after round " + std::to_string(round));
      if (round == wait_round) {
        spdlog::warn("CONCORD_FAULT_WAIT_AT: after round {}: waiting for every site", round);
        channel.wait_for_sites(config.data.sites, 60);
      }
    };
    // A finished run tells the sites to stop; a stopped one leaves them reconnecting, so that
    // `concord server --resume` finds them.
    r.after_run = [&channel, &config](const RunSummary& s) {
      if (s.rounds_completed == config.federation.rounds)
        channel.shutdown("the run is complete");
      else
        channel.shutdown("the server stopped; the run can be resumed", false);
    };
    try {
      run_experiment(exp, config, r);
    } catch (const Exit&) {
      throw;
    } catch (...) {
      channel.shutdown("the server failed; the run can be resumed", false);
      throw;
    }
  });
}

void add_site_command(CLI::App& app, Globals& g) {
  auto* sub = app.add_subcommand(
      "site", "Take part in a federation run by `concord server`, with this site's own data");
  sub->footer(
      "The data is named here (the pipeline's data section or --data), never by the server. "
      "Exit status: 0 when the server ended the run, 1 on an error (a refused kit or pipeline), "
      "130 when stopped by SIGINT/SIGTERM.\n");
  struct Opts {
    std::string kit, file, server, name, out;
    std::vector<std::string> data;
    bool insecure = false, no_data_link = false;
  };
  auto o = std::make_shared<Opts>();
  sub->add_option("file", o->file, "This site's copy of the pipeline YAML file")->required();
  sub->add_option("--kit", o->kit, "This site's kit (KITS/<site> from `concord provision`)");
  sub->add_option("--data", o->data,
                  "Where this site's data is: a key of the pipeline's data section, e.g. "
                  "--data dataset.args.root=/srv/mri (repeatable)");
  sub->add_option("--server", o->server, "host:port of the server (default: the kit's)");
  sub->add_option("--out", o->out,
                  "This site's own folder: a learned harmonizer's site-local state (needed to "
                  "resume), replay montages (default: <pipeline output>/<name>-site-<site>)");
  sub->add_flag("--insecure", o->insecure,
                "No TLS and no authentication: development on this machine only (loopback)");
  sub->add_option("--name", o->name, "The site's name with --insecure (a kit's is its own)");
  sub->add_flag("--no-data-link", o->no_data_link,
                "Send the weights on the gRPC stream, not on the server's data link (slower; for "
                "networks that let only the server's main port through)");
  sub->callback([&g, o] {
    std::vector<std::string> overrides;
    for (const auto& d : o->data) overrides.push_back("data." + d);
    const PipelineConfig config = load_or_report(g, o->file, overrides);
    net::SiteClientOptions so;
    if (!o->kit.empty()) {
      so = net::site_options(net::load_kit(o->kit));
    } else if (!o->insecure) {
      throw Error("site needs --kit KITS/<site> (or --insecure --name NAME --server HOST:PORT)");
    }
    if (o->insecure) {
      so.insecure = true;
      if (!o->name.empty()) so.site = o->name;
    }
    if (!o->server.empty()) so.server = o->server;
    so.data_link = !o->no_data_link;
    if (so.site.empty()) throw Error("site: no name (--name with --insecure)");
    if (so.server.empty()) throw Error("site: no server address (--server HOST:PORT)");
    const auto& roster = config.data.sites;
    if (std::find(roster.begin(), roster.end(), so.site) == roster.end())
      throw Error(config.file + ": site '" + so.site + "' is not in data.sites (" +
                  (roster.empty() ? std::string("empty") : joined(roster)) +
                  "): the server would refuse it");

    // The site as simulation builds it; rebuilt when a new server run (a resumed server) begins,
    // as a resumed simulation rebuilds its sites before restoring their checkpointed state.
    const std::string out_dir =
        !o->out.empty()
            ? o->out
            : (std::filesystem::path(config.output) / (config.name + "-site-" + so.site)).string();
    const std::string fingerprint = net::pipeline_fingerprint(config);
    auto site = std::make_shared<std::unique_ptr<StandaloneSite>>(
        std::make_unique<StandaloneSite>(config, global_registry(), so.site, out_dir));
    spdlog::info("site '{}': data {}; pipeline fingerprint {}", so.site, (*site)->shape().str(),
                 fingerprint_short(fingerprint));
    so.info = net::encode_site_hello({fingerprint, (*site)->shape(), net::new_site_instance()});
    so.seed = config.seed;
    so.stop = net::stop_flag_on_signals();
    auto session = std::make_shared<std::string>();
    const std::string name = so.site;
    so.on_welcome = [config, site, session, name, fingerprint, out_dir](const std::string& info) {
      const net::ServerWelcome w = net::decode_server_welcome(info);
      if (w.pipeline != fingerprint)
        throw Error("the server runs another pipeline (fingerprint " +
                    fingerprint_short(w.pipeline) + ", this site's " +
                    fingerprint_short(fingerprint) + ")");
      if (!session->empty() && *session != w.session) {
        spdlog::info("site '{}': the server started a new run (a resumed one?): starting afresh",
                     name);
        site->reset();
        *site = std::make_unique<StandaloneSite>(config, global_registry(), name, out_dir);
      }
      *session = w.session;
    };
    const int kill_round = kill_at("train");
    SiteHandler handler = [site, kill_round](const Bytes& request) {
      if (kill_round > 0) {
        const Message m = decode(request);
        if (protocol::request_kind(m) == protocol::Request::Train && m.round == kill_round)
          die_now("training request of round " + std::to_string(kill_round));
      }
      return (*site)->handle(request);
    };
    switch (net::run_site_client(so, handler)) {
      case net::SiteExit::Shutdown:
        std::cout << "site '" << name << "': the server ended the run\n";
        return;
      case net::SiteExit::Stopped:
        throw Exit{130};
      case net::SiteExit::GaveUp:
        throw Error("site '" + name + "': gave up connecting to " + so.server);
    }
  });
}

}  // namespace concord::cli
