#include "optim/adamw.h"

#include <cmath>

namespace pipenag {

AdamW::AdamW(size_t n, const AdamWHyper& h) : h_(h), m_(n, 0.0f), v_(n, 0.0f) {}

void AdamW::step(float* w, const float* g, double lr, float grad_scale) {
  ++t_;
  // Scalars in double then rounded once, as PyTorch computes them from Python floats.
  const double bc1 = 1.0 - std::pow(h_.beta1, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(h_.beta2, static_cast<double>(t_));
  const float decay = static_cast<float>(1.0 - lr * h_.weight_decay);
  const float b1 = static_cast<float>(h_.beta1), b2 = static_cast<float>(h_.beta2);
  const float one_b1 = static_cast<float>(1.0 - h_.beta1), one_b2 = static_cast<float>(1.0 - h_.beta2);
  const float step_size = static_cast<float>(lr / bc1);
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float eps = static_cast<float>(h_.eps);
  float* m = m_.data();
  float* v = v_.data();
  const long n = static_cast<long>(m_.size());
#pragma omp parallel for simd schedule(static)
  for (long i = 0; i < n; ++i) {
    const float gi = g[i] * grad_scale;
    const float wi = w[i] * decay;
    const float mi = b1 * m[i] + one_b1 * gi;
    const float vi = b2 * v[i] + one_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float denom = std::sqrt(vi) / bc2_sqrt + eps;
    w[i] = wi - step_size * (mi / denom);
  }
}

}  // namespace pipenag
