// gemm_step: the 18 linear products of one training step of the benchmark model (6 layers,
// d = 384, 8 x 256 tokens, vocab 65), each called once in the order a step calls them (forward,
// input gradient, weight gradient per layer), so that caches are as cold as in training; prints
// the best of N steps in ms. One backend per binary (bench/blas_compare.sh builds all three):
//   -DBACKEND_PIPENAG (links build/libpipenag_core.a), -DBACKEND_DNNL (-ldnnl),
//   -DBACKEND_OPENBLAS (OpenBLAS's cblas).
//   gemm_step THREADS STEPS
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#if defined(BACKEND_PIPENAG)
#include "kernels/kernels.h"
#elif defined(BACKEND_DNNL)
#include <oneapi/dnnl/dnnl.h>
#elif defined(BACKEND_OPENBLAS)
#include <cblas.h>
#else
#error "define one of BACKEND_PIPENAG, BACKEND_DNNL, BACKEND_OPENBLAS"
#endif

namespace {

// Row-major C[M,N] = op(A) op(B) + beta C.
void gemm(bool ta, bool tb, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
          float beta, float* C, int ldc) {
#if defined(BACKEND_PIPENAG)
  pipenag::kernels::sgemm<float>(ta, tb, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
#elif defined(BACKEND_DNNL)
  dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
#else
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N,
              K, 1.0f, A, lda, B, ldb, beta, C, ldc);
#endif
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: gemm_step THREADS STEPS\n");
    return 2;
  }
  const int threads = std::atoi(argv[1]), steps = std::atoi(argv[2]);
  omp_set_num_threads(threads);
#if defined(BACKEND_OPENBLAS)
  openblas_set_num_threads(threads);
#endif
  const int M = 2048, C = 384;
  struct Shape {
    int K, N, times;
  };
  const Shape shapes[] = {{C, 3 * C, 6}, {C, C, 6}, {C, 4 * C, 6}, {4 * C, C, 6}, {C, 65, 1}};
  std::vector<float> inp(size_t(M) * 4 * C, 0.01f), W(size_t(4) * C * 4 * C, 0.02f),
      out(size_t(M) * 4 * C), dout(size_t(M) * 4 * C, 0.03f), din(size_t(M) * 4 * C),
      dW(size_t(4) * C * 4 * C);
  double best = 1e30, flops = 0;
  for (const Shape& s : shapes) flops += s.times * 3 * 2.0 * M * s.N * s.K;
  for (int r = 0; r < steps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const Shape& s : shapes)
      for (int l = 0; l < s.times; ++l) {
        gemm(false, true, M, s.N, s.K, inp.data(), s.K, W.data(), s.K, 0, out.data(), s.N);
        gemm(false, false, M, s.K, s.N, dout.data(), s.N, W.data(), s.K, 0, din.data(), s.K);
        gemm(true, false, s.N, s.K, M, dout.data(), s.N, inp.data(), s.K, 1, dW.data(), s.K);
      }
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (t < best) best = t;
  }
  std::printf("%.1f ms  %.0f GFLOP/s\n", best * 1e3, flops / best / 1e9);
  return 0;
}
