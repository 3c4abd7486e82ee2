// Linear layers on top of OpenBLAS.
//
// Thread invariance. OpenBLAS splits a GEMM over M/N tiles, never over K, but its threaded
// driver cuts K into blocks differently from the single-threaded one: a last stretch between
// GEMM_Q and 2 GEMM_Q is halved, rounded to GEMM_UNROLL_M by one driver and not by the other,
// which changes the summation order unless that stretch is a multiple of 32 (GEMM_Q is a multiple
// of 32 on every x86 target). So sgemm hands OpenBLAS the largest multiple of 32 of K and then
// the (< 32) rest with beta = 1; each element's sum order is then fixed by K alone. Measured on
// OpenBLAS 0.3.21 (SkylakeX kernels): results differ from K = 452 on without the split, never with
// it. The rest costs one extra pass over C, only when K > 256 is not a multiple of 32.
//
// OpenBLAS's dgemm differs between 1 and 2 threads even for small K (another code path), so
// dgemm runs single-threaded: double serves the gradient-check tests, not training.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "kernels/kernels.h"

namespace pipenag::kernels {

namespace {

constexpr int kKAlign = 32;
constexpr int kKSmall = 256;

template <typename T>
void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, T alpha, const T* A,
               int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    static_assert(std::is_same_v<T, double>);
    // A one-thread region gets its own copy of the thread-count setting, so lowering it here
    // makes OpenBLAS (which reads omp_get_max_threads()) run serially without touching the
    // caller's setting.
#pragma omp parallel num_threads(1)
    {
      omp_set_num_threads(1);
      cblas_dgemm(CblasRowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    }
  }
}

}  // namespace

template <typename T>
void sgemm(bool trans_a, bool trans_b, int M, int N, int K, std::type_identity_t<T> alpha,
           const T* A, int lda, const T* B, int ldb, std::type_identity_t<T> beta, T* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // BLAS rejects the leading dimensions of empty operands; C = beta * C
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        T& c = C[static_cast<size_t>(i) * ldc + j];
        c = beta == 0 ? T(0) : beta * c;
      }
    return;
  }
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = trans_b ? CblasTrans : CblasNoTrans;
  // Up to kKSmall, K is one block for OpenBLAS on every x86 target, so nothing to split.
  const int k_main = K <= kKSmall ? K : K - K % kKAlign;
  if (k_main > 0) blas_gemm<T>(ta, tb, M, N, k_main, alpha, A, lda, B, ldb, beta, C, ldc);
  if (k_main < K) {
    const T* a = trans_a ? A + static_cast<size_t>(k_main) * lda : A + k_main;
    const T* b = trans_b ? B + k_main : B + static_cast<size_t>(k_main) * ldb;
    blas_gemm<T>(ta, tb, M, N, K - k_main, alpha, a, lda, b, ldb, k_main > 0 ? T(1) : T(beta), C,
                 ldc);
  }
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
