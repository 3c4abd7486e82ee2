#include "util/peak_flops.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

namespace pipenag {
namespace {

using Clock = std::chrono::steady_clock;

// Each kernel runs `iters` iterations of 16 independent multiply-adds (16 accumulators cover an
// FMA latency of 4 cycles x 2 ports with room to spare) and returns a value that depends on every
// accumulator, so nothing can be optimised away. The multiplier just below 1 keeps the values
// bounded and normal (they converge towards add / (1 - mul) = ~1).
#define PIPENAG_REP16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)

// (Not _mm512_reduce_add_ps: GCC 12 warns -Wuninitialized inside it at -O3.)
__attribute__((target("avx512f"))) float sum_lanes(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float r = 0;
  for (float x : lanes) r += x;
  return r;
}

__attribute__((target("avx512f"))) float fma_avx512(int64_t iters, float seed) {
  const __m512 mul = _mm512_set1_ps(0.9999999f);
  const __m512 add = _mm512_set1_ps(1e-7f);
#define PIPENAG_DECL(i) __m512 a##i = _mm512_set1_ps(seed + static_cast<float>(i) * 1e-3f);
  PIPENAG_REP16(PIPENAG_DECL)
#undef PIPENAG_DECL
  for (int64_t it = 0; it < iters; ++it) {
#define PIPENAG_STEP(i) a##i = _mm512_fmadd_ps(a##i, mul, add);
    PIPENAG_REP16(PIPENAG_STEP)
#undef PIPENAG_STEP
  }
  __m512 s = _mm512_setzero_ps();
#define PIPENAG_SUM(i) s = _mm512_add_ps(s, a##i);
  PIPENAG_REP16(PIPENAG_SUM)
#undef PIPENAG_SUM
  return sum_lanes(s);
}
constexpr double kFlopsPerIterAvx512 = 16.0 * 16 * 2;  // 16 FMAs x 16 lanes x 2 flops

__attribute__((target("avx2,fma"))) float fma_avx2(int64_t iters, float seed) {
  const __m256 mul = _mm256_set1_ps(0.9999999f);
  const __m256 add = _mm256_set1_ps(1e-7f);
#define PIPENAG_DECL(i) __m256 a##i = _mm256_set1_ps(seed + static_cast<float>(i) * 1e-3f);
  PIPENAG_REP16(PIPENAG_DECL)
#undef PIPENAG_DECL
  for (int64_t it = 0; it < iters; ++it) {
#define PIPENAG_STEP(i) a##i = _mm256_fmadd_ps(a##i, mul, add);
    PIPENAG_REP16(PIPENAG_STEP)
#undef PIPENAG_STEP
  }
  __m256 s = _mm256_setzero_ps();
#define PIPENAG_SUM(i) s = _mm256_add_ps(s, a##i);
  PIPENAG_REP16(PIPENAG_SUM)
#undef PIPENAG_SUM
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  float r = 0;
  for (float v : lanes) r += v;
  return r;
}
constexpr double kFlopsPerIterAvx2 = 16.0 * 8 * 2;

float fma_scalar(int64_t iters, float seed) {
  float a[16];
  for (int i = 0; i < 16; ++i) a[i] = seed + static_cast<float>(i) * 1e-3f;
  for (int64_t it = 0; it < iters; ++it)
    for (float& v : a) v = v * 0.9999999f + 1e-7f;
  float r = 0;
  for (float v : a) r += v;
  return r;
}
constexpr double kFlopsPerIterScalar = 16.0 * 2;

// acc += sum over pairs of a*b: each _mm512_dpbf16_ps does 16 lanes x 2 bf16 pairs = 32
// multiply-adds = 64 flops. The bf16 inputs are tiny (+-2^-20 products) so accumulators stay
// bounded; the subtracting half of the accumulators keeps their sum near the start.
__attribute__((target("avx512f,avx512bf16"))) float dpbf16_avx512(int64_t iters, float seed) {
  // bf16 bit patterns: 0x3580 = 2^-20 (approx 9.5e-7), 0xB580 = -2^-20.
  const __m512bh pos = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3580));
  const __m512bh neg = reinterpret_cast<__m512bh>(_mm512_set1_epi16(static_cast<short>(0xB580)));
  const __m512bh one = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3F80));
#define PIPENAG_DECL(i) __m512 a##i = _mm512_set1_ps(seed + static_cast<float>(i) * 1e-3f);
  PIPENAG_REP16(PIPENAG_DECL)
#undef PIPENAG_DECL
  for (int64_t it = 0; it < iters; ++it) {
#define PIPENAG_STEP(i) a##i = _mm512_dpbf16_ps(a##i, (i) % 2 ? pos : neg, one);
    PIPENAG_REP16(PIPENAG_STEP)
#undef PIPENAG_STEP
  }
  __m512 s = _mm512_setzero_ps();
#define PIPENAG_SUM(i) s = _mm512_add_ps(s, a##i);
  PIPENAG_REP16(PIPENAG_SUM)
#undef PIPENAG_SUM
  return sum_lanes(s);
}
constexpr double kFlopsPerIterBf16 = 16.0 * 32 * 2;

#undef PIPENAG_REP16

using Kernel = float (*)(int64_t, float);

// Runs `kernel` on `threads` threads, released together, each in chunks until `seconds` have
// passed; returns the sum of the per-thread rates in GFLOP/s.
double run_threads(Kernel kernel, double flops_per_iter, int threads, double seconds) {
  threads = std::max(threads, 1);
  constexpr int64_t kChunk = 4096;  // ~65k FMA instructions: a few tens of microseconds
  std::vector<double> rate(static_cast<size_t>(threads), 0.0);
  std::vector<float> sink(static_cast<size_t>(threads), 0.0f);
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  auto body = [&](int t) {
    ready.fetch_add(1);
    while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
    kernel(kChunk, 1.0f);  // warm-up (wakes the vector units up to full width)
    int64_t iters = 0;
    float acc = 0;
    const auto start = Clock::now();
    double elapsed = 0;
    do {
      acc += kernel(kChunk, 1.0f + static_cast<float>(t));
      iters += kChunk;
      elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    } while (elapsed < seconds);
    rate[static_cast<size_t>(t)] = static_cast<double>(iters) * flops_per_iter / elapsed * 1e-9;
    sink[static_cast<size_t>(t)] = acc;
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(body, t);
  while (ready.load() < threads) std::this_thread::yield();
  go.store(true, std::memory_order_release);
  for (auto& th : pool) th.join();
  // Consume the results so the kernels' work is observable.
  volatile float keep = 0;
  for (float v : sink) keep = keep + v;
  (void)keep;
  double total = 0;
  for (double r : rate) total += r;
  return total;
}

}  // namespace

const char* peak_flops_isa() {
  if (__builtin_cpu_supports("avx512f")) return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
  return "scalar";
}

double measure_peak_gflops(int threads, double seconds) {
  if (__builtin_cpu_supports("avx512f")) return run_threads(fma_avx512, kFlopsPerIterAvx512, threads, seconds);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return run_threads(fma_avx2, kFlopsPerIterAvx2, threads, seconds);
  return run_threads(fma_scalar, kFlopsPerIterScalar, threads, seconds);
}

double measure_peak_gflops_bf16(int threads, double seconds) {
  if (!__builtin_cpu_supports("avx512bf16")) return 0.0;
  return run_threads(dpbf16_avx512, kFlopsPerIterBf16, threads, seconds);
}

}  // namespace pipenag
