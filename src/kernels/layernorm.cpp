#include <algorithm>
#include <cmath>
#include <cstddef>

#include "kernels/kernels.h"
#include "kernels/vec_math.h"

namespace pipenag::kernels {

namespace {
constexpr double kEps = 1e-5;
// Below this many elements the OpenMP fork costs more than the loop.
constexpr long kParallelMin = 16384;
}  // namespace

template <typename T>
PIPENAG_DISPATCH void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* w, const T* b, int M,
                       int C) {
#pragma omp parallel for schedule(static) if (static_cast<long>(M) * C > kParallelMin)
  for (int i = 0; i < M; ++i) {
    const T* x = inp + static_cast<size_t>(i) * C;
    T* y = out + static_cast<size_t>(i) * C;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int c = 0; c < C; ++c) sum += x[c];
    const T m = sum / C;
    // Two passes (mean, then squared deviations) rather than E[x^2] - m^2, which cancels badly.
    T ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int c = 0; c < C; ++c) ss += (x[c] - m) * (x[c] - m);
    const T rs = T(1) / std::sqrt(ss / C + T(kEps));
#pragma omp simd
    for (int c = 0; c < C; ++c) y[c] = (x[c] - m) * rs * w[c] + b[c];
    mean[i] = m;
    rstd[i] = rs;
  }
}

template <typename T>
PIPENAG_DISPATCH void layernorm_backward(T* dinp, T* dw, T* db, const T* dout, const T* inp, const T* w,
                        const T* mean, const T* rstd, int M, int C) {
  const bool big = static_cast<long>(M) * C > kParallelMin;
  if (dinp) {
#pragma omp parallel for schedule(static) if (big)
    for (int i = 0; i < M; ++i) {
      const T* x = inp + static_cast<size_t>(i) * C;
      const T* dy = dout + static_cast<size_t>(i) * C;
      T* dx = dinp + static_cast<size_t>(i) * C;
      const T m = mean[i], rs = rstd[i];
      T sum_dn = 0, sum_dn_norm = 0;
#pragma omp simd reduction(+ : sum_dn, sum_dn_norm)
      for (int c = 0; c < C; ++c) {
        const T dn = dy[c] * w[c];
        sum_dn += dn;
        sum_dn_norm += dn * (x[c] - m) * rs;
      }
      const T mean_dn = sum_dn / C, mean_dn_norm = sum_dn_norm / C;
#pragma omp simd
      for (int c = 0; c < C; ++c) {
        const T norm = (x[c] - m) * rs;
        dx[c] += rs * (dy[c] * w[c] - mean_dn - norm * mean_dn_norm);
      }
    }
  }
  if (dw || db) {
    // dw and db reduce over rows: threads own column strips and add rows in order, so the sums
    // do not depend on the thread count. The normalised input is recomputed rather than stored.
    constexpr int kStrip = 64;
    const int n_strips = (C + kStrip - 1) / kStrip;
#pragma omp parallel for schedule(static) if (big)
    for (int s = 0; s < n_strips; ++s) {
      const int c0 = s * kStrip;
      const int width = std::min(kStrip, C - c0);
      T acc_w[kStrip], acc_b[kStrip];
      for (int c = 0; c < width; ++c) acc_w[c] = acc_b[c] = 0;
      for (int i = 0; i < M; ++i) {
        const T* x = inp + static_cast<size_t>(i) * C + c0;
        const T* dy = dout + static_cast<size_t>(i) * C + c0;
        const T m = mean[i], rs = rstd[i];
#pragma omp simd
        for (int c = 0; c < width; ++c) {
          acc_w[c] += dy[c] * ((x[c] - m) * rs);
          acc_b[c] += dy[c];
        }
      }
      for (int c = 0; c < width; ++c) {
        if (dw) dw[c0 + c] += acc_w[c];
        if (db) db[c0 + c] += acc_b[c];
      }
    }
  }
}

#define PIPENAG_INSTANTIATE(T)                                                                  \
  template void layernorm_forward<T>(T*, T*, T*, const T*, const T*, const T*, int, int);     \
  template void layernorm_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*,      \
                                      const T*, int, int);
PIPENAG_INSTANTIATE(float)
PIPENAG_INSTANTIATE(double)
#undef PIPENAG_INSTANTIATE

}  // namespace pipenag::kernels
