// Sanity checks for the peak-FLOP/s probe. Rates on a shared, noisy machine vary a lot, so the
// bounds are wide: a per-thread rate outside [5, 1000] GFLOP/s means the loop is broken (optimised
// away, or not running), not that the machine is slow.
#include "util/peak_flops.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

TEST(PeakFlops, IsaIsKnown) {
  const char* isa = pipenag::peak_flops_isa();
  EXPECT_TRUE(std::strcmp(isa, "avx512") == 0 || std::strcmp(isa, "avx2") == 0 ||
              std::strcmp(isa, "scalar") == 0)
      << isa;
}

TEST(PeakFlops, Fp32RatePerThreadIsPlausibleAndWithinBudget) {
  const double budget = 0.2;
  for (int threads : {1, 2}) {
    const auto t0 = Clock::now();
    const double gflops = pipenag::measure_peak_gflops(threads, budget);
    const double took = seconds_since(t0);
    EXPECT_GT(gflops, 0.0);
    EXPECT_GE(gflops / threads, 5.0) << threads << " thread(s): " << gflops << " GFLOP/s";
    EXPECT_LE(gflops / threads, 1000.0) << threads << " thread(s): " << gflops << " GFLOP/s";
    EXPECT_LT(took, 2.0 * budget + 0.1) << threads << " thread(s) took " << took << " s";
  }
}

TEST(PeakFlops, Bf16RateIsPlausibleOrZeroWithoutSupport) {
  const double budget = 0.2;
  const auto t0 = Clock::now();
  const double gflops = pipenag::measure_peak_gflops_bf16(1, budget);
  const double took = seconds_since(t0);
  if (!__builtin_cpu_supports("avx512bf16")) {
    EXPECT_EQ(gflops, 0.0);
    return;
  }
  EXPECT_GE(gflops, 5.0);
  EXPECT_LE(gflops, 4000.0);  // 64 flops per instruction: up to ~4x the fp32 bound
  EXPECT_LT(took, 2.0 * budget + 0.1);
}

}  // namespace
