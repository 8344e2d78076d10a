// Durable output: temporary + fsync + rename + fsync of the folder (see durable_output.h).
#include <concord/durable_output.h>
#include <concord/error.h>

#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace concord {

namespace fs = std::filesystem;

namespace {

constexpr const char* kTempMarker = ".concord-tmp-";

std::string errno_text(int err) {
  return std::strerror(err);
}

fs::path parent_of(const fs::path& target) {
  return target.has_parent_path() ? target.parent_path() : fs::path(".");
}

// "a/b/" -> "a/b": the target's own name is its last non-empty component.
fs::path without_trailing_slash(fs::path p) {
  while (!p.empty() && p.filename().empty() && p.has_parent_path() && p != p.parent_path())
    p = p.parent_path();
  return p;
}

// ".NAME.concord-tmp-PID-N" beside `target`. Names are unique within the process (a counter);
// a leftover of an earlier process with the same id makes the caller try the next one.
fs::path temporary_beside(const fs::path& target) {
  static std::atomic<uint64_t> counter{0};
  return parent_of(target) / ("." + target.filename().string() + kTempMarker +
                              std::to_string(::getpid()) + "-" + std::to_string(counter++));
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // Closes now, reporting the error close() may be the first to see (NFS, quotas).
  int close() {
    int r = ::close(fd_);
    fd_ = -1;
    return r;
  }

 private:
  int fd_;
};

void write_all(int fd, const void* data, size_t size, const std::string& what) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error("cannot write " + what + ": " + errno_text(errno));
    p += n;
    size -= size_t(n);
  }
}

void sync_fd(int fd, const fs::path& path) {
  while (::fsync(fd) != 0) {
    if (errno == EINTR) continue;
    if (errno == EINVAL || errno == EROFS) return;  // no syncing here (special file systems)
    throw Error("cannot flush " + path.string() + " to disk: " + errno_text(errno));
  }
}

// Creates a new temporary beside `target`, lets `fill` write into it, flushes it, renames it to
// `target` and flushes the folder. The temporary is removed on any failure.
void replace_atomically(const fs::path& target, const std::function<void(int fd)>& fill) {
  const fs::path parent = parent_of(target);
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) throw Error("cannot create the folder " + parent.string() + ": " + ec.message());
  fs::path tmp;
  int raw = -1;
  for (int attempt = 0; attempt < 1000 && raw < 0; ++attempt) {
    tmp = temporary_beside(target);
    raw = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (raw < 0 && errno != EEXIST)
      throw Error("cannot write " + target.string() + ": cannot create " + tmp.string() + ": " +
                  errno_text(errno));
  }
  if (raw < 0) throw Error("cannot write " + target.string() + ": no free temporary name");
  Fd fd(raw);
  try {
    fill(fd.get());
    sync_fd(fd.get(), tmp);
    if (fd.close() != 0) throw Error("cannot write " + tmp.string() + ": " + errno_text(errno));
    if (::rename(tmp.c_str(), target.c_str()) != 0)
      throw Error("cannot rename " + tmp.string() + " to " + target.string() + ": " +
                  errno_text(errno));
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  sync_path(parent);
}

// Flushes every file and folder below `dir`, and `dir` itself.
void sync_tree(const fs::path& dir) {
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (it->is_regular_file() || it->is_directory()) sync_path(it->path());
  if (ec) throw Error("cannot list " + dir.string() + ": " + ec.message());
  sync_path(dir);
}

void rename_or_throw(const fs::path& from, const fs::path& to, const char* what) {
  std::error_code ec;
  fs::rename(from, to, ec);
  if (ec)
    throw Error(std::string("cannot ") + what + " " + from.string() + " to " + to.string() + ": " +
                ec.message());
}

}  // namespace

void write_file_atomic(const std::string& file, const void* data, size_t size) {
  replace_atomically(fs::path(file), [&](int fd) { write_all(fd, data, size, file); });
}

void write_file_atomic(const std::string& file, const std::string& text) {
  write_file_atomic(file, text.data(), text.size());
}

void copy_atomic(const std::string& from, const std::string& to) {
  std::error_code ec;
  if (fs::is_directory(from, ec)) {
    auto scratch = std::make_shared<ScratchFolder>(to);
    fs::copy(from, scratch->path() / "copy", fs::copy_options::recursive, ec);
    if (ec) throw Error("cannot copy " + from + " to " + to + ": " + ec.message());
    scratch->publish_folder("copy");
    return;
  }
  Fd in(::open(from.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  struct stat st {};
  if (in.get() < 0 || ::fstat(in.get(), &st) != 0)
    throw Error("cannot copy " + from + ": " + errno_text(errno));
  if (!S_ISREG(st.st_mode)) throw Error("cannot copy " + from + ": not a regular file");
  replace_atomically(fs::path(to), [&](int fd) {
    std::vector<char> buf(size_t(1) << 20);
    for (;;) {
      ssize_t n = ::read(in.get(), buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw Error("cannot read " + from + ": " + errno_text(errno));
      if (n == 0) break;
      write_all(fd, buf.data(), size_t(n), to);
    }
  });
}

void sync_path(const fs::path& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (fd.get() < 0)
    throw Error("cannot open " + path.string() + " to flush it: " + errno_text(errno));
  sync_fd(fd.get(), path);
}

bool is_temporary_name(const std::string& name) {
  if (name.find(kTempMarker) != std::string::npos) return true;
  const auto tmp = name.rfind(".tmp-");  // write_file_atomic before the unit existed
  return tmp != std::string::npos && tmp + 5 < name.size() &&
         name.find_first_not_of("0123456789-", tmp + 5) == std::string::npos;
}

// ---------------------------------------------------------------------------------------------
// ScratchFolder

ScratchFolder::ScratchFolder(const fs::path& target) : target_(without_trailing_slash(target)) {
  std::error_code ec;
  fs::create_directories(parent_of(target_), ec);
  if (ec)
    throw Error("cannot create the folder " + parent_of(target_).string() + ": " + ec.message());
  for (int attempt = 0; attempt < 1000; ++attempt) {
    path_ = temporary_beside(target_);
    if (fs::create_directory(path_, ec)) return;
    if (ec) throw Error("cannot write " + target_.string() + ": " + ec.message());
  }
  throw Error("cannot write " + target_.string() + ": no free temporary name");
}

ScratchFolder::~ScratchFolder() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

void ScratchFolder::write(const std::string& name, const void* data, size_t size) const {
  const fs::path file = path_ / name;
  Fd fd(::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) throw Error("cannot create " + file.string() + ": " + errno_text(errno));
  write_all(fd.get(), data, size, file.string());
  if (fd.close() != 0) throw Error("cannot write " + file.string() + ": " + errno_text(errno));
}

void ScratchFolder::publish_files() const {
  const fs::path parent = parent_of(target_);
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(path_)) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  std::stable_partition(files.begin(), files.end(),
                        [&](const fs::path& f) { return f.filename() != target_.filename(); });
  for (const auto& f : files) {
    sync_path(f);
    rename_or_throw(f, parent / f.filename(), "move");
  }
  sync_path(parent);
}

void ScratchFolder::publish_folder(const std::string& name) const {
  const fs::path folder = path_ / name, aside = path_ / (name + ".replaced");
  sync_tree(folder);
  std::error_code ec;
  const bool replacing = fs::exists(fs::symlink_status(target_, ec));
  if (replacing) rename_or_throw(target_, aside, "move aside");
  try {
    rename_or_throw(folder, target_, "move");
  } catch (...) {
    if (replacing) fs::rename(aside, target_, ec);  // put the old output back
    throw;
  }
  sync_path(parent_of(target_));
}

// ---------------------------------------------------------------------------------------------
// OutputPublisher

struct OutputPublisher::State {
  Done done;
  size_t max_pending;
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<std::pair<std::string, std::function<void()>>> queue;
  size_t in_flight = 0;  // queued + being published
  bool closing = false;
  std::thread thread;

  void run() {
    for (;;) {
      std::pair<std::string, std::function<void()>> job;
      {
        std::unique_lock<std::mutex> lock(mutex);
        changed.wait(lock, [&] { return closing || !queue.empty(); });
        if (queue.empty()) return;  // closing and drained
        job = std::move(queue.front());
        queue.pop_front();
      }
      std::string error;
      try {
        job.second();
      } catch (const std::exception& e) {
        error = e.what();
      }
      job.second = nullptr;  // releases the scratch folder before reporting
      if (done) {
        try {
          done(job.first, error);
        } catch (const std::exception& e) {
          spdlog::error("output publisher: callback for {} failed: {}", job.first, e.what());
        }
      } else if (!error.empty()) {
        spdlog::error("{}", error);
      }
      {
        std::lock_guard<std::mutex> lock(mutex);
        --in_flight;
      }
      changed.notify_all();
    }
  }
};

OutputPublisher::OutputPublisher(Done done, size_t max_pending) : state_(new State) {
  state_->done = std::move(done);
  state_->max_pending = std::max<size_t>(1, max_pending);
  state_->thread = std::thread([s = state_.get()] { s->run(); });
}

OutputPublisher::~OutputPublisher() {
  finish();
}

void OutputPublisher::finish() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (state_->closing) return;
    state_->closing = true;
  }
  state_->changed.notify_all();
  if (state_->thread.joinable()) state_->thread.join();
}

void OutputPublisher::submit(const std::string& path, std::function<void()> publish) {
  State& s = *state_;
  {
    std::unique_lock<std::mutex> lock(s.mutex);
    s.changed.wait(lock, [&] { return s.closing || s.in_flight < s.max_pending; });
    if (s.closing) throw Error(path + ": output publisher already finished");
    s.queue.emplace_back(path, std::move(publish));
    ++s.in_flight;
  }
  s.changed.notify_all();
}

void publish_output(std::shared_ptr<ScratchFolder> scratch, OutputPublisher* publisher,
                    std::function<void(const ScratchFolder&)> step) {
  if (!publisher) return step(*scratch);
  const std::string target = scratch->target().string();
  publisher->submit(target,
                    [scratch = std::move(scratch), step = std::move(step)] { step(*scratch); });
}

}  // namespace concord
