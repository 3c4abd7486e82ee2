// Linear layers on our own GEMM: a packing and blocking driver (BLIS's loop order) around the
// per-instruction-set microkernels of gemm_avx512.cpp / gemm_avx2.cpp and a generic one here.
//
// Bit-identity by construction (gemm.h): each element of C is one fused multiply-add chain over
// k in order, the driver never splits K between threads, and the chain's state is kept in C
// between K blocks. alpha is folded into A while packing (a' = alpha * a, rounded), beta is
// applied to C once before the chain starts. The results therefore depend on (M, N, K, the data)
// alone: not on the thread count, the block sizes, or which microkernel the CPU runs.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#include "kernels/gemm_driver.h"
#include "kernels/kernels.h"

namespace pipenag::kernels {

namespace {

// ---- generic microkernel (float on CPUs without AVX2/FMA, and all of double) -------------------

template <typename T, int MR, int NR>
void generic_microkernel(int kc, const T* __restrict a, long rs_a, long cs_a, const T* __restrict b,
                         T* __restrict c, long ldc, bool load_c) {
  T acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = load_c ? c[i * ldc + j] : T(0);
  for (int k = 0; k < kc; ++k) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = std::fma(a[i * rs_a], b[j], acc[i][j]);
    a += cs_a;
    b += NR;
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = acc[i][j];
}

using gemm::Kernels;
const Kernels<float, float> kGenericFloat{"generic", 4, 16, 1, 256, 96, 4096,
                                          {&generic_microkernel<float, 4, 16>}};
const Kernels<double, double> kGenericDouble{"generic", 4, 8, 1, 256, 96, 2048,
                                             {&generic_microkernel<double, 4, 8>}};

// ---- instruction-set choice --------------------------------------------------------------------

bool cpu_has(const std::string& isa) {
  if (isa == "avx512") return __builtin_cpu_supports("avx512f");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return isa == "generic";
}

const char* best_isa() {
  for (const char* isa : {"avx512", "avx2"})
    if (cpu_has(isa)) return isa;
  return "generic";
}

const Kernels<float, float>* kernels_named(const std::string& isa) {
  if (isa == "avx512") return &gemm::kAvx512;
  if (isa == "avx2") return &gemm::kAvx2;
  return &kGenericFloat;
}

// The float kernels in use: set by set_gemm_isa, or from PIPENAG_ISA by the first GEMM.
std::atomic<const Kernels<float, float>*> g_kernels{nullptr};
std::once_flag g_env_once;

const Kernels<float, float>& float_kernels() {
  if (const Kernels<float, float>* k = g_kernels.load(std::memory_order_acquire)) return *k;
  std::call_once(g_env_once, [] {
    if (g_kernels.load()) return;  // set explicitly in the meantime
    const char* env = std::getenv("PIPENAG_ISA");
    try {
      const std::string note = set_gemm_isa(env ? env : "auto");
      if (!note.empty()) std::fprintf(stderr, "pipenag: %s\n", note.c_str());
    } catch (const std::invalid_argument& e) {
      std::fprintf(stderr, "pipenag: %s; using %s\n", e.what(), best_isa());
      set_gemm_isa("auto");
    }
  });
  return *g_kernels.load(std::memory_order_acquire);
}

template <typename T>
const Kernels<T, T>& kernels_for() {
  if constexpr (std::is_same_v<T, float>) return float_kernels();
  else return kGenericDouble;
}

}  // namespace

template <>
const gemm::Kernels<float, float>& gemm::fp_kernels<float>() {
  return float_kernels();
}
template <>
const gemm::Kernels<double, double>& gemm::fp_kernels<double>() {
  return kGenericDouble;
}

const char* gemm_isa() { return float_kernels().isa; }

std::string set_gemm_isa(const std::string& name) {
  if (name != "auto" && name != "avx512" && name != "avx2" && name != "generic")
    throw std::invalid_argument("unknown instruction set '" + name +
                                "' in PIPENAG_ISA (auto | avx512 | avx2 | generic)");
  std::string note;
  std::string isa = name == "auto" ? best_isa() : name;
  if (!cpu_has(isa)) {
    note = "this CPU has no " + isa + " instructions; the matrix products use " + best_isa() +
           " (same results)";
    isa = best_isa();
  }
  g_kernels.store(kernels_named(isa), std::memory_order_release);
  return note;
}

template <typename T>
void sgemm(bool trans_a, bool trans_b, int M, int N, int K, std::type_identity_t<T> alpha,
           const T* A, int lda, const T* B, int ldb, std::type_identity_t<T> beta, T* C, int ldc) {
  gemm::gemm_blocked<T, T>(kernels_for<T>(), trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta,
                           C, ldc);
}

template <typename T>
void linear_forward(T* out, const T* inp, const T* W, const T* bias, int M, int K, int N) {
  if (bias) {
    // Pre-filling with the bias and letting the GEMM accumulate (beta = 1) costs one write pass,
    // the same as a separate add afterwards, but needs no second read of `out`.
#pragma omp parallel for schedule(static) if (static_cast<long>(M) * N > 32768)
    for (int i = 0; i < M; ++i) std::memcpy(out + static_cast<size_t>(i) * N, bias, sizeof(T) * N);
  }
  sgemm<T>(false, true, M, N, K, 1, inp, K, W, K, bias ? 1 : 0, out, N);
}

namespace {

// dbias[j] += sum_i dout[i, j]. Threads own column strips; each strip sums its rows in order, so
// the result is independent of the thread count. Strips of 256 columns keep 16 vector
// accumulators in registers while streaming 1 KiB of contiguous memory per row.
template <typename T>
void column_sums_accumulate(T* dbias, const T* dout, int M, int N) {
  constexpr int kStrip = 256;
  const int n_strips = (N + kStrip - 1) / kStrip;
#pragma omp parallel for schedule(static) if (static_cast<long>(M) * N > 32768)
  for (int s = 0; s < n_strips; ++s) {
    const int j0 = s * kStrip;
    const int width = std::min(kStrip, N - j0);
    T acc[kStrip];
    for (int j = 0; j < width; ++j) acc[j] = 0;
    for (int i = 0; i < M; ++i) {
      const T* row = dout + static_cast<size_t>(i) * N + j0;
#pragma omp simd
      for (int j = 0; j < width; ++j) acc[j] += row[j];
    }
    for (int j = 0; j < width; ++j) dbias[j0 + j] += acc[j];
  }
}

}  // namespace

template <typename T>
void linear_backward(T* dinp, T* dW, T* dbias, const T* dout, const T* inp, const T* W, int M,
                     int K, int N) {
  if (dinp) sgemm<T>(false, false, M, K, N, 1, dout, N, W, K, 1, dinp, K);
  if (dW) sgemm<T>(true, false, N, K, M, 1, dout, N, inp, K, 1, dW, K);
  if (dbias) column_sums_accumulate(dbias, dout, M, N);
}

#define PIPENAG_INSTANTIATE(T)                                                                    \
  template void sgemm<T>(bool, bool, int, int, int, T, const T*, int, const T*, int, T, T*, int); \
  template void linear_forward<T>(T*, const T*, const T*, const T*, int, int, int);               \
  template void linear_backward<T>(T*, T*, T*, const T*, const T*, const T*, int, int, int);
PIPENAG_INSTANTIATE(float)
PIPENAG_INSTANTIATE(double)
#undef PIPENAG_INSTANTIATE

}  // namespace pipenag::kernels
