// Row-wise softmax and cross-entropy. Each row is a few passes over V values: the first streams
// the row from memory (max), the later ones find it in L2 (a 50k-float row is 200 KB).
#include <algorithm>
#include <cmath>
#include <cstddef>

#include "kernels/kernels.h"
#include "kernels/vec_math.h"

namespace pipenag::kernels {

namespace {

// Below this many logits the OpenMP fork costs more than the work.
constexpr long kParallelMin = 16384;

// Mean of the losses of rows with a target, summed in double in row order.
template <typename T>
double mean_loss(const T* losses, const int32_t* targets, int M) {
  double sum = 0;
  long count = 0;
  for (int m = 0; m < M; ++m) {
    if (targets[m] < 0) continue;
    sum += static_cast<double>(losses[m]);
    ++count;
  }
  return count ? sum / static_cast<double>(count) : 0.0;
}

}  // namespace

template <typename T>
PIPENAG_DISPATCH double softmax_xent_forward(T* losses, const T* logits, const int32_t* targets, int M, int V) {
#pragma omp parallel for schedule(static) if (static_cast<long>(M) * V > kParallelMin)
  for (int m = 0; m < M; ++m) {
    const int tgt = targets[m];
    if (tgt < 0) {
      losses[m] = 0;
      continue;
    }
    const T* row = logits + static_cast<size_t>(m) * V;
    const T mx = detail::row_max(row, V);
    const T sum = detail::exp_shift_sum(row, V, mx);
    // -log(e^(x_t - mx) / sum), with mx - x_t formed first: it is exact-ish and usually dominant.
    losses[m] = (mx - row[tgt]) + std::log(sum);
  }
  return mean_loss(losses, targets, M);
}

template <typename T>
PIPENAG_DISPATCH double softmax_xent_forward_backward(T* logits, T* losses, const int32_t* targets, int M, int V,
                                     std::type_identity_t<T> grad_scale) {
#pragma omp parallel for schedule(static) if (static_cast<long>(M) * V > kParallelMin)
  for (int m = 0; m < M; ++m) {
    T* row = logits + static_cast<size_t>(m) * V;
    const int tgt = targets[m];
    if (tgt < 0) {
      losses[m] = 0;
      std::fill(row, row + V, T(0));
      continue;
    }
    const T mx = detail::row_max(row, V);
    const T x_t = row[tgt];
    // Same lane order as exp_shift_sum, so the loss matches softmax_xent_forward bit for bit.
    const T sum = detail::exp_shift_store_sum(row, row, V, mx);
    losses[m] = (mx - x_t) + std::log(sum);
    detail::scale_row(row, V, grad_scale / sum, tgt, -grad_scale);
  }
  return mean_loss(losses, targets, M);
}

template <typename T>
PIPENAG_DISPATCH void softmax_rows(T* logits, int M, int V) {
#pragma omp parallel for schedule(static) if (static_cast<long>(M) * V > kParallelMin)
  for (int m = 0; m < M; ++m) {
    T* row = logits + static_cast<size_t>(m) * V;
    const T mx = detail::row_max(row, V);
    const T sum = detail::exp_shift_store_sum(row, row, V, mx);
    detail::scale_row(row, V, T(1) / sum);
  }
}

#define PIPENAG_INSTANTIATE(T)                                                                   \
  template double softmax_xent_forward<T>(T*, const T*, const int32_t*, int, int);              \
  template double softmax_xent_forward_backward<T>(T*, T*, const int32_t*, int, int, T);        \
  template void softmax_rows<T>(T*, int, int);
PIPENAG_INSTANTIATE(float)
PIPENAG_INSTANTIATE(double)
#undef PIPENAG_INSTANTIATE

}  // namespace pipenag::kernels
