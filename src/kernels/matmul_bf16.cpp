#include "kernels/matmul_bf16.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <unordered_map>
#include <oneapi/dnnl/dnnl.hpp>
#include <tuple>
#include <vector>

#include "kernels/kernels.h"

namespace pipenag::kernels {

namespace {

using dnnl::memory;
using dt = memory::data_type;

uint16_t to_bf16_scalar(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

#if defined(__AVX512BF16__)
__attribute__((target("avx512bf16,avx512f")))
#endif
void convert_range(uint16_t* dst, const float* src, size_t b, size_t e) {
  size_t i = b;
#if defined(__AVX512BF16__)
  for (; i + 32 <= e; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(reinterpret_cast<void*>(dst + i), reinterpret_cast<__m512i>(v));
  }
#endif
  for (; i < e; ++i) dst[i] = to_bf16_scalar(src[i]);
}

// A matmul C[m,n] (+)= A[m,k] B[k,n] (+ bias[n]) with A, B bf16 of arbitrary strides.
struct Key {
  int64_t m, n, k, as0, as1, bs0, bs1;
  bool accumulate, bias;
  bool operator<(const Key& o) const {
    return std::tie(m, n, k, as0, as1, bs0, bs1, accumulate, bias) <
           std::tie(o.m, o.n, o.k, o.as0, o.as1, o.bs0, o.bs1, o.accumulate, o.bias);
  }
};

}  // namespace

void to_bf16(uint16_t* dst, const float* src, size_t n) {
  constexpr size_t kChunk = 1 << 14;
  const long chunks = static_cast<long>((n + kChunk - 1) / kChunk);
#pragma omp parallel for schedule(static)
  for (long c = 0; c < chunks; ++c) {
    const size_t b = static_cast<size_t>(c) * kChunk;
    convert_range(dst, src, b, std::min(n, b + kChunk));
  }
}

struct Bf16Linear::Impl {
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{eng};
  std::map<Key, std::pair<dnnl::matmul, dnnl::matmul::primitive_desc>> prims;
  std::vector<uint16_t> a, w, d;  // bf16 copies: activations, weights, output gradients

  static uint16_t* sized(std::vector<uint16_t>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }

  void run(const Key& key, const void* A, const void* B, float* C, const float* bias) {
    auto it = prims.find(key);
    if (it == prims.end()) {
      memory::desc amd({key.m, key.k}, dt::bf16, memory::dims{key.as0, key.as1});
      memory::desc bmd({key.k, key.n}, dt::bf16, memory::dims{key.bs0, key.bs1});
      memory::desc cmd({key.m, key.n}, dt::f32, memory::dims{key.n, 1});
      dnnl::primitive_attr attr;
      if (key.accumulate) {
        dnnl::post_ops po;
        po.append_sum(1.0f);
        attr.set_post_ops(po);
      }
      dnnl::matmul::primitive_desc pd =
          key.bias ? dnnl::matmul::primitive_desc(
                         dnnl::matmul::desc(amd, bmd, memory::desc({1, key.n}, dt::f32, memory::dims{key.n, 1}), cmd),
                         attr, eng)
                   : dnnl::matmul::primitive_desc(dnnl::matmul::desc(amd, bmd, cmd), attr, eng);
      it = prims.emplace(key, std::make_pair(dnnl::matmul(pd), pd)).first;
    }
    const auto& pd = it->second.second;
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, memory(pd.src_desc(), eng, const_cast<void*>(A))},
        {DNNL_ARG_WEIGHTS, memory(pd.weights_desc(), eng, const_cast<void*>(B))},
        {DNNL_ARG_DST, memory(pd.dst_desc(), eng, C)}};
    if (key.bias) args.emplace(DNNL_ARG_BIAS, memory(pd.bias_desc(), eng, const_cast<float*>(bias)));
    it->second.first.execute(stream, args);
    stream.wait();
  }
};

Bf16Linear::Bf16Linear() : impl_(std::make_unique<Impl>()) {}
Bf16Linear::~Bf16Linear() = default;

bool Bf16Linear::hardware_support() {
  return __builtin_cpu_supports("avx512bf16") != 0;
}

void Bf16Linear::forward(float* out, const float* inp, const float* W, const float* bias, int M,
                         int K, int N) {
  Impl& s = *impl_;
  uint16_t* a = Impl::sized(s.a, static_cast<size_t>(M) * K);
  uint16_t* w = Impl::sized(s.w, static_cast<size_t>(N) * K);
  to_bf16(a, inp, static_cast<size_t>(M) * K);
  to_bf16(w, W, static_cast<size_t>(N) * K);
  // B = W^T: element (k, n) of the [K, N] view lives at n*K + k.
  s.run(Key{M, N, K, K, 1, 1, K, false, bias != nullptr}, a, w, out, bias);
}

void Bf16Linear::backward(float* dinp, float* dW, float* dbias, const float* dout,
                          const float* inp, const float* W, int M, int K, int N) {
  Impl& s = *impl_;
  if (dbias) linear_backward<float>(nullptr, nullptr, dbias, dout, nullptr, nullptr, M, K, N);
  if (!dinp && !dW) return;
  uint16_t* d = Impl::sized(s.d, static_cast<size_t>(M) * N);
  to_bf16(d, dout, static_cast<size_t>(M) * N);
  if (dinp) {
    uint16_t* w = Impl::sized(s.w, static_cast<size_t>(N) * K);
    to_bf16(w, W, static_cast<size_t>(N) * K);
    // dinp[M,K] += dout[M,N] @ W[N,K]
    s.run(Key{M, K, N, N, 1, K, 1, true, false}, d, w, dinp, nullptr);
  }
  if (dW) {
    uint16_t* a = Impl::sized(s.a, static_cast<size_t>(M) * K);
    to_bf16(a, inp, static_cast<size_t>(M) * K);
    // dW[N,K] += dout^T[N,M] @ inp[M,K]; element (n, m) of dout^T lives at m*N + n.
    s.run(Key{N, K, M, 1, N, K, 1, true, false}, d, a, dW, nullptr);
  }
}

}  // namespace pipenag::kernels
