#include "kernels/matmul_bf16.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <stdexcept>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "kernels/gemm_driver.h"
#include "kernels/kernels.h"

namespace pipenag::kernels {

namespace {

using dnnl::memory;
using dt = memory::data_type;

// Round to nearest even; NaN stays a (quiet) NaN. Branch-free, so that the loops below vectorise
// and every value rounds the same way wherever it sits in a row.
inline uint16_t to_bf16_scalar(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t nan = static_cast<uint32_t>((u >> 16) | 0x40u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// Below this many elements a conversion runs on the calling thread only.
constexpr long kParallelMin = 1 << 15;

// ---- conversions into words of bf16 pairs (the avx512bf16 backend's operands) -----------------
// A word holds two bf16 values of consecutive k, the first in the low half (vdpbf16ps pairs
// element 2j with 2j + 1 of a lane); a zero completes an odd count. src is a rows x cols fp32
// matrix with row stride ld.

// dst[r][p] = (src[r][2p], src[r][2p+1]): pairs along each row; dst is rows x (cols+1)/2 words.
// In memory that is each row rounded to bf16, padded to an even length.
void pairs_along_rows(uint32_t* dst, const float* src, long ld, int rows, int cols) {
  const int wp = (cols + 1) / 2;
#pragma omp parallel for schedule(static) if (static_cast<long>(rows) * cols > kParallelMin)
  for (int r = 0; r < rows; ++r) {
    const float* s = src + r * ld;
    uint16_t* d = reinterpret_cast<uint16_t*>(dst + static_cast<size_t>(r) * wp);
    for (int c = 0; c < cols; ++c) d[c] = to_bf16_scalar(s[c]);
    if (cols % 2) d[cols] = 0;
  }
}

// dst[p][c] = (src[2p][c], src[2p+1][c]): pairs down the columns; dst is (rows+1)/2 x cols.
void pairs_down_columns(uint32_t* dst, const float* src, long ld, int rows, int cols) {
  const int hp = (rows + 1) / 2;
#pragma omp parallel for schedule(static) if (static_cast<long>(rows) * cols > kParallelMin)
  for (int p = 0; p < hp; ++p) {
    const float* a = src + 2 * p * ld;
    uint32_t* d = dst + static_cast<size_t>(p) * cols;
    if (2 * p + 1 < rows) {
      const float* b = a + ld;
      for (int c = 0; c < cols; ++c)
        d[c] = static_cast<uint32_t>(to_bf16_scalar(a[c])) | static_cast<uint32_t>(to_bf16_scalar(b[c])) << 16;
    } else {
      for (int c = 0; c < cols; ++c) d[c] = to_bf16_scalar(a[c]);
    }
  }
}

// ---- oneDNN ------------------------------------------------------------------------------------

// True when oneDNN can run bf16 matmuls here (its ISA may be capped by ONEDNN_MAX_CPU_ISA).
bool onednn_bf16_available() {
  static const bool ok = [] {
    try {
      dnnl::engine eng(dnnl::engine::kind::cpu, 0);
      memory::desc a({2, 2}, dt::bf16, memory::format_tag::ab);
      memory::desc c({2, 2}, dt::f32, memory::format_tag::ab);
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, a, c), eng);
      return true;
    } catch (const dnnl::error&) {
      return false;
    }
  }();
  return ok;
}

bool onednn_on_amx() {
  return onednn_bf16_available() && dnnl::get_effective_cpu_isa() == dnnl::cpu_isa::avx512_core_amx;
}

bool cpu_has_avx512bf16() { return __builtin_cpu_supports("avx512bf16") != 0; }

// A matmul C[m,n] (+)= A[m,k] B[k,n] (+ bias[n]) with A, B bf16 of arbitrary strides.
struct Key {
  int64_t m, n, k, as0, as1, bs0, bs1;
  bool accumulate, bias;
  bool operator<(const Key& o) const {
    return std::tie(m, n, k, as0, as1, bs0, bs1, accumulate, bias) <
           std::tie(o.m, o.n, o.k, o.as0, o.as1, o.bs0, o.bs1, o.accumulate, o.bias);
  }
};

// Rows of C per oneDNN call: a fixed height, so that what each call computes does not depend on
// the thread count (the bands are spread over threads, each band one single-threaded call).
constexpr int kBand = 128;

}  // namespace

void to_bf16(uint16_t* dst, const float* src, size_t n) {
  constexpr size_t kChunk = 1 << 14;
  const long chunks = static_cast<long>((n + kChunk - 1) / kChunk);
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (long c = 0; c < chunks; ++c) {
    const size_t b = static_cast<size_t>(c) * kChunk, e = std::min(n, b + kChunk);
    for (size_t i = b; i < e; ++i) dst[i] = to_bf16_scalar(src[i]);
  }
}

struct Bf16Linear::Impl {
  std::string backend;
  std::vector<uint32_t> wa, wb;  // avx512bf16: the two operands as words of pairs
  std::vector<float> ra, rb;     // emulated: bf16-rounded copies
  std::vector<uint16_t> ha, hb;  // onednn: bf16 copies

  // onednn
  std::unique_ptr<dnnl::engine> eng;
  std::vector<std::unique_ptr<dnnl::stream>> streams;  // one per OpenMP thread
  std::map<Key, std::pair<dnnl::matmul, dnnl::matmul::primitive_desc>> prims;

  template <typename T>
  static T* sized(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }

  // C[m, n] (+)= op(A) op(B) for words of pairs (avx512bf16), kp pairs of k: op(A) is m x kp
  // (A stored kp x m when transposed), op(B) kp x n (B stored n x kp when transposed).
  static void words_gemm(int m, int n, int kp, bool trans_a, const uint32_t* A, bool trans_b,
                         const uint32_t* B, float* C, bool accumulate) {
    gemm::gemm_blocked<uint32_t, float>(gemm::kAvx512Bf16, trans_a, trans_b, m, n, kp, 1.0f, A,
                                        trans_a ? m : kp, B, trans_b ? kp : n,
                                        accumulate ? 1.0f : 0.0f, C, n);
  }

  // Rounds n values to bf16 and back (emulated backend).
  static void rounded(float* dst, const float* src, size_t n) {
#pragma omp parallel for schedule(static) if (static_cast<long>(n) > kParallelMin)
    for (size_t i = 0; i < n; ++i) {
      const uint32_t u = static_cast<uint32_t>(to_bf16_scalar(src[i])) << 16;
      std::memcpy(dst + i, &u, 4);
    }
  }

  // C[m x n] (+)= A B (+ bias) through oneDNN, in bands of kBand rows; A is m x k with strides
  // (as0, as1), B k x n with strides (bs0, bs1), C row-major with row stride n.
  void onednn_gemm(int64_t m, int64_t n, int64_t k, const uint16_t* A, int64_t as0, int64_t as1,
                   const uint16_t* B, int64_t bs0, int64_t bs1, float* C, const float* bias,
                   bool accumulate) {
    const int64_t bands = (m + kBand - 1) / kBand;
    // Primitives are compiled (for one thread) before the bands run in parallel.
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    auto prim_for = [&](int64_t rows) -> std::pair<dnnl::matmul, dnnl::matmul::primitive_desc>& {
      const Key key{rows, n, k, as0, as1, bs0, bs1, accumulate, bias != nullptr};
      auto it = prims.find(key);
      if (it != prims.end()) return it->second;
      memory::desc amd({rows, k}, dt::bf16, memory::dims{as0, as1});
      memory::desc bmd({k, n}, dt::bf16, memory::dims{bs0, bs1});
      memory::desc cmd({rows, n}, dt::f32, memory::dims{n, 1});
      dnnl::primitive_attr attr;
      if (accumulate) {
        dnnl::post_ops po;
        po.append_sum(1.0f);
        attr.set_post_ops(po);
      }
      dnnl::matmul::primitive_desc pd =
          bias ? dnnl::matmul::primitive_desc(
                     dnnl::matmul::desc(amd, bmd, memory::desc({1, n}, dt::f32, memory::dims{n, 1}), cmd),
                     attr, *eng)
               : dnnl::matmul::primitive_desc(dnnl::matmul::desc(amd, bmd, cmd), attr, *eng);
      return prims.emplace(key, std::make_pair(dnnl::matmul(pd), pd)).first->second;
    };
    auto& full = prim_for(std::min<int64_t>(kBand, m));
    auto& last = prim_for(m - (bands - 1) * kBand);
    omp_set_num_threads(saved);
    const int nt = std::max(1, std::min<int>(saved, static_cast<int>(bands)));
    while (static_cast<int>(streams.size()) < nt) streams.push_back(std::make_unique<dnnl::stream>(*eng));
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t b = 0; b < bands; ++b) {
      omp_set_num_threads(1);
      const auto& [prim, pd] = b + 1 < bands ? full : last;
      const int64_t r0 = b * kBand;
      dnnl::stream& s = *streams[static_cast<size_t>(omp_get_thread_num())];
      std::unordered_map<int, memory> args{
          {DNNL_ARG_SRC, memory(pd.src_desc(), *eng, const_cast<uint16_t*>(A + r0 * as0))},
          {DNNL_ARG_WEIGHTS, memory(pd.weights_desc(), *eng, const_cast<uint16_t*>(B))},
          {DNNL_ARG_DST, memory(pd.dst_desc(), *eng, C + r0 * n)}};
      if (bias) args.emplace(DNNL_ARG_BIAS, memory(pd.bias_desc(), *eng, const_cast<float*>(bias)));
      prim.execute(s, args);
      s.wait();
    }
  }
};

Bf16Linear::Bf16Linear(const std::string& backend) : impl_(std::make_unique<Impl>()) {
  std::string b = backend == "auto" ? bf16_backend() : backend;
  if (b == "avx512bf16") {
    if (!cpu_has_avx512bf16())
      throw std::invalid_argument("bf16 backend avx512bf16 needs a CPU with AVX512_BF16");
  } else if (b == "onednn") {
    if (!onednn_bf16_available())
      throw std::invalid_argument(
          "bf16 backend onednn: oneDNN cannot run bf16 matmuls on this CPU (or ONEDNN_MAX_CPU_ISA caps it)");
    impl_->eng = std::make_unique<dnnl::engine>(dnnl::engine::kind::cpu, 0);
  } else if (b != "emulated") {
    throw std::invalid_argument("unknown bf16 backend '" + b + "' (auto | avx512bf16 | onednn | emulated)");
  }
  impl_->backend = b;
}

Bf16Linear::~Bf16Linear() = default;

const std::string& Bf16Linear::backend() const { return impl_->backend; }

bool Bf16Linear::hardware_support() { return cpu_has_avx512bf16() || onednn_on_amx(); }

std::string Bf16Linear::bf16_backend(std::string* note) {
  std::string fallback = onednn_on_amx() ? "onednn" : cpu_has_avx512bf16() ? "avx512bf16" : "emulated";
  const char* env = std::getenv("PIPENAG_BF16");
  if (!env || std::string(env).empty() || std::string(env) == "auto") return fallback;
  const std::string want = env;
  const bool ok = want == "emulated" || (want == "avx512bf16" && cpu_has_avx512bf16()) ||
                  (want == "onednn" && onednn_bf16_available());
  if (ok) return want;
  if (note) {
    if (want == "avx512bf16" || want == "onednn")
      *note = "PIPENAG_BF16=" + want + " is not available on this CPU; bf16 products use " + fallback;
    else
      *note = "PIPENAG_BF16=" + want + " is not a bf16 backend (auto | avx512bf16 | onednn | emulated); using " + fallback;
  }
  return fallback;
}

void Bf16Linear::forward(float* out, const float* inp, const float* W, const float* bias, int M,
                         int K, int N) {
  Impl& s = *impl_;
  if (s.backend == "emulated") {
    float* x = Impl::sized(s.ra, static_cast<size_t>(M) * K);
    float* w = Impl::sized(s.rb, static_cast<size_t>(N) * K);
    Impl::rounded(x, inp, static_cast<size_t>(M) * K);
    Impl::rounded(w, W, static_cast<size_t>(N) * K);
    linear_forward<float>(out, x, w, bias, M, K, N);
    return;
  }
  if (s.backend == "onednn") {
    uint16_t* a = Impl::sized(s.ha, static_cast<size_t>(M) * K);
    uint16_t* w = Impl::sized(s.hb, static_cast<size_t>(N) * K);
    to_bf16(a, inp, static_cast<size_t>(M) * K);
    to_bf16(w, W, static_cast<size_t>(N) * K);
    // B = W^T: element (k, n) of the [K, N] view lives at n*K + k.
    s.onednn_gemm(M, N, K, a, K, 1, w, 1, K, out, bias, false);
    return;
  }
  // out = inp W^T: A = inp and B^T = W, both with pairs along their rows (k).
  const int kp = (K + 1) / 2;
  uint32_t* a = Impl::sized(s.wa, static_cast<size_t>(M) * kp);
  uint32_t* b = Impl::sized(s.wb, static_cast<size_t>(N) * kp);
  pairs_along_rows(a, inp, K, M, K);
  pairs_along_rows(b, W, K, N, K);
  if (bias)
    for (int i = 0; i < M; ++i) std::memcpy(out + static_cast<size_t>(i) * N, bias, sizeof(float) * N);
  Impl::words_gemm(M, N, kp, false, a, true, b, out, bias != nullptr);
}

void Bf16Linear::backward(float* dinp, float* dW, float* dbias, const float* dout,
                          const float* inp, const float* W, int M, int K, int N,
                          bool accumulate_dinp) {
  Impl& s = *impl_;
  if (dbias) linear_backward<float>(nullptr, nullptr, dbias, dout, nullptr, nullptr, M, K, N);
  if (!dinp && !dW) return;
  if (s.backend == "emulated") {
    float* d = Impl::sized(s.ra, static_cast<size_t>(M) * N);
    Impl::rounded(d, dout, static_cast<size_t>(M) * N);
    float* o = Impl::sized(s.rb, static_cast<size_t>(std::max(N, M)) * K);
    if (dinp) {
      Impl::rounded(o, W, static_cast<size_t>(N) * K);
      sgemm<float>(false, false, M, K, N, 1.0f, d, N, o, K, accumulate_dinp ? 1.0f : 0.0f, dinp, K);
    }
    if (dW) {
      Impl::rounded(o, inp, static_cast<size_t>(M) * K);
      sgemm<float>(true, false, N, K, M, 1.0f, d, N, o, K, 1.0f, dW, K);
    }
    return;
  }
  if (s.backend == "onednn") {
    uint16_t* d = Impl::sized(s.ha, static_cast<size_t>(M) * N);
    to_bf16(d, dout, static_cast<size_t>(M) * N);
    uint16_t* o = Impl::sized(s.hb, static_cast<size_t>(std::max(N, M)) * K);
    if (dinp) {
      if (!accumulate_dinp) std::memset(dinp, 0, sizeof(float) * static_cast<size_t>(M) * K);
      to_bf16(o, W, static_cast<size_t>(N) * K);
      // dinp[M,K] += dout[M,N] @ W[N,K]
      s.onednn_gemm(M, K, N, d, N, 1, o, K, 1, dinp, nullptr, true);
    }
    if (dW) {
      to_bf16(o, inp, static_cast<size_t>(M) * K);
      // dW[N,K] += dout^T[N,M] @ inp[M,K]; element (n, m) of dout^T lives at m*N + n.
      s.onednn_gemm(N, K, M, d, 1, N, o, K, 1, dW, nullptr, true);
    }
    return;
  }
  if (dinp) {
    // dinp[M,K] (+)= dout[M,N] @ W[N,K]: pairs along n, along the rows of dout and down W's.
    const int np = (N + 1) / 2;
    uint32_t* a = Impl::sized(s.wa, static_cast<size_t>(M) * np);
    uint32_t* b = Impl::sized(s.wb, static_cast<size_t>(np) * K);
    pairs_along_rows(a, dout, N, M, N);
    pairs_down_columns(b, W, K, N, K);
    Impl::words_gemm(M, K, np, false, a, false, b, dinp, accumulate_dinp);
  }
  if (dW) {
    // dW[N,K] += dout^T[N,M] @ inp[M,K]: pairs along m, down the columns of dout and of inp;
    // the first operand is then read transposed.
    const int mp = (M + 1) / 2;
    uint32_t* a = Impl::sized(s.wa, static_cast<size_t>(mp) * N);
    uint32_t* b = Impl::sized(s.wb, static_cast<size_t>(mp) * K);
    pairs_down_columns(a, dout, N, M, N);
    pairs_down_columns(b, inp, K, M, K);
    Impl::words_gemm(N, K, mp, true, a, false, b, dW, true);
  }
}

}  // namespace pipenag::kernels
