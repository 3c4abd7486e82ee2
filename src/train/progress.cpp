#include "train/progress.h"

#include <unistd.h>

#include <cstdio>

namespace pipenag {

std::string format_duration(double s) {
  if (s < 0) s = 0;
  const long t = static_cast<long>(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t / 60) % 60);
  else if (t >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

Progress::Progress(int64_t total_steps, int64_t log_every, bool quiet)
    : total_(total_steps), every_(log_every < 1 ? 1 : log_every), quiet_(quiet),
      tty_(::isatty(STDERR_FILENO) != 0), start_(std::chrono::steady_clock::now()) {}

std::string Progress::eta(int64_t step) const {
  const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const int64_t done = step - first_step_;
  if (done <= 0) return "?";
  return format_duration(el / static_cast<double>(done) * static_cast<double>(total_ - step));
}

void Progress::step(int64_t step, double loss, double tokens_per_s, double lr, double utilization) {
  if (quiet_) return;
  if (first_step_ < 0) {
    first_step_ = step - 1;
    start_ = std::chrono::steady_clock::now();
  }
  char util[32] = "";
  if (utilization >= 0) std::snprintf(util, sizeof util, " | util %.1f%%", 100.0 * utilization);
  char buf[240];
  std::snprintf(buf, sizeof buf, "step %lld/%lld | loss %.4f | lr %.2e | %.0f tok/s%s | ETA %s",
                static_cast<long long>(step), static_cast<long long>(total_), loss, lr,
                tokens_per_s, util, eta(step).c_str());
  if (tty_) {
    std::fprintf(stderr, "\r\033[K%s", buf);
    line_open_ = true;
  } else if (step % every_ == 0 || step == total_ || step == first_step_ + 1) {
    std::fprintf(stderr, "%s\n", buf);
  }
  std::fflush(stderr);
}

void Progress::message(const std::string& line) {
  if (quiet_) return;
  if (line_open_) std::fprintf(stderr, "\r\033[K");
  std::fprintf(stderr, "%s\n", line.c_str());
  line_open_ = false;
  std::fflush(stderr);
}

void Progress::finish() {
  if (line_open_ && !quiet_) std::fprintf(stderr, "\n");
  line_open_ = false;
}

}  // namespace pipenag
