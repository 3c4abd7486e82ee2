// Private to src/kernels: the blocked GEMM driver shared by the fp32/double products
// (matmul.cpp) and the bf16 ones (matmul_bf16.cpp), templated on the element type of A and B (E)
// and of C (C): float/float, double/double, and 32-bit words holding two bf16 values / float.
// The driver never splits K and keeps each element's chain in C between K blocks (gemm.h), so
// what it computes depends on the microkernel only, never on blocks or threads.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "kernels/gemm.h"

namespace pipenag::kernels::gemm {

// Largest MR x NR tile of any kernel (a partial tile is computed in a copy of this size).
constexpr int kMaxTile = 8 * 64;

// ---- packing -----------------------------------------------------------------------------------

// A 64-byte aligned buffer per thread that only grows: steady-state training allocates nothing.
class PackBuffer {
 public:
  ~PackBuffer() { std::free(p_); }
  template <typename T>
  T* get(size_t n) {
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    if (bytes > cap_) {
      std::free(p_);
      p_ = std::aligned_alloc(64, bytes);
      if (!p_) throw std::bad_alloc();
      cap_ = bytes;
    }
    return static_cast<T*>(p_);
  }

 private:
  void* p_ = nullptr;
  size_t cap_ = 0;
};
inline thread_local PackBuffer t_pack_a, t_pack_b;

// alpha * a, rounded; words of bf16 pairs only ever come with alpha = 1 and are copied.
template <typename E, typename C>
inline E scaled(C alpha, E a) {
  if constexpr (std::is_same_v<E, C>) return alpha == C(1) ? a : alpha * a;
  else return a;
}

// Packs op(A) rows [0, mc) x columns [0, kc) (alpha folded in) into micro-panels of MR rows:
// dst[(i / MR) * MR * kc + k * MR + i % MR] = alpha * op(A)[i][k], zero rows up to a multiple of
// MR.
template <typename T, typename C>
void pack_a_block(T* dst, const T* A, long lda, bool trans, int mc, int kc, int MR, C alpha) {
  const int mp = (mc + MR - 1) / MR * MR;
  if (trans) {  // op(A)[i][k] = A[k * lda + i]: read each k's mc values contiguously
    for (int k = 0; k < kc; ++k) {
      const T* s = A + k * lda;
      for (int i0 = 0; i0 < mp; i0 += MR) {
        T* d = dst + static_cast<size_t>(i0) * kc + static_cast<size_t>(k) * MR;
        const int rows = std::min(MR, mc - i0);
        for (int r = 0; r < rows; ++r) d[r] = scaled(alpha, s[i0 + r]);
        for (int r = rows; r < MR; ++r) d[r] = T(0);
      }
    }
    return;
  }
  for (int i0 = 0; i0 < mp; i0 += MR) {  // op(A)[i][k] = A[i * lda + k]
    T* d = dst + static_cast<size_t>(i0) * kc;
    const int rows = std::min(MR, mc - i0);
    for (int r = 0; r < rows; ++r) {
      const T* s = A + (i0 + r) * lda;
      for (int k = 0; k < kc; ++k) d[static_cast<size_t>(k) * MR + r] = scaled(alpha, s[k]);
    }
    for (int r = rows; r < MR; ++r)
      for (int k = 0; k < kc; ++k) d[static_cast<size_t>(k) * MR + r] = T(0);
  }
}

// Packs op(B) rows [0, kc) x columns [j0, j0 + w) into one micro-panel of width w:
// dst[k * w + j] = op(B)[k][j0 + j], zero for columns at or beyond nc.
template <typename T>
void pack_b_panel(T* dst, const T* B, long ldb, bool trans, int kc, int nc, int j0, int w) {
  const int cols = std::min(w, nc - j0);
  if (trans) {
    // op(B)[k][j] = B[j * ldb + k]: a transpose, done in runs of 16 k so that the reads are
    // contiguous and the writes stay within 16 lines of the panel.
    constexpr int kRun = 16;
    for (int k0 = 0; k0 < kc; k0 += kRun) {
      const int k1 = std::min(kc, k0 + kRun);
      for (int j = 0; j < cols; ++j) {
        const T* s = B + (j0 + j) * ldb;
        for (int k = k0; k < k1; ++k) dst[static_cast<size_t>(k) * w + j] = s[k];
      }
      for (int k = k0; k < k1; ++k)
        for (int j = cols; j < w; ++j) dst[static_cast<size_t>(k) * w + j] = T(0);
    }
    return;
  }
  for (int k = 0; k < kc; ++k) {  // op(B)[k][j] = B[k * ldb + j]: contiguous rows
    T* d = dst + static_cast<size_t>(k) * w;
    std::memcpy(d, B + k * ldb + j0, sizeof(T) * cols);
    for (int j = cols; j < w; ++j) d[j] = T(0);
  }
}

// One GEMM call's operands and the kernels that run it.
template <typename E, typename CT>
struct Problem {
  const Kernels<E, CT>& uk;
  bool trans_a, trans_b;
  int K;
  CT alpha;
  const E* A;
  long lda;
  const E* B;
  long ldb;
  CT* C;
  long ldc;
  bool first_loads;  // the chain starts from C (beta != 0) rather than from 0
};

// Computes rows [m0, m1) x columns [n0, n1) of C on the calling thread, in BLIS's loop order:
// column blocks (nc), K blocks (kc, B packed once per block into this thread's buffer), row
// blocks (mc), B micro-panels, A micro-panels. A is read in place when alpha = 1 (rows of a
// non-transposed A, columns of a transposed one: the microkernel takes both strides); otherwise,
// and for a last partial micro-panel, it is packed per block with alpha folded in. The right
// edge uses the narrowest kernel that covers it; a tile that is still partial runs on a
// full-size copy, so that the microkernel never touches memory outside C.
template <typename T, typename CT>
void gemm_region(const Problem<T, CT>& p, int m0, int m1, int n0, int n1) {
  const Kernels<T, CT>& uk = p.uk;
  const int MR = uk.mr, VEC = uk.vec, NR = uk.nv * uk.vec;
  const int MC = std::max(MR, uk.mc / MR * MR);
  const int NC = std::max(NR, uk.nc / NR * NR);
  const int KC = uk.kc;
  const bool direct_a = p.alpha == CT(1);
  const long rs_a = p.trans_a ? 1 : p.lda, cs_a = p.trans_a ? p.lda : 1;
  const int nc_max = std::min(NC, (n1 - n0 + NR - 1) / NR * NR);
  T* bp = t_pack_b.get<T>(static_cast<size_t>(std::min(KC, p.K)) * nc_max);
  T* ap = t_pack_a.get<T>(static_cast<size_t>(KC) * (MC + MR));
  alignas(64) CT tile[kMaxTile];
  for (int jc = n0; jc < n1; jc += NC) {
    const int nc = std::min(NC, n1 - jc);
    const int panels = (nc + NR - 1) / NR;
    for (int pc = 0; pc < p.K; pc += KC) {
      const int kc = std::min(KC, p.K - pc);
      const bool load_c = pc > 0 || p.first_loads;
      const T* bsrc = p.trans_b ? p.B + jc * p.ldb + pc : p.B + pc * p.ldb + jc;
      for (int q = 0; q < panels; ++q) {
        const int w = std::min(NR, (nc - q * NR + VEC - 1) / VEC * VEC);
        pack_b_panel(bp + static_cast<size_t>(q) * NR * kc, bsrc, p.ldb, p.trans_b, kc, nc,
                     q * NR, w);
      }
      for (int ic = m0; ic < m1; ic += MC) {
        const int mc = std::min(MC, m1 - ic);
        const int in_place_rows = direct_a ? mc / MR * MR : 0;
        if (in_place_rows < mc) {
          const int i0 = ic + in_place_rows;
          const T* asrc = p.trans_a ? p.A + pc * p.lda + i0 : p.A + i0 * p.lda + pc;
          pack_a_block(ap, asrc, p.lda, p.trans_a, mc - in_place_rows, kc, MR, p.alpha);
        }
        for (int q = 0; q < panels; ++q) {
          const int j = q * NR;
          const int nr = std::min(NR, nc - j);
          const int nv = (nr + VEC - 1) / VEC;
          const int w = nv * VEC;
          const T* b = bp + static_cast<size_t>(q) * NR * kc;
          for (int i = 0; i < mc; i += MR) {
            const int mr = std::min(MR, mc - i);
            const bool in_place = i < in_place_rows;
            const T* a = in_place ? p.A + (ic + i) * rs_a + pc * cs_a
                                  : ap + static_cast<size_t>(i - in_place_rows) * kc;
            const long rs = in_place ? rs_a : 1, cs = in_place ? cs_a : MR;
            CT* c = p.C + (ic + i) * p.ldc + jc + j;
            if (load_c) {
              // The chain resumes from C, last touched a whole K block ago: fetch the next
              // tile down while this one computes, so that the kernel does not start on misses.
              const CT* next = c + MR * p.ldc;
              for (int r = 0; r < MR; ++r)
                for (int x = 0; x < nr; x += 64 / static_cast<int>(sizeof(CT)))
                  __builtin_prefetch(next + r * p.ldc + x, 1, 3);
            }
            if (mr == MR && nr == w) {
              uk.run[nv - 1](kc, a, rs, cs, b, c, p.ldc, load_c);
              continue;
            }
            if (load_c)
              for (int r = 0; r < mr; ++r) std::memcpy(tile + r * w, c + r * p.ldc, sizeof(CT) * nr);
            uk.run[nv - 1](kc, a, rs, cs, b, tile, w, load_c);
            for (int r = 0; r < mr; ++r) std::memcpy(c + r * p.ldc, tile + r * w, sizeof(CT) * nr);
          }
        }
      }
    }
  }
}

// ---- B packed once, used many times (attention: the same keys and values for every row block) --

// Floats of a packed B of K rows and N columns: panels of NR columns, each K x NR.
template <typename E, typename CT>
size_t packed_b_size(const Kernels<E, CT>& uk, int K, int N) {
  const int NR = uk.nv * uk.vec;
  return static_cast<size_t>(K) * ((N + NR - 1) / NR) * NR;
}

// Packs all of op(B) [K x N] for gemm_packed_b: panel q at dst + q * K * NR, rows of width w
// (NR, or the edge width rounded up to whole vectors).
template <typename E, typename CT>
void pack_b_all(const Kernels<E, CT>& uk, E* dst, const E* B, long ldb, bool trans, int K, int N) {
  const int VEC = uk.vec, NR = uk.nv * uk.vec;
  for (int q = 0; q * NR < N; ++q) {
    const int w = std::min(NR, (N - q * NR + VEC - 1) / VEC * VEC);
    pack_b_panel(dst + static_cast<size_t>(q) * K * NR, B, ldb, trans, K, N, q * NR, w);
  }
}

// C[M x N] = op(A)[M x kc] * rows [k0, k0 + kc) of a B packed by pack_b_all with K rows, plus
// beta * C (beta 0 or 1), on the calling thread: every element the same chain as gemm_blocked
// computes (one K block of any length). A is read in place (rows of A, or its columns when
// transposed); a last partial micro-panel is packed.
template <typename E, typename CT>
void gemm_packed_b(const Kernels<E, CT>& uk, bool trans_a, int M, int N, int kc, const E* A,
                   long lda, const E* Bp, int K, int k0, CT beta, CT* C, long ldc) {
  if (M <= 0 || N <= 0) return;
  const int MR = uk.mr, VEC = uk.vec, NR = uk.nv * uk.vec;
  if (kc <= 0) {
    for (int i = 0; i < M; ++i)
      if (beta == CT(0)) std::fill(C + i * ldc, C + i * ldc + N, CT(0));
    return;
  }
  const bool load_c = beta != CT(0);
  const long rs_a = trans_a ? 1 : lda, cs_a = trans_a ? lda : 1;
  const int full = M / MR * MR;
  E* ap = nullptr;
  if (full < M) {
    ap = t_pack_a.get<E>(static_cast<size_t>(kc) * MR);
    pack_a_block(ap, trans_a ? A + full : A + full * lda, lda, trans_a, M - full, kc, MR, CT(1));
  }
  alignas(64) CT tile[kMaxTile];
  for (int q = 0; q * NR < N; ++q) {
    const int j = q * NR;
    const int nr = std::min(NR, N - j);
    const int nv = (nr + VEC - 1) / VEC, w = nv * VEC;
    const E* b = Bp + static_cast<size_t>(q) * K * NR + static_cast<size_t>(k0) * w;
    for (int i = 0; i < M; i += MR) {
      const int mr = std::min(MR, M - i);
      const E* a = i < full ? A + i * rs_a : ap;
      const long rs = i < full ? rs_a : 1, cs = i < full ? cs_a : MR;
      CT* c = C + i * ldc + j;
      if (mr == MR && nr == w) {
        uk.run[nv - 1](kc, a, rs, cs, b, c, ldc, load_c);
        continue;
      }
      if (load_c)
        for (int r = 0; r < mr; ++r) std::memcpy(tile + r * w, c + r * ldc, sizeof(CT) * nr);
      uk.run[nv - 1](kc, a, rs, cs, b, tile, w, load_c);
      for (int r = 0; r < mr; ++r) std::memcpy(c + r * ldc, tile + r * w, sizeof(CT) * nr);
    }
  }
}

// Below this many multiply-adds a GEMM runs on the calling thread only.
constexpr double kParallelMinFma = 1 << 20;

// C[M,N] = alpha op(A) op(B) + beta C with the given kernels (K counts the kernels' k steps).
template <typename E, typename CT>
void gemm_blocked(const Kernels<E, CT>& uk, bool trans_a, bool trans_b, int M, int N, int K,
                  CT alpha, const E* A, long lda, const E* B, long ldb, CT beta, CT* C, long ldc) {
  if (M <= 0 || N <= 0) return;
  // beta enters once, before the chain: C = beta * C, then the chain accumulates onto it. With
  // beta = 0 the chain starts at exactly 0 and C is never read (NaN or garbage in it cannot leak
  // through); only an empty K leaves zeros to write here.
  if (K <= 0 || (beta != CT(0) && beta != CT(1))) {
    for (int i = 0; i < M; ++i) {
      CT* c = C + i * ldc;
      if (beta == CT(0)) std::fill(c, c + N, CT(0));
      else for (int j = 0; j < N; ++j) c[j] *= beta;
    }
  }
  if (K <= 0) return;
  const Problem<E, CT> p{uk, trans_a, trans_b, K, alpha, A, lda, B, ldb, C, ldc, beta != CT(0)};
  const int MR = p.uk.mr, NR = p.uk.nv * p.uk.vec;
  const double fmas = static_cast<double>(M) * N * K;
  const int nt = omp_in_parallel() || fmas < kParallelMinFma ? 1 : omp_get_max_threads();
  if (nt == 1) {
    gemm_region(p, 0, M, 0, N);
    return;
  }
  // Each thread owns one band of C and computes it alone with its own packed B: no barriers, and
  // the split never touches K. Bands of columns are preferred, since a thread then packs only its
  // share of B (with bands of rows every thread packs all of B); rows are taken when the columns
  // do not split evenly enough.
  const int row_units = (M + MR - 1) / MR, col_units = (N + NR - 1) / NR;
  const int cols_per_thread = (col_units + nt - 1) / nt * NR;
  const bool by_rows = cols_per_thread * nt > N + N / 8 && row_units >= nt;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    const int units = by_rows ? row_units : col_units;
    const int u0 = static_cast<int>(static_cast<long>(units) * t / n);
    const int u1 = static_cast<int>(static_cast<long>(units) * (t + 1) / n);
    if (by_rows) gemm_region(p, std::min(M, u0 * MR), std::min(M, u1 * MR), 0, N);
    else gemm_region(p, 0, M, std::min(N, u0 * NR), std::min(N, u1 * NR));
  }
}

// The kernels the fp32 (float) and double products use now (matmul.cpp).
template <typename T>
const Kernels<T, T>& fp_kernels();

}  // namespace pipenag::kernels::gemm
