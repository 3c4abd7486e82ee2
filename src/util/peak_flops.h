// Measured peak arithmetic rate of this CPU: register-only multiply-add loops (no memory traffic)
// run concurrently on `threads` std::threads for about `seconds`. Used to express kernel and step
// throughput as a fraction of what the cores can do.
#pragma once

namespace pipenag {

// FP32 FMA rate in GFLOP/s summed over all threads (an FMA lane counts 2 flops). Uses AVX-512
// (_mm512_fmadd_ps) when the CPU has it, else AVX2+FMA, else a plain scalar loop.
double measure_peak_gflops(int threads, double seconds = 0.3);

// BF16 dot-product rate (AVX512_BF16 _mm512_dpbf16_ps: each bf16 pair product + accumulate counts
// 2 flops, so one instruction is 64 flops) in GFLOP/s summed over all threads. Returns 0 when the
// CPU lacks AVX512_BF16.
double measure_peak_gflops_bf16(int threads, double seconds = 0.3);

// Which loop measure_peak_gflops uses on this CPU: "avx512", "avx2" or "scalar".
const char* peak_flops_isa();

}  // namespace pipenag
