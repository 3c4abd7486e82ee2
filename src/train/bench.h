// `pipenag bench`: the speed of one full training step (forward, backward, clipping, AdamW) on
// random tokens, as tokens/s, achieved GFLOP/s and MFU against the peak FP32 FMA rate that the
// same run measures on this machine.
#pragma once
#include <string>
#include <vector>

#include "model/config.h"

namespace pipenag {

struct BenchOptions {
  ModelConfig model;          // vocab_size is replaced by each entry of `vocabs`
  std::vector<int> vocabs = {65, 50304};
  std::vector<std::string> dtypes = {"fp32"};
  int batch_size = 8;
  int steps = 10;             // measured steps
  int warmup = 3;             // unmeasured steps first
  int threads = 2;
  bool json = false;
  bool profile = false;       // time each kind of op (ms per step) as well
};

struct BenchResult {
  int vocab = 0;
  std::string dtype;
  double tokens_per_s = 0, tokens_per_s_median = 0, gflops = 0, mfu = 0, peak_gflops = 0;
  double flops_per_token = 0;
  size_t params = 0;
  std::string kernels;  // what ran the products: "fp32 GEMM avx512" / "bf16 avx512bf16"
  // With profile: seconds per step of each kind of work, in the order of `profile_names`.
  std::vector<std::string> profile_names;
  std::vector<double> profile_seconds;
};

std::vector<BenchResult> run_bench(const BenchOptions& opt);

}  // namespace pipenag
