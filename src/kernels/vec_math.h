// Private to src/kernels: vectorised exp/erf and the row primitives that softmax-like kernels
// share. The float versions work on 16-lane GCC vector types (Vf16), which the compiler maps to
// one AVX-512 register, two AVX2 ones or four SSE ones, whatever the build or the runtime clone
// (PIPENAG_DISPATCH) targets: one source, no intrinsics, so a portable build vectorises them too
// (std::exp in a scalar loop is ~10x too slow for a 50k-wide vocabulary). Double takes the plain
// scalar path, which is what the double-precision gradient checks exercise.
//
// Every reduction here runs in a fixed order that depends only on n: 16 lane accumulators (two
// sets where noted), then the lanes added in index order. Never on threads, never on the
// vector width.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

// Runtime dispatch for the hot non-GEMM kernels of a portable build: GCC compiles the function
// for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the build's baseline, and picks one when
// the program starts. A native build targets one CPU already and needs no clones.
#if defined(PIPENAG_PORTABLE_BUILD) && !defined(__SANITIZE_ADDRESS__)
#define PIPENAG_DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PIPENAG_DISPATCH
#endif

// The helpers below must inline into their callers, and so into each runtime clone of them (an
// out-of-line copy would be compiled for the baseline only). Passing 64-byte vectors by value is
// then never an ABI question (CMakeLists.txt silences GCC's -Wpsabi note about it).
#define PIPENAG_INLINE inline __attribute__((always_inline))

namespace pipenag::kernels::detail {

typedef float Vf16 __attribute__((vector_size(64)));
typedef int32_t Vi16 __attribute__((vector_size(64)));

PIPENAG_INLINE Vf16 splat(float x) { return Vf16{} + x; }
PIPENAG_INLINE Vf16 load16(const float* p) {
  Vf16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
PIPENAG_INLINE void store16(float* p, Vf16 v) { std::memcpy(p, &v, sizeof v); }
// Lanes [0, n) from p, the rest `fill`.
PIPENAG_INLINE Vf16 load_partial(const float* p, int n, float fill) {
  alignas(64) float t[16];
  for (int i = 0; i < 16; ++i) t[i] = i < n ? p[i] : fill;
  return load16(t);
}
PIPENAG_INLINE void store_partial(float* p, Vf16 v, int n) {
  alignas(64) float t[16];
  store16(t, v);
  for (int i = 0; i < n; ++i) p[i] = t[i];
}
PIPENAG_INLINE Vf16 vmax(Vf16 a, Vf16 b) { return a > b ? a : b; }  // NaN in a: b; used on clamps below
PIPENAG_INLINE Vf16 vmin(Vf16 a, Vf16 b) { return a < b ? a : b; }
PIPENAG_INLINE float sum_lanes(Vf16 v) {
  float s = 0;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}
PIPENAG_INLINE float max_lanes(Vf16 v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
  return m;
}

// e^x for 16 floats, ~1 ulp (Cephes expf polynomial on |r| <= ln2/2). x is clamped to
// [-104, 88.8] so that -inf gives exactly 0 and large inputs give inf; NaN propagates (training
// divergence must stay visible). The power 2^n is applied in two exact halves, so that results
// in the subnormal range round once, as a hardware scale would.
PIPENAG_INLINE Vf16 exp16(Vf16 x) {
  const Vf16 nan_mask = x != x ? splat(1.0f) : splat(0.0f);
  x = vmin(vmax(x, splat(-104.0f)), splat(88.8f));
  // Round to nearest even by adding and removing 1.5 * 2^23 (|x * log2 e| < 2^22 here).
  const Vf16 magic = splat(12582912.0f);
  const Vf16 n = (x * splat(1.44269504088896341f) + magic) - magic;
  // ln2 split in two so that n * ln2_hi is exact for |n| < 2^15.
  Vf16 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  Vf16 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + (r + splat(1.0f));
  const Vi16 ni = __builtin_convertvector(n, Vi16);
  const Vi16 n1 = ni >> 1, n2 = ni - n1;  // both in [-75, 65]: normal powers of two
  const Vf16 s1 = reinterpret_cast<Vf16>((n1 + 127) << 23), s2 = reinterpret_cast<Vf16>((n2 + 127) << 23);
  const Vf16 e = (p * s1) * s2;
  return nan_mask != 0.0f ? splat(std::numeric_limits<float>::quiet_NaN()) : e;
}

// erf(x) as a rational function of x (odd/even polynomials, x clamped to [-4, 4], beyond which
// erf is +-1 in float): the approximation Eigen and XLA use for float, a few ulp from erff.
PIPENAG_INLINE Vf16 erf16(Vf16 x) {
  x = vmin(vmax(x, splat(-4.0f)), splat(4.0f));
  const Vf16 x2 = x * x;
  Vf16 p = x2 * splat(-2.72614225801306e-10f) + splat(2.77068142495902e-08f);
  p = x2 * p + splat(-2.10102402082508e-06f);
  p = x2 * p + splat(-5.69250639462346e-05f);
  p = x2 * p + splat(-7.34990630326855e-04f);
  p = x2 * p + splat(-2.95459980854025e-03f);
  p = x2 * p + splat(-1.60960333262415e-02f);
  Vf16 q = x2 * splat(-1.45660718464996e-05f) + splat(-2.13374055278905e-04f);
  q = x2 * q + splat(-1.68282697438203e-03f);
  q = x2 * q + splat(-7.37332916720468e-03f);
  q = x2 * q + splat(-1.42647390514189e-02f);
  return x * p / q;
}

// ---- row primitives (n >= 1 where a maximum is taken) -------------------------------------------

template <typename T>
T row_max(const T* x, int n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// y[i] = exp((x[i] - shift) * scale) (y may be x); returns the sum of the y.
template <typename T>
T exp_shift_store_sum(T* y, const T* x, int n, T shift, T scale = 1) {
  T s = 0;
  for (int i = 0; i < n; ++i) {
    y[i] = std::exp((x[i] - shift) * scale);
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

template <>
PIPENAG_INLINE float row_max<float>(const float* x, int n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  Vf16 m0 = splat(ninf), m1 = m0;
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = vmax(load16(x + i), m0);
    m1 = vmax(load16(x + i + 16), m1);
  }
  for (; i + 16 <= n; i += 16) m0 = vmax(load16(x + i), m0);
  if (i < n) m1 = vmax(load_partial(x + i, n - i, ninf), m1);
  return max_lanes(vmax(m0, m1));
}

// Two sets of 16 lane sums: lanes i and i + 16 of every 32 values go to s0 and s1.
template <>
PIPENAG_INLINE float exp_shift_store_sum<float>(float* y, const float* x, int n, float shift,
                                                float scale) {
  const Vf16 sh = splat(shift), sc = splat(scale);
  Vf16 s0 = Vf16{}, s1 = Vf16{};
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    const Vf16 e0 = exp16((load16(x + i) - sh) * sc), e1 = exp16((load16(x + i + 16) - sh) * sc);
    store16(y + i, e0);
    store16(y + i + 16, e1);
    s0 += e0;
    s1 += e1;
  }
  for (; i < n; i += 16) {
    const int m = std::min(16, n - i);
    // Padding lanes hold -inf: their exp is exactly 0 and adds nothing.
    const Vf16 e = exp16((load_partial(x + i, m, -std::numeric_limits<float>::infinity()) - sh) * sc);
    store_partial(y + i, e, m);
    s0 += e;
  }
  return sum_lanes(s0 + s1);
}

template <>
PIPENAG_INLINE float exp_shift_sum<float>(const float* x, int n, float shift) {
  const Vf16 sh = splat(shift);
  Vf16 s0 = Vf16{}, s1 = Vf16{};
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 += exp16(load16(x + i) - sh);
    s1 += exp16(load16(x + i + 16) - sh);
  }
  for (; i < n; i += 16)
    s0 += exp16(load_partial(x + i, std::min(16, n - i), -std::numeric_limits<float>::infinity()) - sh);
  return sum_lanes(s0 + s1);
}

template <>
PIPENAG_INLINE void scale_row<float>(float* x, int n, float s, int hot, float add_hot) {
  const Vf16 vs = splat(s);
  int i = 0;
  for (; i + 16 <= n; i += 16) store16(x + i, load16(x + i) * vs);
  for (; i < n; ++i) x[i] *= s;
  if (hot >= 0) x[hot] += add_hot;
}

}  // namespace pipenag::kernels::detail
