#include <algorithm>
#include <cmath>
#include <cstddef>

#include "kernels/kernels.h"
#include "kernels/vec_math.h"

namespace pipenag::kernels {

namespace {

// Below this many elements the OpenMP fork costs more than the loop.
constexpr size_t kParallelMin = 32768;
// Static chunks of whole cache lines, so that threads never write the same line.
constexpr size_t kChunk = 4096;

// Runs body(begin, end) over [0, n) in fixed chunks spread over threads.
template <typename F>
void parallel_chunks(size_t n, F&& body) {
  const size_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (size_t k = 0; k < n_chunks; ++k) body(k * kChunk, std::min(n, (k + 1) * kChunk));
}

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

// The double path (float goes through erf16/exp16 below, tail included).
template <typename T>
T gelu_scalar(T x) {
  return T(0.5) * x * (T(1) + std::erf(x * T(kInvSqrt2)));
}

// d/dx [x Phi(x)] = Phi(x) + x phi(x).
template <typename T>
T gelu_grad_scalar(T x) {
  const T cdf = T(0.5) * (T(1) + std::erf(x * T(kInvSqrt2)));
  return cdf + x * T(kInvSqrt2Pi) * std::exp(T(-0.5) * x * x);
}

}  // namespace

template <typename T>
void relu_forward(T* out, const T* inp, size_t n) {
  parallel_chunks(n, [=](size_t b, size_t e) {
#pragma omp simd
    for (size_t i = b; i < e; ++i) out[i] = inp[i] > 0 ? inp[i] : T(0);
  });
}

template <typename T>
void relu_backward(T* dinp, const T* dout, const T* inp, size_t n, bool accumulate) {
  parallel_chunks(n, [=](size_t b, size_t e) {
    // dout is loaded unconditionally: a select vectorises, a guarded load not.
    if (accumulate) {
#pragma omp simd
      for (size_t i = b; i < e; ++i) {
        const T d = dout[i];
        dinp[i] += inp[i] > 0 ? d : T(0);
      }
    } else {
#pragma omp simd
      for (size_t i = b; i < e; ++i) {
        const T d = dout[i];
        dinp[i] = inp[i] > 0 ? d : T(0);
      }
    }
  });
}

template <typename T>
PIPENAG_DISPATCH void gelu_forward(T* out, const T* inp, size_t n) {
  parallel_chunks(n, [=](size_t b, size_t e) {
    size_t i = b;
    if constexpr (std::is_same_v<T, float>) {
      using detail::Vf16, detail::splat;
      const Vf16 k = splat(static_cast<float>(kInvSqrt2));
      for (; i < e; i += 16) {
        const int m = static_cast<int>(std::min<size_t>(16, e - i));
        const Vf16 x = detail::load_partial(inp + i, m, 0.0f);
        detail::store_partial(out + i, x * (splat(0.5f) * (splat(1.0f) + detail::erf16(x * k))), m);
      }
      return;
    }
    for (; i < e; ++i) out[i] = gelu_scalar(inp[i]);
  });
}

template <typename T>
PIPENAG_DISPATCH void gelu_backward(T* dinp, const T* dout, const T* inp, size_t n, bool accumulate) {
  parallel_chunks(n, [=](size_t b, size_t e) {
    size_t i = b;
    if constexpr (std::is_same_v<T, float>) {
      using detail::Vf16, detail::splat;
      const Vf16 k = splat(static_cast<float>(kInvSqrt2));
      const Vf16 kpdf = splat(static_cast<float>(kInvSqrt2Pi));
      for (; i < e; i += 16) {
        const int m = static_cast<int>(std::min<size_t>(16, e - i));
        const Vf16 x = detail::load_partial(inp + i, m, 0.0f);
        const Vf16 cdf = splat(0.5f) * (splat(1.0f) + detail::erf16(x * k));
        const Vf16 pdf = kpdf * detail::exp16(splat(-0.5f) * (x * x));
        const Vf16 g = x * pdf + cdf;
        const Vf16 d = g * detail::load_partial(dout + i, m, 0.0f);
        detail::store_partial(dinp + i, accumulate ? detail::load_partial(dinp + i, m, 0.0f) + d : d, m);
      }
      return;
    }
    for (; i < e; ++i) dinp[i] = (accumulate ? dinp[i] : T(0)) + gelu_grad_scalar(inp[i]) * dout[i];
  });
}

template <typename T>
void add(T* out, const T* a, const T* b, size_t n) {
  parallel_chunks(n, [=](size_t lo, size_t hi) {
#pragma omp simd
    for (size_t i = lo; i < hi; ++i) out[i] = a[i] + b[i];
  });
}

#define PIPENAG_INSTANTIATE(T)                                             \
  template void relu_forward<T>(T*, const T*, size_t);                     \
  template void relu_backward<T>(T*, const T*, const T*, size_t, bool);    \
  template void gelu_forward<T>(T*, const T*, size_t);                     \
  template void gelu_backward<T>(T*, const T*, const T*, size_t, bool);    \
  template void add<T>(T*, const T*, const T*, size_t);
PIPENAG_INSTANTIATE(float)
PIPENAG_INSTANTIATE(double)
#undef PIPENAG_INSTANTIATE

}  // namespace pipenag::kernels
