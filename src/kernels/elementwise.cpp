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

template <typename T>
T gelu_scalar(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return 0.5f * x * (1.0f + detail::erf_rational(x * static_cast<float>(kInvSqrt2)));
  } else {
    return T(0.5) * x * (T(1) + std::erf(x * T(kInvSqrt2)));
  }
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
void relu_backward(T* dinp, const T* dout, const T* inp, size_t n) {
  parallel_chunks(n, [=](size_t b, size_t e) {
#pragma omp simd
    for (size_t i = b; i < e; ++i) {
      const T d = dout[i];  // loaded unconditionally: a select vectorises, a guarded load not
      dinp[i] += inp[i] > 0 ? d : T(0);
    }
  });
}

template <typename T>
void gelu_forward(T* out, const T* inp, size_t n) {
  parallel_chunks(n, [=](size_t b, size_t e) {
    size_t i = b;
#if PIPENAG_KERNELS_AVX512
    if constexpr (std::is_same_v<T, float>) {
      const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
      const __m512 k = _mm512_set1_ps(static_cast<float>(kInvSqrt2));
      for (; i + 16 <= e; i += 16) {
        const __m512 x = _mm512_loadu_ps(inp + i);
        const __m512 cdf = _mm512_mul_ps(half, _mm512_add_ps(one, detail::erf16(_mm512_mul_ps(x, k))));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(x, cdf));
      }
    }
#endif
    for (; i < e; ++i) out[i] = gelu_scalar(inp[i]);
  });
}

template <typename T>
void gelu_backward(T* dinp, const T* dout, const T* inp, size_t n) {
  parallel_chunks(n, [=](size_t b, size_t e) {
    size_t i = b;
#if PIPENAG_KERNELS_AVX512
    if constexpr (std::is_same_v<T, float>) {
      const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
      const __m512 k = _mm512_set1_ps(static_cast<float>(kInvSqrt2));
      const __m512 kpdf = _mm512_set1_ps(static_cast<float>(kInvSqrt2Pi));
      const __m512 mhalf = _mm512_set1_ps(-0.5f);
      for (; i + 16 <= e; i += 16) {
        const __m512 x = _mm512_loadu_ps(inp + i);
        const __m512 cdf = _mm512_mul_ps(half, _mm512_add_ps(one, detail::erf16(_mm512_mul_ps(x, k))));
        const __m512 pdf =
            _mm512_mul_ps(kpdf, detail::exp16(_mm512_mul_ps(mhalf, _mm512_mul_ps(x, x))));
        const __m512 g = _mm512_fmadd_ps(x, pdf, cdf);
        // Product rounded before the add, as in the scalar tail: dinp += round(g * dout).
        _mm512_storeu_ps(dinp + i, _mm512_add_ps(_mm512_loadu_ps(dinp + i),
                                                 _mm512_mul_ps(g, _mm512_loadu_ps(dout + i))));
      }
      for (; i < e; ++i) {
        const float x = inp[i];
        const float cdf = 0.5f * (1.0f + detail::erf_rational(x * static_cast<float>(kInvSqrt2)));
        const float g = cdf + x * static_cast<float>(kInvSqrt2Pi) * std::exp(-0.5f * x * x);
        dinp[i] += g * dout[i];
      }
      return;
    }
#endif
    for (; i < e; ++i) dinp[i] += gelu_grad_scalar(inp[i]) * dout[i];
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
  template void relu_backward<T>(T*, const T*, const T*, size_t);          \
  template void gelu_forward<T>(T*, const T*, size_t);                     \
  template void gelu_backward<T>(T*, const T*, const T*, size_t);          \
  template void add<T>(T*, const T*, const T*, size_t);
PIPENAG_INSTANTIATE(float)
PIPENAG_INSTANTIATE(double)
#undef PIPENAG_INSTANTIATE

}  // namespace pipenag::kernels
