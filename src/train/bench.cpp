#include "train/bench.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "kernels/kernels.h"
#include "optim/adamw.h"
#include "optim/grad_clip.h"
#include "pipeline/stage.h"
#include "util/error.h"
#include "util/peak_flops.h"

namespace pipenag {

std::vector<BenchResult> run_bench(const BenchOptions& opt) {
  if (opt.steps < 1 || opt.warmup < 0 || opt.threads < 1 || opt.batch_size < 1)
    throw Error("bench: --steps, --threads and --batch-size must be >= 1, --warmup >= 0");
  omp_set_num_threads(opt.threads);
  const double peak = measure_peak_gflops(opt.threads, 0.5);
  std::vector<BenchResult> out;
  for (const std::string& dtype : opt.dtypes) {
    if (dtype != "fp32" && dtype != "bf16") throw Error("bench: unknown dtype '" + dtype + "' (fp32 | bf16)");
    for (int vocab : opt.vocabs) {
      if (vocab < 1) throw Error("bench: vocabulary sizes must be >= 1");
      ModelConfig m = opt.model;
      m.vocab_size = vocab;
      const int B = opt.batch_size, T = m.block_size;
      Stage stage(m, 0, m.n_layer + 2, B, 1);
      stage.set_bf16(dtype == "bf16");
      stage.init_params(m.seed);
      AdamW adamw(stage.num_params(), AdamWHyper{});
      std::mt19937 rng(1234);
      std::uniform_int_distribution<int32_t> tok(0, vocab - 1);
      std::vector<int32_t> x(static_cast<size_t>(B) * T), y(x.size());
      for (auto& t : x) t = tok(rng);
      for (auto& t : y) t = tok(rng);
      const float scale = 1.0f / static_cast<float>(x.size());
      std::vector<double> secs;
      OpTimes ops;
      double zeroing = 0, optimizer = 0;
      using Clock = std::chrono::steady_clock;
      const auto since = [](Clock::time_point t) {
        return std::chrono::duration<double>(Clock::now() - t).count();
      };
      for (int s = 0; s < opt.warmup + opt.steps; ++s) {
        const bool measured = s >= opt.warmup;
        const auto t0 = Clock::now();
        stage.zero_grads();
        const double t_zero = since(t0);
        UnitContext ctx;
        ctx.grad_scale = scale;
        if (opt.profile && measured) ctx.profile = &ops;
        const MicroBatch mb{x.data(), y.data()};
        stage.forward(0, nullptr, mb, ctx);
        stage.backward(0, nullptr, mb, ctx);
        const auto t_opt = Clock::now();
        const double norm = std::sqrt(sum_squares(stage.grads(), stage.num_params()));
        adamw.step(stage.params(), stage.grads(), 3e-4, clip_scale(norm, 1.0));
        const double dt = since(t0);
        if (measured) {
          secs.push_back(dt);
          zeroing += t_zero;
          optimizer += since(t_opt);
        }
      }
      BenchResult r;
      r.vocab = vocab;
      r.dtype = dtype;
      r.params = stage.num_params();
      double total = 0;
      for (double s : secs) total += s;
      r.tokens_per_s = static_cast<double>(x.size()) * static_cast<double>(secs.size()) / total;
      std::sort(secs.begin(), secs.end());
      r.tokens_per_s_median = static_cast<double>(x.size()) / secs[secs.size() / 2];
      r.flops_per_token = train_flops_per_token(m);
      r.gflops = r.tokens_per_s * r.flops_per_token / 1e9;
      r.peak_gflops = peak;
      r.mfu = r.gflops / peak;
      r.kernels = stage.bf16() ? "bf16 " + stage.bf16_backend() : std::string("fp32 GEMM ") + kernels::gemm_isa();
      if (opt.profile) {
        const double n = static_cast<double>(secs.size());
        double timed = 0;
        for (size_t i = 0; i < ops.seconds.size(); ++i) {
          r.profile_names.push_back(work_name(static_cast<Work>(i)));
          r.profile_seconds.push_back(ops.seconds[i] / n);
          timed += ops.seconds[i] / n;
        }
        r.profile_names.push_back("gradient zeroing");
        r.profile_seconds.push_back(zeroing / n);
        r.profile_names.push_back("clipping + AdamW");
        r.profile_seconds.push_back(optimizer / n);
        r.profile_names.push_back("rest (untimed glue)");
        r.profile_seconds.push_back(std::max(0.0, total / n - timed - (zeroing + optimizer) / n));
      }
      out.push_back(r);
      if (opt.json) {
        nlohmann::json j{{"vocab", vocab}, {"dtype", dtype}, {"tokens_per_s", r.tokens_per_s},
                         {"tokens_per_s_median", r.tokens_per_s_median}, {"gflops", r.gflops},
                         {"mfu", r.mfu}, {"peak_gflops", peak}, {"threads", opt.threads},
                         {"steps", opt.steps}, {"params", r.params}, {"kernels", r.kernels}};
        if (opt.profile) {
          nlohmann::json prof = nlohmann::json::object();
          for (size_t i = 0; i < r.profile_names.size(); ++i) prof[r.profile_names[i]] = r.profile_seconds[i];
          j["profile_s_per_step"] = prof;
        }
        std::printf("%s\n", j.dump().c_str());
        std::fflush(stdout);
      }
    }
  }
  return out;
}

}  // namespace pipenag
