// A progress indicator for long batch work (harmonize, run): one redrawn line on a terminal,
// plain log lines at most every few seconds otherwise. Thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

namespace concord::cli {

class ProgressBar {
 public:
  // total <= 0: unknown total (no percentage or ETA). Draws nothing when `enabled` is false.
  ProgressBar(std::string label, int64_t total, bool enabled = true);
  ~ProgressBar();
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  void advance(int64_t n = 1);
  void set_status(std::string text);  // short text shown after the counts (e.g. "3 failed")
  // Prints a full line above the bar (on a terminal the bar is cleared and redrawn).
  void print(const std::string& line);
  // Draws the final state and ends the line; further calls do nothing.
  void finish();

  int64_t done() const;
  double elapsed_seconds() const;

 private:
  void draw_locked(bool force);
  std::string render_locked() const;

  mutable std::mutex mutex_;
  std::string label_;
  std::string status_;
  int64_t total_;
  int64_t done_ = 0;
  int64_t drawn_done_ = -1;
  bool enabled_;
  bool tty_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

// "1:02:03", "4:05" or "7s".
std::string format_duration(double seconds);

}  // namespace concord::cli
