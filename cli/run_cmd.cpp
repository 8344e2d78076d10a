// `concord run FILE [--set k=v]... [--run-dir DIR]` and `concord run --resume RUN_DIR`.
#include "commands.h"
#include "progress.h"
#include "report_html.h"

#include <concord/engine.h>

#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include <unistd.h>

#include <cmath>
#include <csignal>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <set>
#include <sstream>

namespace concord::cli {

// Routes log lines through the progress bar so that, on a terminal, they print above it
// instead of breaking the redrawn line.
class BarSink : public spdlog::sinks::base_sink<std::mutex> {
 public:
  explicit BarSink(ProgressBar& bar) : bar_(bar) {}

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    spdlog::memory_buf_t out;
    formatter_->format(msg, out);
    std::string line(out.data(), out.size());
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
    bar_.print(line);
  }
  void flush_() override {}

 private:
  ProgressBar& bar_;
};

static std::string cell(const std::map<std::string, double>& m, const std::string& k) {
  auto it = m.find(k);
  if (it == m.end()) return "-";
  if (std::isnan(it->second)) return "n/a";
  std::ostringstream o;
  o << std::fixed << std::setprecision(3) << it->second;
  return o.str();
}

static void print_table(const RunSummary& s) {
  std::set<std::string> names;
  bool personalized = false;
  for (const auto& r : s.sites) {
    for (const auto& [k, v] : r.metrics) names.insert(k);
    personalized = personalized || !r.personalized.empty();
  }
  size_t w = 10;
  for (const auto& r : s.sites) w = std::max(w, r.site.size() + 12);
  auto row = [&](const std::string& label, const std::map<std::string, double>& m,
                 const std::map<std::string, double>* p) {
    std::cout << std::left << std::setw(int(w)) << label;
    for (const auto& n : names) {
      std::string c = cell(m, n);
      if (p) c += " / " + cell(*p, n);
      std::cout << std::right << std::setw(int(std::max<size_t>(n.size(), 8) + (p ? 11 : 2))) << c;
    }
    std::cout << "\n";
  };
  std::cout << "\n" << std::left << std::setw(int(w)) << "site";
  for (const auto& n : names)
    std::cout << std::right
              << std::setw(int(std::max<size_t>(n.size(), 8) + (personalized ? 11 : 2)))
              << (personalized ? n + " (glob/pers)" : n);
  std::cout << "\n";
  for (const auto& r : s.sites)
    row(r.site + (r.held_out ? " (held out)" : ""), r.metrics,
        personalized ? &r.personalized : nullptr);
  row("mean", s.mean, nullptr);
  row("worst site", s.worst, nullptr);
  if (!s.privacy.empty()) std::cout << "\nprivacy: " << s.privacy << "\n";
  std::cout << "\nresults: " << s.run_dir << "/summary.json, metrics.jsonl, model.pt\n";
  if (!s.failures.empty()) {
    std::cout << s.failures.size() << " failure(s) (exit status 1):\n";
    for (const auto& f : s.failures) std::cout << "  " << f << "\n";
  }
}

namespace {

// SIGINT / SIGTERM during a run: the first asks the run to stop after its current round (which is
// checkpointed, so --resume continues it); a second one ends the process at once.
volatile std::sig_atomic_t stop_requested = 0;

void on_stop_signal(int sig) {
  if (stop_requested) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  stop_requested = 1;
  const char msg[] =
      "\nconcord: stopping after the current round (checkpointed; resume with --resume). "
      "Press Ctrl-C again to stop now.\n";
  ssize_t ignored = write(STDERR_FILENO, msg, sizeof(msg) - 1);
  (void)ignored;
}

}  // namespace

std::string run_pipeline_file(const std::string& command, const std::string& file,
                              const std::string& resume) {
  if (resume.empty()) {
    if (file.empty()) throw Error(command + " needs a pipeline file (or --resume RUN_DIR)");
    return file;
  }
  const std::string f =
      file.empty() ? (std::filesystem::path(resume) / "pipeline.yaml").string() : file;
  if (!std::filesystem::exists(f))
    throw Error("cannot resume: " + f + " not found (is " + resume + " a run folder?)");
  return f;
}

RunSummary run_experiment(Experiment& exp, const PipelineConfig& config, const RunRequest& r) {
  RunOptions opts;
  opts.run_dir = r.run_dir;
  opts.resume = r.resume;
  if (opts.run_dir.empty()) {
    // A fresh folder per run: <output>/<name>, then <name>-2, <name>-3, ... never overwritten.
    namespace fs = std::filesystem;
    fs::path base = fs::path(config.output) / config.name;
    fs::path dir = base;
    for (int i = 2; fs::exists(dir); ++i) dir = base.string() + "-" + std::to_string(i);
    opts.run_dir = dir.string();
  }
  spdlog::info("run folder: {}", opts.run_dir);
  auto bar = std::make_unique<ProgressBar>("rounds", config.federation.rounds, !r.no_progress);
  opts.on_progress = [&bar](const std::string& phase, int, int) { bar->set_status(phase); };
  opts.on_round = [&bar, &r](int round) {
    bar->advance(1);
    if (r.after_round) r.after_round(round);
  };
  auto previous = spdlog::default_logger();
  if (!r.no_progress && isatty(STDERR_FILENO)) {
    auto sink = std::make_shared<BarSink>(*bar);
    sink->set_pattern("[%H:%M:%S] %^%l%$ %v");
    auto logger = std::make_shared<spdlog::logger>("concord", sink);
    logger->set_level(previous->level());
    spdlog::set_default_logger(logger);
  }
  struct Restore {
    std::shared_ptr<spdlog::logger> logger;
    ~Restore() { spdlog::set_default_logger(logger); }
  } restore{previous};
  opts.stop_after = [](int) { return stop_requested != 0; };
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  RunSummary s = exp.run(opts);
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  bar->finish();
  if (r.after_run) r.after_run(s);
  if (s.rounds_completed < config.federation.rounds) {
    std::cout << "stopped after round " << s.rounds_completed << " of " << config.federation.rounds
              << "; continue with: " << r.resume_command << " " << s.run_dir << "\n";
    throw Exit{130};
  }
  print_table(s);
  if (r.before_report) r.before_report(s);
  write_run_report_after_run(s.run_dir);
  if (!s.failures.empty()) throw Exit{1};
  return s;
}

void add_run_command(CLI::App& app, Globals& g) {
  auto* sub = app.add_subcommand("run", "Run a federated pipeline");
  sub->footer(
      "Exit status: 0 when every round aggregated and every site did its part; 1 when the run "
      "could not start or stopped, or when it completed with failures (a site failed or was "
      "rejected, a round aggregated nothing): summary.json then lists them under 'failures'; "
      "130 when SIGINT or SIGTERM stopped it after a round (continue with --resume).\n");
  struct Opts {
    std::string file, run_dir, resume;
    std::vector<std::string> sets;
    bool no_progress = false;
  };
  auto o = std::make_shared<Opts>();
  sub->add_option("file", o->file, "Pipeline YAML file");
  sub->add_option("--set", o->sets, "Override a key, e.g. --set training.lr=1e-3 (repeatable)");
  sub->add_option("--run-dir", o->run_dir, "Run folder (default: <output>/<name>)");
  sub->add_option("--resume", o->resume, "Continue the interrupted run in this folder");
  sub->add_flag("--no-progress", o->no_progress, "No progress bar (log lines only)");
  sub->callback([&g, o] {
    const std::string run_dir = o->resume.empty() ? o->run_dir : o->resume;
    PipelineConfig config =
        load_or_report(g, run_pipeline_file("run", o->file, o->resume), o->sets);
    Experiment exp(config, global_registry());
    RunRequest r;
    r.run_dir = run_dir;
    r.resume = !o->resume.empty();
    r.no_progress = o->no_progress;
    r.before_report = [&config](const RunSummary& s) {
      write_run_harmonization(config, s.run_dir);
    };
    run_experiment(exp, config, r);
  });
}

}  // namespace concord::cli
