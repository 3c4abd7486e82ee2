// Learning-rate schedule: linear warm-up from lr/warmup to lr over `warmup` steps, then cosine
// decay to lr * min_ratio at step `total` (0-based step index s).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace pipenag {

inline double lr_at(int64_t s, double lr, int64_t warmup, int64_t total, double min_ratio) {
  if (s < warmup) return lr * static_cast<double>(s + 1) / static_cast<double>(warmup);
  const double min_lr = lr * min_ratio;
  const int64_t span = std::max<int64_t>(1, total - warmup);
  const double p = std::min(1.0, static_cast<double>(s - warmup) / static_cast<double>(span));
  return min_lr + 0.5 * (1.0 + std::cos(3.14159265358979323846 * p)) * (lr - min_lr);
}

}  // namespace pipenag
