#include <algorithm>
#include <cstddef>

#include "kernels/kernels.h"

namespace pipenag::kernels {

namespace {
// Below this many elements the OpenMP fork costs more than the loop.
constexpr long kParallelMin = 16384;
}  // namespace

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, const T* wpe, int B, int T_,
                       int C) {
  const int rows = B * T_;
#pragma omp parallel for schedule(static) if (static_cast<long>(rows) * C > kParallelMin)
  for (int r = 0; r < rows; ++r) {
    const T* e = wte + static_cast<size_t>(tokens[r]) * C;
    const T* p = wpe + static_cast<size_t>(r % T_) * C;
    T* y = out + static_cast<size_t>(r) * C;
#pragma omp simd
    for (int c = 0; c < C; ++c) y[c] = e[c] + p[c];
  }
}

template <typename T>
void embedding_backward(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, int B, int T_,
                        int C) {
  const bool big = static_cast<long>(B) * T_ * C > kParallelMin;
  if (dwpe) {
#pragma omp parallel for schedule(static) if (big)
    for (int t = 0; t < T_; ++t) {
      T* g = dwpe + static_cast<size_t>(t) * C;
      for (int b = 0; b < B; ++b) {
        const T* d = dout + (static_cast<size_t>(b) * T_ + t) * C;
#pragma omp simd
        for (int c = 0; c < C; ++c) g[c] += d[c];
      }
    }
  }
  if (dwte) {
    // A token may repeat, so rows of dwte are not independent outputs; columns are. Threads own
    // column strips and walk the tokens in order: no races, and the same sums with any thread
    // count.
    constexpr int kStrip = 64;
    const int n_strips = (C + kStrip - 1) / kStrip;
    const int rows = B * T_;
#pragma omp parallel for schedule(static) if (big)
    for (int s = 0; s < n_strips; ++s) {
      const int c0 = s * kStrip;
      const int width = std::min(kStrip, C - c0);
      for (int r = 0; r < rows; ++r) {
        T* g = dwte + static_cast<size_t>(tokens[r]) * C + c0;
        const T* d = dout + static_cast<size_t>(r) * C + c0;
#pragma omp simd
        for (int c = 0; c < width; ++c) g[c] += d[c];
      }
    }
  }
}

#define PIPENAG_INSTANTIATE(T)                                                                 \
  template void embedding_forward<T>(T*, const int32_t*, const T*, const T*, int, int, int);  \
  template void embedding_backward<T>(T*, T*, const T*, const int32_t*, int, int, int);
PIPENAG_INSTANTIATE(float)
PIPENAG_INSTANTIATE(double)
#undef PIPENAG_INSTANTIATE

}  // namespace pipenag::kernels
