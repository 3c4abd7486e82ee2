// The AVX2 + FMA GEMM microkernel (see gemm.h). This file alone is compiled with -mavx2 -mfma
// (see CMakeLists.txt), so it holds nothing but the kernel: no standard-library templates, whose
// AVX2 instantiations the linker could otherwise pick for code that runs on older CPUs.
#include <immintrin.h>

#include "kernels/gemm.h"

namespace pipenag::kernels::gemm {

namespace {

// MR rows x NV vectors of 8 floats: 12 accumulators + 2 B vectors + 1 broadcast of 16 registers
// for 6 x 2 (the narrower tile serves the right edge of C).
template <int MR, int NV>
void microkernel(int kc, const float* __restrict a, long rs_a, long cs_a, const float* __restrict b,
                 float* __restrict c, long ldc, bool load_c) {
  __m256 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j)
      acc[i][j] = load_c ? _mm256_loadu_ps(c + i * ldc + 8 * j) : _mm256_setzero_ps();
  for (int k = 0; k < kc; ++k) {
    __m256 bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = _mm256_load_ps(b + 8 * j);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * rs_a);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
    a += cs_a;
    b += 8 * NV;
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(c + i * ldc + 8 * j, acc[i][j]);
}

}  // namespace

const Kernels<float, float> kAvx2{"avx2", 6, 8, 2, 512, 96, 4096,
                         {&microkernel<6, 1>, &microkernel<6, 2>, nullptr, nullptr}};

}  // namespace pipenag::kernels::gemm
