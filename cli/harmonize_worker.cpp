#include "harmonize_worker.h"

#include "harmonize_common.h"

#include <concord/durable_output.h>
#include <concord/error.h>
#include <concord/message.h>

#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <vector>

extern char** environ;

namespace concord::cli {
namespace fs = std::filesystem;

namespace {

std::vector<std::string> own_command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(in)), {});
  std::vector<std::string> args;
  size_t start = 0;
  for (size_t z; (z = all.find('\0', start)) != std::string::npos; start = z + 1)
    args.push_back(all.substr(start, z - start));
  if (args.empty()) throw Error("cannot read this process's command line (/proc/self/cmdline)");
  return args;
}

// Runs /proc/self/exe with `args`; returns the wait status.
int run_worker(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int err = posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv.data(), environ);
  if (err != 0) throw Error("cannot start a worker process: " + std::string(std::strerror(err)));
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR)
      throw Error("waiting for the worker process: " + std::string(std::strerror(errno)));
  return status;
}

// The inputs the journal shows begun and not ended.
std::vector<std::string> in_progress(const fs::path& journal) {
  std::multiset<std::string> open;
  std::vector<std::string> order;
  for (const auto& [kind, path] : read_tab_lines(journal.string())) {
    if (kind == "B") {
      open.insert(path);
      order.push_back(path);
    } else if (kind == "E" && open.count(path)) {
      open.erase(open.find(path));
    }
  }
  std::vector<std::string> out;
  for (const auto& p : order)
    if (open.count(p) && std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
  return out;
}

void write_crashed(const fs::path& file, const std::map<std::string, std::string>& crashed) {
  std::string text;
  for (const auto& [path, sig] : crashed) text += sig + "\t" + escape_line(path) + "\n";
  write_file_atomic(file.string(), text);
}

// TMPDIR/concord-harmonize-PID-XXXXXX, removed at the end. A supervisor killed outright
// (SIGKILL) cannot remove its own: the next one removes those whose process is gone.
struct TempFolder {
  fs::path path;
  TempFolder() {
    const char* tmp = std::getenv("TMPDIR");
    const fs::path base = tmp && *tmp ? tmp : "/tmp";
    remove_orphans(base);
    std::string pattern =
        (base / ("concord-harmonize-" + std::to_string(getpid()) + "-XXXXXX")).string();
    if (!mkdtemp(pattern.data()))
      throw Error("cannot make a scratch folder " + pattern + ": " + std::strerror(errno));
    path = pattern;
  }
  ~TempFolder() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  static void remove_orphans(const fs::path& base) {
    std::error_code ec;
    const std::string prefix = "concord-harmonize-";
    for (fs::directory_iterator it(base, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string name = it->path().filename().string();
      if (name.rfind(prefix, 0) != 0 || !it->is_directory(ec) || fs::is_symlink(it->path(), ec))
        continue;
      const std::string rest = name.substr(prefix.size());
      const size_t dash = rest.find('-');
      if (dash == std::string::npos || dash == 0 || rest.find_first_not_of("0123456789") != dash)
        continue;
      const long pid = std::strtol(rest.substr(0, dash).c_str(), nullptr, 10);
      struct stat st {};
      if (::lstat(it->path().c_str(), &st) != 0 || st.st_uid != getuid()) continue;
      if (pid > 0 && ::kill(pid_t(pid), 0) != 0 && errno == ESRCH) {
        std::error_code rm;
        fs::remove_all(it->path(), rm);
      }
    }
  }
};

}  // namespace

std::string signal_name(int sig) {
  switch (sig) {
    case SIGSEGV:
      return "SIGSEGV";
    case SIGABRT:
      return "SIGABRT";
    case SIGBUS:
      return "SIGBUS";
    case SIGFPE:
      return "SIGFPE";
    case SIGILL:
      return "SIGILL";
    case SIGKILL:
      return "SIGKILL";
    case SIGTERM:
      return "SIGTERM";
    case SIGINT:
      return "SIGINT";
    default:
      return "signal " + std::to_string(sig);
  }
}

WorkerState::WorkerState(const std::string& dir) : dir_(dir) {
  const fs::path d(dir);
  for (const auto& [sig, path] : read_tab_lines((d / "crashed").string())) crashed_[path] = sig;
  serial_ = fs::exists(d / "serial");
  fd_ = ::open((d / "journal").c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd_ < 0) throw Error((d / "journal").string() + ": cannot open: " + std::strerror(errno));
}

WorkerState::~WorkerState() {
  if (fd_ >= 0) ::close(fd_);
}

void WorkerState::line(char kind, const std::string& path) const {
  if (fd_ < 0) return;
  // One write() of one line to an O_APPEND file: lines of threads never interleave, and the
  // kernel has the line even if this process dies the next instant.
  const std::string text = std::string(1, kind) + "\t" + escape_line(path) + "\n";
  if (::write(fd_, text.data(), text.size()) != ssize_t(text.size()))
    spdlog::warn("{}/journal: cannot write: {}", dir_, std::strerror(errno));
}

void WorkerState::begin(const std::string& path) const {
  line('B', path);
}
void WorkerState::end(const std::string& path) const {
  line('E', path);
}

std::string WorkerState::fitted_stats_file() const {
  return dir_.empty() ? "" : (fs::path(dir_) / "fit.stats").string();
}

void enter_worker(const WorkerState& state) {
  if (!state.active()) return;
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() == 1) _exit(1);  // the supervisor is already gone
}

int supervise_worker() {
  const std::vector<std::string> base = own_command_line();
  TempFolder dir;
  const fs::path journal = dir.path / "journal";
  std::map<std::string, std::string> crashed;
  bool serial = false;
  std::vector<std::string> worker = base;
  worker.insert(worker.end(), {"--worker-state", dir.path.string()});
  for (int attempt = 0;; ++attempt) {
    write_crashed(dir.path / "crashed", crashed);
    fs::remove(journal);
    const int status = run_worker(worker);
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (!WIFSIGNALED(status)) return 1;
    const std::string sig = signal_name(WTERMSIG(status));
    const std::vector<std::string> suspects = in_progress(journal);
    if (suspects.empty() || attempt > 10000)
      throw Error("the harmonize worker process died (" + sig +
                  ") while working on no input file; nothing more can be isolated");
    if (suspects.size() == 1) {
      spdlog::error("{}: the worker process crashed ({}) on this input; it is skipped",
                    suspects.front(), sig);
      crashed[suspects.front()] = sig;
      continue;
    }
    spdlog::warn("the worker process crashed ({}) with {} inputs in progress; trying each alone",
                 sig, suspects.size());
    size_t found = 0;
    for (const auto& s : suspects) {
      fs::remove(journal);
      std::vector<std::string> probe = worker;
      probe.insert(probe.end(), {"--probe", s});
      const int st = run_worker(probe);
      if (WIFSIGNALED(st)) {
        spdlog::error("{}: crashes the worker process ({}); it is skipped", s,
                      signal_name(WTERMSIG(st)));
        crashed[s] = signal_name(WTERMSIG(st));
        ++found;
      }
    }
    // No input crashes alone: one at a time, so that the next crash names its input.
    if (found == 0) {
      if (serial)
        throw Error("the harmonize worker process died (" + sig +
                    ") with several inputs in progress although it ran one at a time");
      serial = true;
      write_file_atomic((dir.path / "serial").string(), "1\n");
    }
  }
}

}  // namespace concord::cli
