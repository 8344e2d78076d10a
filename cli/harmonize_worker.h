// `concord harmonize` survives a decoder or harmonizer that crashes the process on one file.
//
// The command runs itself again as a worker process (the same command line plus the hidden
// `--worker-state DIR`), which does all the per-file work, fit and apply. Before it decodes an
// input the worker appends "B path" to DIR/journal, after it is done with the input "E path".
// When the worker dies by a signal, the supervisor (the first process) takes the inputs begun
// and not ended as suspects, runs each alone in a probe worker (`--probe PATH`: read, fit and
// apply that file only, one thread), records those that crash in DIR/crashed and restarts the
// worker, which lists them as failed and leaves them out; completed outputs are skipped by the
// usual resume. When no suspect crashes alone, the worker is restarted with one thread and no
// read-ahead (DIR/serial), so that the next crash names exactly one file.
#pragma once

#include <map>
#include <string>

namespace concord::cli {

// The worker's side: DIR/journal, DIR/crashed, DIR/serial and DIR/fit.stats.
class WorkerState {
 public:
  WorkerState() = default;  // not supervised: every call does nothing
  explicit WorkerState(const std::string& dir);
  ~WorkerState();
  WorkerState(const WorkerState&) = delete;
  WorkerState& operator=(const WorkerState&) = delete;

  bool active() const { return fd_ >= 0; }
  const std::string& dir() const { return dir_; }
  // Thread-safe, and on disk before it returns (a crash right after keeps the line).
  void begin(const std::string& path) const;
  void end(const std::string& path) const;
  // Inputs that crashed a worker, with the signal's name ("SIGSEGV").
  const std::map<std::string, std::string>& crashed() const { return crashed_; }
  // One thread, no read-ahead: at most one input in progress at a time.
  bool serial() const { return serial_; }
  // Statistics fitted by an earlier worker of this run (the apply phase restarts with them).
  std::string fitted_stats_file() const;

 private:
  void line(char kind, const std::string& path) const;
  std::string dir_;
  int fd_ = -1;
  std::map<std::string, std::string> crashed_;
  bool serial_ = false;
};

// Runs this process's own command line (from /proc/self/cmdline) in worker processes until one
// ends normally; returns its exit code. Errors of the supervision itself throw Error.
int supervise_worker();

// In a worker: makes it die with its supervisor (a killed run leaves no worker behind).
void enter_worker(const WorkerState& state);

// "SIGSEGV", "SIGABRT", ... or "signal N".
std::string signal_name(int sig);

}  // namespace concord::cli
