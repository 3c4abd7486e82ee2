// Private to src/kernels: vectorised exp/erf and the row primitives that softmax-like kernels
// share. The float versions use AVX-512 when the build targets it (std::exp in a scalar loop is
// ~10x too slow for a 50k-wide vocabulary); everything else, double included, takes the generic
// scalar path, which is what the double-precision gradient checks exercise.
//
// Every reduction here runs in a fixed order that depends only on n, never on threads.
#pragma once

// GCC 12 reports its own intrinsics' `__m512 __Y = __Y;` placeholders as maybe-uninitialized once
// they are inlined into OpenMP-outlined loops (a false positive fixed in later GCCs).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#define PIPENAG_KERNELS_AVX512 1
#else
#define PIPENAG_KERNELS_AVX512 0
#endif

namespace pipenag::kernels::detail {

// erf(x) as a rational function of x (odd/even polynomials, x clamped to [-4, 4], beyond which
// erf is +-1 in float): the approximation Eigen and XLA use for float, a few ulp from erff.
// Plain arithmetic, so a `#pragma omp simd` loop around it vectorises.
inline float erf_rational(float x) {
  x = std::min(4.0f, std::max(-4.0f, x));
  const float x2 = x * x;
  float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = x2 * p + -2.10102402082508e-06f;
  p = x2 * p + -5.69250639462346e-05f;
  p = x2 * p + -7.34990630326855e-04f;
  p = x2 * p + -2.95459980854025e-03f;
  p = x2 * p + -1.60960333262415e-02f;
  float q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = x2 * q + -1.68282697438203e-03f;
  q = x2 * q + -7.37332916720468e-03f;
  q = x2 * q + -1.42647390514189e-02f;
  return x * p / q;
}

#if PIPENAG_KERNELS_AVX512
// Lanes [0, n) set, n in [0, 16].
inline __mmask16 tail_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

// e^x for 16 floats, ~1 ulp (Cephes expf polynomial on |r| <= ln2/2). Inputs are clamped so that
// -inf gives exactly 0 and large inputs give inf; NaN propagates (training divergence must stay
// visible). vscalefps applies 2^n without integer tricks and handles under/overflow.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  // NaN is the second operand: kept
  x = _mm512_min_ps(_mm512_set1_ps(88.8f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 split in two so that n * ln2_hi is exact for |n| < 2^15.
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// erf_rational for 16 floats.
inline __m512 erf16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(4.0f), _mm512_max_ps(_mm512_set1_ps(-4.0f), x));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_fmadd_ps(x2, _mm512_set1_ps(-2.72614225801306e-10f),
                             _mm512_set1_ps(2.77068142495902e-08f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.10102402082508e-06f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-5.69250639462346e-05f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-7.34990630326855e-04f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.95459980854025e-03f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-1.60960333262415e-02f));
  __m512 q = _mm512_fmadd_ps(x2, _mm512_set1_ps(-1.45660718464996e-05f),
                             _mm512_set1_ps(-2.13374055278905e-04f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.68282697438203e-03f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-7.37332916720468e-03f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.42647390514189e-02f));
  return _mm512_div_ps(_mm512_mul_ps(x, p), q);
}
#endif

// ---- row primitives (n >= 1 where a maximum is taken) -------------------------------------------

template <typename T>
T row_max(const T* x, int n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// y[i] = exp(x[i] - shift) (y may be x); returns the sum of the y.
template <typename T>
T exp_shift_store_sum(T* y, const T* x, int n, T shift) {
  T s = 0;
  for (int i = 0; i < n; ++i) {
    y[i] = std::exp(x[i] - shift);
    s += y[i];
  }
  return s;
}

// Sum of exp(x[i] - shift), nothing stored.
template <typename T>
T exp_shift_sum(const T* x, int n, T shift) {
  T s = 0;
  for (int i = 0; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

// x[i] = x[i] * s + (i == hot ? add_hot : 0); hot < 0 means none.
template <typename T>
void scale_row(T* x, int n, T s, int hot = -1, T add_hot = 0) {
  for (int i = 0; i < n; ++i) x[i] *= s;
  if (hot >= 0) x[hot] += add_hot;
}

#if PIPENAG_KERNELS_AVX512
template <>
inline float row_max<float>(const float* x, int n) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int i = 0;
  for (; i + 64 <= n; i += 64) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + i + 16));
    m2 = _mm512_max_ps(m2, _mm512_loadu_ps(x + i + 32));
    m3 = _mm512_max_ps(m3, _mm512_loadu_ps(x + i + 48));
  }
  for (; i + 16 <= n; i += 16) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
  if (i < n) m1 = _mm512_max_ps(m1, _mm512_mask_loadu_ps(ninf, tail_mask(n - i), x + i));
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

template <>
inline float exp_shift_store_sum<float>(float* y, const float* x, int n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh));
    const __m512 e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), sh));
    _mm512_storeu_ps(y + i, e0);
    _mm512_storeu_ps(y + i + 16, e1);
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
  }
  for (; i < n; i += 16) {
    const __mmask16 k = tail_mask(std::min(16, n - i));
    const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), sh)));
    _mm512_mask_storeu_ps(y + i, k, e);
    s0 = _mm512_add_ps(s0, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

template <>
inline float exp_shift_sum<float>(const float* x, int n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_add_ps(s0, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh)));
    s1 = _mm512_add_ps(s1, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), sh)));
  }
  for (; i < n; i += 16) {
    const __mmask16 k = tail_mask(std::min(16, n - i));
    s0 = _mm512_add_ps(
        s0, _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), sh))));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

template <>
inline void scale_row<float>(float* x, int n, float s, int hot, float add_hot) {
  const __m512 vs = _mm512_set1_ps(s);
  int i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), vs));
  if (i < n) {
    const __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), vs));
  }
  if (hot >= 0) x[hot] += add_hot;
}
#endif

}  // namespace pipenag::kernels::detail

#pragma GCC diagnostic pop
