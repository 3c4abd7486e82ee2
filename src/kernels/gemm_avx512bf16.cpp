// The AVX512_BF16 GEMM microkernel (see gemm.h): A and B hold pairs of bf16 values of
// consecutive k in 32-bit words, and one vdpbf16ps per accumulator adds both products of a pair
// to the fp32 chain. This file alone is compiled with -mavx512f -mavx512bf16 (CMakeLists.txt), so
// it holds nothing but the kernel: no standard-library templates, whose AVX-512 instantiations
// the linker could otherwise pick for code that runs on older CPUs.
#include <immintrin.h>

#include "kernels/gemm.h"

namespace pipenag::kernels::gemm {

namespace {

// MR rows x NV vectors of 16 fp32 columns; each k step is one pair of k (a 32-bit word of A
// broadcast against 16 words of B).
template <int MR, int NV>
void microkernel(int ksteps, const uint32_t* __restrict a, long rs_a, long cs_a,
                 const uint32_t* __restrict b, float* __restrict c, long ldc, bool load_c) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j)
      acc[i][j] = load_c ? _mm512_loadu_ps(c + i * ldc + 16 * j) : _mm512_setzero_ps();
  for (int k = 0; k < ksteps; ++k) {
    __m512bh bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = reinterpret_cast<__m512bh>(_mm512_load_si512(b + 16 * j));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512bh av =
          reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[i * rs_a])));
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
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

const Kernels<uint32_t, float> kAvx512Bf16{
    "avx512bf16", 6, 16, 4, 256, 96, 4096,
    {&microkernel<6, 1>, &microkernel<6, 2>, &microkernel<6, 3>, &microkernel<6, 4>}};

}  // namespace pipenag::kernels::gemm
