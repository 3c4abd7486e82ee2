#include "optim/grad_clip.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace pipenag {

double sum_squares(const float* g, size_t n) {
  constexpr size_t kChunk = 1 << 16;
  const long chunks = static_cast<long>((n + kChunk - 1) / kChunk);
  std::vector<double> part(static_cast<size_t>(chunks), 0.0);
#pragma omp parallel for schedule(static)
  for (long c = 0; c < chunks; ++c) {
    const size_t b = static_cast<size_t>(c) * kChunk, e = std::min(n, b + kChunk);
    double s = 0.0;
    for (size_t i = b; i < e; ++i) s += static_cast<double>(g[i]) * g[i];
    part[static_cast<size_t>(c)] = s;
  }
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

float clip_scale(double norm, double max_norm) {
  if (max_norm <= 0.0) return 1.0f;
  const double coef = max_norm / (norm + 1e-6);
  return coef < 1.0 ? static_cast<float>(coef) : 1.0f;
}

double clip_by_norm(float* g, size_t n, double sumsq, double max_norm) {
  const double norm = std::sqrt(sumsq);
  {
    const float c = clip_scale(norm, max_norm);
    if (c != 1.0f) {
      const long nn = static_cast<long>(n);
#pragma omp parallel for simd schedule(static)
      for (long i = 0; i < nn; ++i) g[i] *= c;
    }
  }
  return norm;
}

}  // namespace pipenag
