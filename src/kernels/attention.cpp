// Causal self-attention on the GEMM microkernels. Each (batch, head) pair is independent and
// runs on one thread, so the split of pairs over threads cannot change any result.
//
// Causality is exploited in blocks of kBlock rows: row block i only meets key blocks 0..i, so
// about half of the dense T x T work is skipped. Inside the diagonal block the few entries above
// the diagonal are computed and then zeroed (cheaper than smaller GEMMs). The matrices that every
// block multiplies by (K^T and V in the forward; V^T, K, Q and dO in the backward) are packed for
// the microkernels once per pair (gemm_packed_b), not once per block; each product is the same
// multiply-add chain the plain GEMM computes.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "kernels/gemm_driver.h"
#include "kernels/kernels.h"
#include "kernels/vec_math.h"

namespace pipenag::kernels {

namespace {
constexpr int kBlock = 64;

// This thread's packed operands of one (batch, head) pair: `count` matrices of `each` elements.
thread_local gemm::PackBuffer t_attention_pack;
template <typename T>
T* packed_operands(size_t each, int count) {
  return t_attention_pack.get<T>(each * static_cast<size_t>(count));
}
}  // namespace

template <typename T>
PIPENAG_DISPATCH void attention_forward(T* out, T* att, const T* qkv, int B, int T_, int C, int NH) {
  const int hs = C / NH;
  const int C3 = 3 * C;
  const T scale = T(1) / std::sqrt(static_cast<T>(hs));
  const size_t TT = static_cast<size_t>(T_) * T_;
  const auto& uk = gemm::fp_kernels<T>();
  const size_t each = std::max(gemm::packed_b_size(uk, hs, T_), gemm::packed_b_size(uk, T_, hs));
#pragma omp parallel for schedule(static)
  for (int p = 0; p < B * NH; ++p) {
    const int b = p / NH, h = p % NH;
    const T* q = qkv + static_cast<size_t>(b) * T_ * C3 + static_cast<size_t>(h) * hs;
    const T* k = q + C;
    const T* v = q + 2 * C;
    T* a = att + p * TT;
    T* o = out + static_cast<size_t>(b) * T_ * C + static_cast<size_t>(h) * hs;
    T* kt = packed_operands<T>(each, 2);  // K^T: hs x T
    T* vp = kt + each;                    // V:   T x hs
    gemm::pack_b_all(uk, kt, k, C3, true, hs, T_);
    gemm::pack_b_all(uk, vp, v, C3, false, T_, hs);
    for (int r0 = 0; r0 < T_; r0 += kBlock) {
      const int rows = std::min(kBlock, T_ - r0);
      const int keys = r0 + rows;
      T* ab = a + static_cast<size_t>(r0) * T_;
      // Scores unscaled (alpha = 1 lets the GEMM read q in place); the softmax applies the scale.
      gemm::gemm_packed_b(uk, false, rows, keys, hs, q + static_cast<size_t>(r0) * C3, C3, kt, hs,
                          0, T(0), ab, T_);
      for (int t = r0; t < keys; ++t) {
        T* row = a + static_cast<size_t>(t) * T_;
        const int n = t + 1;
        const T mx = detail::row_max(row, n);
        const T sum = detail::exp_shift_store_sum(row, row, n, mx, scale);
        detail::scale_row(row, n, T(1) / sum);
        // The P @ V product below spans the whole diagonal block, and the backward reads these
        // zeros too: the masked entries must be exactly 0.
        std::fill(row + n, row + keys, T(0));
      }
      gemm::gemm_packed_b(uk, false, rows, hs, keys, ab, T_, vp, T_, 0, T(0),
                          o + static_cast<size_t>(r0) * C, C);
    }
  }
}

size_t attention_backward_scratch_floats(int B, int T, int C, int NH) {
  // One T x T dS buffer per thread (256 KB at T = 256: it stays in L2 across the pair).
  return static_cast<size_t>(omp_get_max_threads()) * static_cast<size_t>(T) * T;
}

template <typename T>
PIPENAG_DISPATCH void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* att, int B,
                                         int T_, int C, int NH, T* scratch, bool accumulate) {
  if (!dqkv) return;
  const int hs = C / NH;
  const int C3 = 3 * C;
  const T scale = T(1) / std::sqrt(static_cast<T>(hs));
  const size_t TT = static_cast<size_t>(T_) * T_;
  // Every row of dQ, dK and dV is written by exactly one product below: with beta = 0 they
  // overwrite instead of accumulating.
  const T beta = accumulate ? T(1) : T(0);
  const auto& uk = gemm::fp_kernels<T>();
  const size_t each = std::max(gemm::packed_b_size(uk, hs, T_), gemm::packed_b_size(uk, T_, hs));
#pragma omp parallel for schedule(static)
  for (int p = 0; p < B * NH; ++p) {
    const int b = p / NH, h = p % NH;
    T* ds = scratch + static_cast<size_t>(omp_get_thread_num()) * TT;
    const size_t qoff = static_cast<size_t>(b) * T_ * C3 + static_cast<size_t>(h) * hs;
    const T* q = qkv + qoff;
    const T* k = q + C;
    const T* v = q + 2 * C;
    T* dq = dqkv + qoff;
    T* dk = dq + C;
    T* dv = dq + 2 * C;
    const T* a = att + p * TT;
    const T* dO = dout + static_cast<size_t>(b) * T_ * C + static_cast<size_t>(h) * hs;
    T* vt = packed_operands<T>(each, 4);  // V^T: hs x T
    T* kp = vt + each;                    // K, Q, dO: T x hs
    T* qp = kp + each;
    T* dop = qp + each;
    gemm::pack_b_all(uk, vt, v, C3, true, hs, T_);
    gemm::pack_b_all(uk, kp, k, C3, false, T_, hs);
    gemm::pack_b_all(uk, qp, q, C3, false, T_, hs);
    gemm::pack_b_all(uk, dop, dO, C, false, T_, hs);

    // Row blocks: dP = dO V^T, then the softmax backward dS = scale * P * (dP - rowsum(P * dP))
    // in place (the scale folded in, so that the GEMMs below read dS in place), then dQ += dS K.
    for (int r0 = 0; r0 < T_; r0 += kBlock) {
      const int rows = std::min(kBlock, T_ - r0);
      const int keys = r0 + rows;
      T* dsb = ds + static_cast<size_t>(r0) * T_;
      gemm::gemm_packed_b(uk, false, rows, keys, hs, dO + static_cast<size_t>(r0) * C, C, vt, hs, 0,
                          T(0), dsb, T_);
      for (int t = r0; t < keys; ++t) {
        T* d = ds + static_cast<size_t>(t) * T_;
        const T* pr = a + static_cast<size_t>(t) * T_;
        const int n = t + 1;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int j = 0; j < n; ++j) dot += pr[j] * d[j];
#pragma omp simd
        for (int j = 0; j < n; ++j) d[j] = scale * (pr[j] * (d[j] - dot));
        std::fill(d + n, d + keys, T(0));
      }
      gemm::gemm_packed_b(uk, false, rows, hs, keys, dsb, T_, kp, T_, 0, beta,
                          dq + static_cast<size_t>(r0) * C3, C3);
    }
    // Key blocks: only rows at or below the block meet it. dK += dS^T Q, dV += P^T dO.
    for (int c0 = 0; c0 < T_; c0 += kBlock) {
      const int cols = std::min(kBlock, T_ - c0);
      const int nr = T_ - c0;
      const size_t diag = static_cast<size_t>(c0) * T_ + c0;
      gemm::gemm_packed_b(uk, true, cols, hs, nr, ds + diag, T_, qp, T_, c0, beta,
                          dk + static_cast<size_t>(c0) * C3, C3);
      gemm::gemm_packed_b(uk, true, cols, hs, nr, a + diag, T_, dop, T_, c0, beta,
                          dv + static_cast<size_t>(c0) * C3, C3);
    }
  }
}

#define PIPENAG_INSTANTIATE(T)                                                                  \
  template void attention_forward<T>(T*, T*, const T*, int, int, int, int);                   \
  template void attention_backward<T>(T*, const T*, const T*, const T*, int, int, int, int, T*, bool);
PIPENAG_INSTANTIATE(float)
PIPENAG_INSTANTIATE(double)
#undef PIPENAG_INSTANTIATE

}  // namespace pipenag::kernels
