// Gradient-norm clipping as torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6)
// when that is below 1. The norm is summed in double over fixed-size chunks in a fixed order,
// so it does not depend on the number of threads.
#pragma once
#include <cstddef>

namespace pipenag {

// The factor clipping multiplies the gradient by: max_norm / (norm + 1e-6) when that is below 1,
// else 1 (also when max_norm <= 0, clipping off).
float clip_scale(double norm, double max_norm);

// Sum of squares of g[n] (deterministic).
double sum_squares(const float* g, size_t n);
// Scales g so that its norm is at most max_norm (no-op when max_norm <= 0); returns the norm
// before clipping, computed from `sumsq` (pass sum_squares(g, n), or the sum over several stages
// for a global norm).
double clip_by_norm(float* g, size_t n, double sumsq, double max_norm);

}  // namespace pipenag
