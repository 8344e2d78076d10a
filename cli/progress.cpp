#include "progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>

namespace concord::cli {

using Clock = std::chrono::steady_clock;

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  auto t = int64_t(std::llround(s));
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(t / 3600),
                  (long long)(t / 60 % 60), (long long)(t % 60));
  else if (t >= 60)
    std::snprintf(buf, sizeof buf, "%lld:%02lld", (long long)(t / 60), (long long)(t % 60));
  else
    std::snprintf(buf, sizeof buf, "%llds", (long long)t);
  return buf;
}

ProgressBar::ProgressBar(std::string label, int64_t total, bool enabled)
    : label_(std::move(label)),
      total_(total),
      enabled_(enabled),
      tty_(::isatty(STDERR_FILENO) != 0),
      start_(Clock::now()),
      last_draw_(Clock::time_point::min()) {
  std::lock_guard<std::mutex> lock(mutex_);
  draw_locked(true);
}

ProgressBar::~ProgressBar() {
  finish();
}

void ProgressBar::advance(int64_t n) {
  std::lock_guard<std::mutex> lock(mutex_);
  done_ += n;
  draw_locked(false);
}

void ProgressBar::set_status(std::string text) {
  std::lock_guard<std::mutex> lock(mutex_);
  status_ = std::move(text);
  draw_locked(false);
}

void ProgressBar::print(const std::string& line) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (enabled_ && tty_ && !finished_) std::fputs("\r\033[2K", stderr);
  std::fprintf(stderr, "%s\n", line.c_str());
  if (enabled_ && tty_ && !finished_) draw_locked(true);
  std::fflush(stderr);
}

void ProgressBar::finish() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (finished_) return;
  if (tty_ || drawn_done_ != done_) draw_locked(true);
  if (enabled_ && tty_) std::fputc('\n', stderr);
  finished_ = true;
}

int64_t ProgressBar::done() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_;
}

double ProgressBar::elapsed_seconds() const {
  return std::chrono::duration<double>(Clock::now() - start_).count();
}

std::string ProgressBar::render_locked() const {
  const double secs = std::chrono::duration<double>(Clock::now() - start_).count();
  const double rate = secs > 0 ? double(done_) / secs : 0;
  std::string s = label_ + " ";
  char buf[160];
  if (total_ > 0) {
    const double frac = std::min(1.0, double(done_) / double(total_));
    if (tty_) {
      const int width = 24, filled = int(frac * width);
      s += "[" + std::string(size_t(filled), '#') + std::string(size_t(width - filled), '.') + "] ";
    }
    const double eta = rate > 0 ? double(total_ - done_) / rate : NAN;
    std::snprintf(buf, sizeof buf, "%lld/%lld (%.0f%%) %.2f/s ETA %s", (long long)done_,
                  (long long)total_, 100 * frac, rate, format_duration(eta).c_str());
  } else {
    std::snprintf(buf, sizeof buf, "%lld done %.2f/s", (long long)done_, rate);
  }
  s += buf;
  if (!status_.empty()) s += " " + status_;
  std::snprintf(buf, sizeof buf, " elapsed %s", format_duration(secs).c_str());
  return s + buf;
}

void ProgressBar::draw_locked(bool force) {
  if (!enabled_ || finished_) return;
  const auto now = Clock::now();
  // A terminal line is cheap to redraw; a log file gets a line at most every 5 seconds.
  const auto every = tty_ ? std::chrono::milliseconds(100) : std::chrono::milliseconds(5000);
  const bool completed = total_ > 0 && done_ >= total_ && drawn_done_ != done_;
  if (!force && !completed && now - last_draw_ < every) return;
  last_draw_ = now;
  drawn_done_ = done_;
  if (tty_)
    std::fprintf(stderr, "\r\033[2K%s", render_locked().c_str());
  else
    std::fprintf(stderr, "%s\n", render_locked().c_str());
  std::fflush(stderr);
}

}  // namespace concord::cli
