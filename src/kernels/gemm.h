// Private to src/kernels: the fp32 GEMM's microkernels, one set per instruction set, for the
// driver in matmul.cpp that blocks, packs and threads around them.
//
// Why our own GEMM and not a BLAS: see docs/BLAS.md. The property that matters here is the order
// of every sum. A microkernel computes a tile of C as one fused multiply-add chain per element,
// over k in increasing order, starting from the value already in C (or from 0):
//
//     c = fma(a[i][k], b[k][j], c)   for k = 0, 1, ..., K-1
//
// The driver stores the chain's state in C between K blocks (a float store and load are exact)
// and splits work over threads by tiles of C only, never over K. So every element of C is the
// same correctly rounded chain whatever the block sizes, the thread count, the tile an element
// falls in, and the vector width: FMA rounds once in AVX2, AVX-512 and std::fma alike. The
// products are therefore bit-identical across thread counts, engines and instruction sets, by
// construction rather than by a library's kernel choice.
#pragma once
#include <cstdint>

namespace pipenag::kernels::gemm {

// A set of microkernels over A/B elements E and C elements C: run[v - 1] computes the MR x
// (v * vec) tile c[i*ldc + j] (+)= sum_k a[i*rs_a + k*cs_a] * b[k*(v*vec) + j] over kc k steps, in
// the chain order above. `a` is read in place (rows of a row-major A: rs_a = lda, cs_a = 1;
// columns of a transposed one: rs_a = 1, cs_a = lda) or packed (rs_a = 1, cs_a = MR); `b` is a
// packed B micro-panel (v * vec elements per k step, 64-byte aligned). With load_c false the chain
// starts at 0 and c is only written. The narrower tiles serve the right edge of C.
//
// For bf16, E is a 32-bit word holding two bf16 values of consecutive k (the lower half first)
// and one k step is such a pair: c = c + a0 b0 + a1 b1, as one vdpbf16ps lane computes it.
constexpr int kMaxVectors = 4;

template <typename E, typename C>
struct Kernels {
  const char* isa;  // "avx512", "avx2", "generic", "avx512bf16"
  int mr;           // rows of a tile
  int vec;          // elements per vector register
  int nv;           // vectors per row of a full tile: NR = nv * vec columns
  int kc, mc, nc;   // cache blocking: K block (k steps), rows of A per block, columns per block
  void (*run[kMaxVectors])(int kc, const E* a, long rs_a, long cs_a, const E* b, C* c, long ldc,
                           bool load_c);
};

// Compiled in their own translation units with their instruction-set flags; call only on a CPU
// that has the instructions (matmul.cpp and matmul_bf16.cpp check).
extern const Kernels<float, float> kAvx512;         // AVX-512F
extern const Kernels<float, float> kAvx2;           // AVX2 + FMA
extern const Kernels<uint32_t, float> kAvx512Bf16;  // AVX512_BF16 (vdpbf16ps)

}  // namespace pipenag::kernels::gemm
