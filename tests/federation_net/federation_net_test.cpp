// `concord server` and `concord site` as separate processes on loopback, with mutual TLS from
// `concord provision`: a server and three sites run a short pipeline and end with the weights the
// in-process simulation of the same pipeline and seed ends with, bit for bit; a site killed in the
// middle of a round costs that site only (k = 2 of 3); a server killed after a round is resumed
// with --resume, the sites reconnect by themselves, and the run still ends bit-identical.
#include <nlohmann/json.hpp>

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "testing.h"

using namespace concord;
namespace fs = std::filesystem;

namespace {

// Tiny brainsim, a fitted harmonizer (the harmonizer phase crosses the network too) and an
// aggregator with server state (so resume restores it): 2 rounds. Checkpoints hold the resolved
// pipeline, so every run uses the same text (runs name their folder with --run-dir).
std::string pipeline() {
  return R"(name: fednet
seed: 7
data:
  dataset: {type: brainsim, args: {sites: 3, train_per_site: 8, test_per_site: 4, size: 24}}
  sites: [site-A, site-B, site-C]
model: {type: cnn, args: {width: 6, depth: 2}}
harmonizers:
  - type: histogram-match
training: {local_epochs: 1, batch_size: 4, lr: 0.01, threads: 1}
federation: {rounds: 2, min_sites: 2}
aggregator: {type: fedadam}
output: runs-unused
)";
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// True when `port` on loopback can be bound now (0: any; then `port` is set to the one given).
bool bindable(int& port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(uint16_t(port));
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  if (ok) port = ntohs(a.sin_port);
  return ok;
}

// A free port whose next one is free too: the server's data link listens there.
int free_port() {
  for (;;) {
    int port = 0, next = 0;
    if (!bindable(port) || port == 65535) continue;
    next = port + 1;
    if (bindable(next)) return port;
  }
}

// A `concord` process, its output in a log file.
struct Proc {
  pid_t pid = -1;
  fs::path log;
  int status = -1;

  Proc(const std::vector<std::string>& args, const fs::path& log_file,
       const std::string& kill_at = "")
      : log(log_file) {
    pid = fork();
    if (pid == 0) {
      FILE* f = std::fopen(log_file.c_str(), "w");
      if (f) {
        dup2(fileno(f), 1);
        dup2(fileno(f), 2);
      }
      if (!kill_at.empty()) setenv("CONCORD_FAULT_KILL_AT", kill_at.c_str(), 1);
      std::vector<std::string> a = {testkit::concord_exe()};
      a.insert(a.end(), args.begin(), args.end());
      std::vector<char*> argv;
      for (auto& s : a) argv.push_back(s.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
  }
  ~Proc() {
    if (status < 0 && pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
  // The exit status (128 + signal when killed), or -1 after `seconds`.
  int wait(double seconds) {
    const auto until =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(int64_t(seconds * 1000));
    while (status < 0) {
      int st = 0;
      if (waitpid(pid, &st, WNOHANG) == pid) {
        status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        break;
      }
      if (std::chrono::steady_clock::now() > until) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return status;
  }
  std::string output() const { return read_bytes(log); }
};

struct Federation {
  testkit::TempDir dir;
  int port = free_port();
  fs::path pipeline_file = dir.path() / "pipeline.yaml";
  fs::path kits = dir.path() / "kits";
  fs::path run = dir.path() / "net-run";
  std::vector<std::string> sites = {"site-A", "site-B", "site-C"};

  Federation() {
    std::ofstream(pipeline_file) << pipeline();
    std::ofstream(dir.path() / "project.yaml")
        << "project: fednet-test\nserver: {hosts: [127.0.0.1], port: " << port
        << "}\nsites: [site-A, site-B, site-C]\n";
    std::string out;
    const int rc =
        testkit::run_command(testkit::concord_exe() + " provision " +
                                 (dir.path() / "project.yaml").string() + " --out " + kits.string(),
                             &out);
    EXPECT_EQ(rc, 0) << out;
  }
  std::unique_ptr<Proc> server(const std::vector<std::string>& extra, const std::string& log,
                               const std::string& kill_at = "", const std::string& wait = "60") {
    std::vector<std::string> a = {"server",        "--kit",  (kits / "server").string(),
                                  "--no-progress", "--wait", wait};
    a.insert(a.end(), extra.begin(), extra.end());
    return std::make_unique<Proc>(a, dir.path() / log, kill_at);
  }
  std::unique_ptr<Proc> site(const std::string& name, const std::string& kill_at = "",
                             const std::vector<std::string>& extra = {}) {
    std::vector<std::string> a = {"site", "--kit", (kits / name).string(), pipeline_file.string()};
    a.insert(a.end(), extra.begin(), extra.end());
    return std::make_unique<Proc>(a, dir.path() / (name + ".log"), kill_at);
  }
  // The pipeline with `from` replaced by `to`, written to `name` in the test's folder.
  fs::path variant(const std::string& name, const std::string& from, const std::string& to) {
    std::string text = pipeline();
    text.replace(text.find(from), from.size(), to);
    const fs::path file = dir.path() / name;
    std::ofstream(file) << text;
    return file;
  }
  std::string logs(const std::vector<const Proc*>& procs) const {
    std::string all;
    for (const Proc* p : procs)
      all += "---- " + p->log.filename().string() + "\n" + p->output() + "\n";
    return all;
  }
};

// The in-process simulation of the pipeline (`concord run`), once for all tests.
const fs::path& simulation() {
  static testkit::TempDir dir;
  static fs::path run = [] {
    std::ofstream(dir.path() / "pipeline.yaml") << pipeline();
    const fs::path r = dir.path() / "sim-run";
    std::string out;
    const int rc = testkit::run_command(testkit::concord_exe() + " run --no-progress " +
                                            (dir.path() / "pipeline.yaml").string() +
                                            " --run-dir " + r.string() + " 2>&1",
                                        &out);
    EXPECT_EQ(rc, 0) << out;
    return r;
  }();
  return run;
}

void expect_same_weights(const fs::path& net, const fs::path& sim) {
  for (const char* f : {"global.state", "model.pt", "checkpoints/round-0002.ckpt"}) {
    ASSERT_TRUE(fs::exists(sim / f)) << f;
    ASSERT_TRUE(fs::exists(net / f)) << f;
    const std::string a = read_bytes(net / f), b = read_bytes(sim / f);
    EXPECT_EQ(a.size(), b.size()) << f;
    EXPECT_TRUE(a == b) << f << " differs between the network run and the simulation";
  }
}

// `concord run` of `file` into `sim`, then a server and every site with `file` into f.run: both
// end with status 0 and the same weights.
void simulate_and_run_network(Federation& f, const fs::path& file, const fs::path& sim) {
  std::string out;
  ASSERT_EQ(testkit::run_command(testkit::concord_exe() + " run --no-progress " + file.string() +
                                     " --run-dir " + sim.string() + " 2>&1",
                                 &out),
            0)
      << out;
  auto server = f.server({file.string(), "--run-dir", f.run.string()}, "server.log");
  std::vector<std::unique_ptr<Proc>> sites;
  for (const auto& s : f.sites)
    sites.push_back(std::make_unique<Proc>(
        std::vector<std::string>{"site", "--kit", (f.kits / s).string(), file.string()},
        f.dir.path() / (s + ".log")));
  const int rc = server->wait(120);
  std::vector<const Proc*> all = {server.get()};
  for (auto& s : sites) all.push_back(s.get());
  ASSERT_EQ(rc, 0) << f.logs(all);
  for (auto& s : sites) EXPECT_EQ(s->wait(20), 0) << f.logs(all);
  expect_same_weights(f.run, sim);
}

nlohmann::json summary(const fs::path& run) {
  return nlohmann::json::parse(read_bytes(run / "summary.json"));
}

}  // namespace

TEST(FederationNet, ThreeSiteProcessesEndBitIdenticalToTheSimulation) {
  const fs::path& sim = simulation();
  Federation f;
  auto server = f.server({f.pipeline_file.string(), "--run-dir", f.run.string()}, "server.log");
  std::vector<std::unique_ptr<Proc>> sites;
  for (const auto& s : f.sites) sites.push_back(f.site(s));
  const int rc = server->wait(90);
  std::vector<const Proc*> all = {server.get()};
  for (auto& s : sites) all.push_back(s.get());
  ASSERT_EQ(rc, 0) << f.logs(all);
  for (auto& s : sites) EXPECT_EQ(s->wait(20), 0) << f.logs(all);  // SHUTDOWN ends them
  expect_same_weights(f.run, sim);
  EXPECT_TRUE(summary(f.run)["failures"].empty());
  EXPECT_TRUE(fs::exists(f.run / "report.html"));
  EXPECT_TRUE(fs::exists(f.run / "metrics.jsonl"));
  // The server names the sites' data shape, never their data.
  EXPECT_NE(server->output().find("classification, 2 classes, 1 x 24 x 24"), std::string::npos);
  // The weights travelled on the data link (the kit's port + 1), with mutual TLS.
  for (auto& s : sites)
    EXPECT_NE(s->output().find("data link to 127.0.0.1:" + std::to_string(f.port + 1) +
                               " open (mutual TLS)"),
              std::string::npos)
        << f.logs(all);
}

// The weights may travel on the gRPC stream instead of the data link, for one site
// (`concord site --no-data-link`) or for all (`concord server --data-listen off`): the results
// are the same, bit for bit.
TEST(FederationNet, SitesOnTheGrpcStreamEndBitIdenticalToo) {
  const fs::path& sim = simulation();
  for (const bool server_off : {false, true}) {
    SCOPED_TRACE(server_off ? "server --data-listen off" : "site-A --no-data-link");
    Federation f;
    std::vector<std::string> args = {f.pipeline_file.string(), "--run-dir", f.run.string()};
    if (server_off) args.insert(args.end(), {"--data-listen", "off"});
    auto server = f.server(args, "server.log");
    std::vector<std::unique_ptr<Proc>> sites;
    for (const auto& s : f.sites)
      sites.push_back(f.site(s, "",
                             s == "site-A" && !server_off
                                 ? std::vector<std::string>{"--no-data-link"}
                                 : std::vector<std::string>{}));
    const int rc = server->wait(90);
    std::vector<const Proc*> all = {server.get()};
    for (auto& s : sites) all.push_back(s.get());
    ASSERT_EQ(rc, 0) << f.logs(all);
    for (auto& s : sites) EXPECT_EQ(s->wait(20), 0) << f.logs(all);
    expect_same_weights(f.run, sim);
    for (size_t i = 0; i < sites.size(); ++i) {
      const bool link = !server_off && f.sites[i] != "site-A";
      EXPECT_EQ(sites[i]->output().find("data link to") != std::string::npos, link)
          << f.sites[i] << "\n"
          << f.logs(all);
    }
    if (server_off) {
      EXPECT_NE(server->output().find("data link off: payloads go over the gRPC stream"),
                std::string::npos)
          << f.logs(all);
    }
  }
}

TEST(FederationNet, ASiteKilledMidRoundIsNamedAndTheRoundCompletesWithTheOthers) {
  Federation f;
  auto server = f.server({f.pipeline_file.string(), "--run-dir", f.run.string()}, "server.log");
  auto a = f.site("site-A");
  auto b = f.site("site-B");
  auto c = f.site("site-C", "train:1");  // dies when round 1's training request arrives
  const int rc = server->wait(90);
  std::vector<const Proc*> all = {server.get(), a.get(), b.get(), c.get()};
  EXPECT_EQ(c->wait(5), 128 + SIGKILL) << f.logs(all);
  ASSERT_EQ(rc, 1) << f.logs(all);  // completed, with failures
  const auto s = summary(f.run);
  bool named = false;
  for (const auto& line : s["failures"]) {
    const std::string l = line.get<std::string>();
    EXPECT_EQ(l.find("not aggregated"), std::string::npos) << l;
    if (l.rfind("round 1: site 'site-C'", 0) == 0) named = true;
  }
  EXPECT_TRUE(named) << s["failures"].dump(1);
  EXPECT_EQ(s["rounds"], 2) << s.dump(1);
  // Round 1 aggregated the two updates that arrived; site-C sent none.
  std::ifstream metrics(f.run / "metrics.jsonl");
  std::map<std::string, bool> uploaded;
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.value("round", 0) != 1 || !j.contains("aggregated")) continue;
    EXPECT_TRUE(j["aggregated"].get<bool>()) << line;
    uploaded[j["site"].get<std::string>()] = j.contains("num_samples");
  }
  EXPECT_EQ(uploaded,
            (std::map<std::string, bool>{{"site-A", true}, {"site-B", true}, {"site-C", false}}));
  EXPECT_TRUE(fs::exists(f.run / "checkpoints/round-0002.ckpt"));
  EXPECT_EQ(a->wait(20), 0) << f.logs(all);
  EXPECT_EQ(b->wait(20), 0) << f.logs(all);
}

TEST(FederationNet, AKilledServerResumesAndTheSitesReconnectByThemselves) {
  const fs::path& sim = simulation();
  Federation f;
  std::vector<std::unique_ptr<Proc>> sites;
  auto first =
      f.server({f.pipeline_file.string(), "--run-dir", f.run.string()}, "server-1.log", "round:1");
  for (const auto& s : f.sites) sites.push_back(f.site(s));
  const int killed = first->wait(90);
  std::vector<const Proc*> all = {first.get()};
  for (auto& s : sites) all.push_back(s.get());
  ASSERT_EQ(killed, 128 + SIGKILL) << f.logs(all);
  ASSERT_TRUE(fs::exists(f.run / "checkpoints/round-0001.ckpt"));
  for (auto& s : sites) EXPECT_EQ(s->wait(0.5), -1) << "a site stopped with its server";
  auto resumed = f.server({"--resume", f.run.string()}, "server-2.log");
  all.push_back(resumed.get());
  ASSERT_EQ(resumed->wait(90), 0) << f.logs(all);
  for (auto& s : sites) EXPECT_EQ(s->wait(20), 0) << f.logs(all);
  EXPECT_NE(resumed->output().find("resuming"), std::string::npos);
  expect_same_weights(f.run, sim);
}

// A site process killed in the middle of a run and started again: the new process registers,
// the server brings it up to date (the harmonizer statistics, its checkpointed state, the global
// model) and it takes part in the rounds that follow. The server waits after round 2 until every
// site is registered (a test seam), so the new process is back before round 3.
TEST(FederationNet, ARestartedSiteProcessIsBroughtUpToDateAndTrainsAgain) {
  Federation f;
  const fs::path file = f.variant("long.yaml", "rounds: 2,", "rounds: 4,");
  setenv("CONCORD_FAULT_WAIT_AT", "round:2", 1);  // inherited by the server process only
  auto server = f.server({file.string(), "--run-dir", f.run.string()}, "server.log");
  unsetenv("CONCORD_FAULT_WAIT_AT");
  std::vector<std::unique_ptr<Proc>> sites;
  for (const auto& s : f.sites)
    sites.push_back(std::make_unique<Proc>(
        std::vector<std::string>{"site", "--kit", (f.kits / s).string(), file.string()},
        f.dir.path() / (s + ".log"), s == "site-C" ? "train:2" : ""));
  std::vector<const Proc*> all = {server.get()};
  for (auto& s : sites) all.push_back(s.get());
  ASSERT_EQ(sites[2]->wait(90), 128 + SIGKILL) << f.logs(all);
  Proc again({"site", "--kit", (f.kits / "site-C").string(), file.string()},
             f.dir.path() / "site-C-again.log");
  all.push_back(&again);
  ASSERT_EQ(server->wait(120), 1) << f.logs(all);  // completed, with site-C's missed rounds named
  EXPECT_EQ(again.wait(20), 0) << f.logs(all);
  const std::string log = server->output();
  const auto caught = log.find(
      "site 'site-C': a new process of the site registered: brought up "
      "to date (1 harmonizer statistics, its checkpointed state");
  ASSERT_NE(caught, std::string::npos) << f.logs(all);
  // From then on site-C uploads again, and its final evaluation is there.
  std::ifstream metrics(f.run / "metrics.jsonl");
  std::set<int> uploaded;  // the rounds in which site-C's upload was aggregated
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.value("site", "") == "site-C" && j.contains("num_samples"))
      uploaded.insert(j["round"].get<int>());
  }
  EXPECT_EQ(uploaded, (std::set<int>{1, 3, 4})) << f.logs(all);
  EXPECT_NE(log.find("round 3: site 'site-C': a new process"), std::string::npos) << log;
  const auto s = summary(f.run);
  for (const auto& line : s["failures"])
    EXPECT_NE(line.get<std::string>().find("site 'site-C'"), std::string::npos) << s.dump(1);
  bool evaluated = false;
  for (const auto& site : s["sites"])
    if (site["site"] == "site-C") evaluated = !site["metrics"].empty();
  EXPECT_TRUE(evaluated) << s.dump(1);
}

TEST(FederationNet, ASiteWithAnotherPipelineIsRefusedWithTheReasonOnBothEnds) {
  Federation f;
  // Another learning rate: a different federation part (the data section may differ freely).
  const fs::path other_file = f.variant("other.yaml", "lr: 0.01", "lr: 0.02");
  auto server =
      f.server({f.pipeline_file.string(), "--run-dir", f.run.string()}, "server.log", "", "8");
  Proc site({"site", "--kit", (f.kits / "site-A").string(), other_file.string()},
            f.dir.path() / "site-A.log");
  const int site_rc = site.wait(60);
  const int server_rc = server->wait(60);
  const std::string logs = f.logs({server.get(), &site});
  EXPECT_EQ(site_rc, 1) << logs;
  EXPECT_NE(site.output().find("its pipeline differs from the server's"), std::string::npos)
      << logs;
  EXPECT_NE(server->output().find("its pipeline differs from the server's"), std::string::npos)
      << logs;
  EXPECT_EQ(server_rc, 1) << logs;  // no site registered
  EXPECT_NE(server->output().find("no site registered within 8 s"), std::string::npos) << logs;
}

TEST(FederationNet, ASiteNotInThePipelinesSiteListStopsBeforeConnecting) {
  Federation f;
  const fs::path file =
      f.variant("two.yaml", "sites: [site-A, site-B, site-C]", "sites: [site-A, site-B]");
  Proc site({"site", "--kit", (f.kits / "site-C").string(), file.string()},
            f.dir.path() / "site-C.log");
  EXPECT_EQ(site.wait(60), 1) << site.output();
  EXPECT_NE(site.output().find("site 'site-C' is not in data.sites (site-A, site-B)"),
            std::string::npos)
      << site.output();
}

// Sample-level DP with the sites in their own processes: each site does DP-SGD because its own
// pipeline says so, the server learns each site's training-set size from its first upload and
// keeps one accountant per site, and the run ends with the simulation's weights and epsilons.
TEST(FederationNet, SampleLevelPrivacyOverTheNetworkMatchesTheSimulation) {
  Federation f;
  const fs::path file = f.variant("dp.yaml", "args: {width: 6, depth: 2}}",
                                  "args: {width: 6, depth: 2, norm: group}}\n"
                                  "privacy: {level: sample, epsilon: 8, clip: 1.0}");
  const fs::path sim = f.dir.path() / "sim-run";
  ASSERT_NO_FATAL_FAILURE(simulate_and_run_network(f, file, sim));
  const auto net = summary(f.run)["privacy"], local = summary(sim)["privacy"];
  EXPECT_EQ(net["level"], "sample");
  EXPECT_EQ(net["site_epsilon"].size(), 3u);
  EXPECT_EQ(net["site_epsilon"], local["site_epsilon"]);
  EXPECT_GT(net["epsilon"].get<double>(), 0.0);
}

// Secure aggregation with the sites in their own processes: the four secagg exchanges of every
// round cross the network, the server decodes only the masked sum, and with seeded secrets (a
// study setting: reproducible, not secret) the run ends with the simulation's weights.
TEST(FederationNet, SecureAggregationOverTheNetworkMatchesTheSimulation) {
  Federation f;
  const fs::path file = f.variant("secagg.yaml", "aggregator: {type: fedadam}",
                                  "aggregator: {type: fedadam}\n"
                                  "secure_aggregation: {secrets: seeded}");
  const fs::path sim = f.dir.path() / "sim-run";
  ASSERT_NO_FATAL_FAILURE(simulate_and_run_network(f, file, sim));
  // The server never saw a site's sample count: secure rounds log only the survivors' sum.
  std::ifstream metrics(f.run / "metrics.jsonl");
  int secure_lines = 0;
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (!j.contains("site") || !j.contains("aggregated")) continue;
    EXPECT_FALSE(j.contains("num_samples")) << line;
    secure_lines += j.contains("round_num_samples");
  }
  EXPECT_EQ(secure_lines, 2 * 3);  // 2 rounds x 3 sites
}

// A learned harmonizer (cyclegan) with the sites in their own processes: its stage (style GAN at
// the reference site, CycleGANs at the others, checkpoints through the protocol) crosses the
// network, each site keeps its local networks and pools in its own folder, and the run ends with
// the simulation's weights. (The server used to crash here: it set an output folder on simulated
// sites it does not have.)
TEST(FederationNet, ACycleGanStageOverTheNetworkMatchesTheSimulation) {
  Federation f;
  std::string text = pipeline();
  auto replace = [&](const std::string& from, const std::string& to) {
    text.replace(text.find(from), from.size(), to);
  };
  replace("size: 24", "size: 32");  // the style generator wants a power-of-two side
  replace("  - type: histogram-match\n",
          "  - type: cyclegan\n"
          "    args: {reference_site: site-B, generator_sharing: federated, ngf: 4, ndf: 4,\n"
          "           n_blocks: 1, pool_size: 2, batch_size: 2, style_epochs: 1, style_ngf: 4,\n"
          "           style_batch: 4, style_latent: 8, reference_samples: 4}\n"
          "    stage: {rounds: 2, local_epochs: 1}\n");
  const fs::path file = f.dir.path() / "cyclegan.yaml";
  std::ofstream(file) << text;
  const fs::path sim = f.dir.path() / "sim-run";
  ASSERT_NO_FATAL_FAILURE(simulate_and_run_network(f, file, sim));
  EXPECT_EQ(read_bytes(f.run / "learned/harmonizer-0-cyclegan.stats"),
            read_bytes(sim / "learned/harmonizer-0-cyclegan.stats"));
}
