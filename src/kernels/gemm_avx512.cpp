// The AVX-512 GEMM microkernel (see gemm.h). This file alone is compiled with -mavx512f (see
// CMakeLists.txt), so it holds nothing but the kernel: no standard-library templates, whose
// AVX-512 instantiations the linker could otherwise pick for code that runs on older CPUs.
#include <immintrin.h>

#include "kernels/gemm.h"

namespace pipenag::kernels::gemm {

namespace {

// MR rows x NV vectors of 16 floats: MR * NV accumulators stay in registers (24 of 32 for 6 x 4;
// the narrower tiles serve the right edge of C).
template <int MR, int NV>
void microkernel(int kc, const float* __restrict a, long rs_a, long cs_a, const float* __restrict b,
                 float* __restrict c, long ldc, bool load_c) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j)
      acc[i][j] = load_c ? _mm512_loadu_ps(c + i * ldc + 16 * j) : _mm512_setzero_ps();
  for (int k = 0; k < kc; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_load_ps(b + 16 * j);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * rs_a]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
    a += cs_a;
    b += 16 * NV;
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

}  // namespace

const Kernels<float, float> kAvx512{"avx512", 6, 16, 4, 384, 96, 4096,
                           {&microkernel<6, 1>, &microkernel<6, 2>, &microkernel<6, 3>,
                            &microkernel<6, 4>}};

}  // namespace pipenag::kernels::gemm
