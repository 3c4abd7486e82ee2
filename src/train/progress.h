// Progress output: a live, rewritten line on a terminal; plain log lines otherwise.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace pipenag {

class Progress {
 public:
  Progress(int64_t total_steps, int64_t log_every, bool quiet);
  // utilization < 0: not shown (a single stage).
  void step(int64_t step, double loss, double tokens_per_s, double lr, double utilization = -1);
  void message(const std::string& line);  // a line of its own (eval results, checkpoints)
  void finish();

 private:
  std::string eta(int64_t step) const;
  int64_t total_, every_;
  bool quiet_, tty_;
  bool line_open_ = false;
  int64_t first_step_ = -1;
  std::chrono::steady_clock::time_point start_;
};

std::string format_duration(double seconds);

}  // namespace pipenag
