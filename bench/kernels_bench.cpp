// Times every kernel at the target workload (6 layers, d 384, 6 heads, T 256, B 8, fp32) and
// adds them up into one training step's kernel time. Not built by CMake; after building
// pipenag_core (e.g. in build-kernels), on one line:
//
//   g++ -std=c++20 -O3 -march=native -fopenmp -Isrc -I/usr/include/x86_64-linux-gnu/openblas-pthread
//     bench/kernels_bench.cpp build-kernels/libpipenag_core.a
//     -L/usr/lib/x86_64-linux-gnu/openblas-openmp -Wl,-rpath,/usr/lib/x86_64-linux-gnu/openblas-openmp
//     -l:libopenblas.so.0 -o /tmp/kernels_bench
//   OMP_NUM_THREADS=2 /tmp/kernels_bench [vocab ...]     (default: 65 50304)
//
// Each kernel runs `reps` times after a warm-up; the minimum is reported (the least disturbed
// run on a shared machine), with the median beside it.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace k = pipenag::kernels;

namespace {

struct Timing {
  double min_ms, median_ms;
};

Timing time_it(const std::function<void()>& f, int reps) {
  f();  // warm-up: page faults, OpenBLAS buffers
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                     .count());
  }
  std::sort(ms.begin(), ms.end());
  return {ms.front(), ms[ms.size() / 2]};
}

std::vector<float> randv(size_t n, float scale = 1.0f) {
  static std::mt19937 g(42);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

double step_ms = 0;  // accumulated per-step kernel time (min)

void report(const std::string& name, Timing t, int per_step, double gflop = 0) {
  step_ms += t.min_ms * per_step;
  if (gflop > 0)
    std::printf("%-34s %9.3f %9.3f ms %8.1f GFLOP/s   x%d\n", name.c_str(), t.min_ms, t.median_ms,
                gflop / t.min_ms * 1e3, per_step);
  else
    std::printf("%-34s %9.3f %9.3f ms %17s x%d\n", name.c_str(), t.min_ms, t.median_ms, "",
                per_step);
}

void bench_linear(const char* what, int M, int K, int N, bool bias, int per_step, int reps) {
  auto inp = randv(static_cast<size_t>(M) * K), W = randv(static_cast<size_t>(N) * K, 0.02f);
  auto b = randv(N), dout = randv(static_cast<size_t>(M) * N);
  std::vector<float> out(static_cast<size_t>(M) * N), dinp(inp.size()), dW(W.size()), db(N);
  const double gf = 2.0 * M * K * N / 1e9;
  const std::string tag = std::string(what) + " " + std::to_string(K) + "->" + std::to_string(N);
  report("linear fwd " + tag,
         time_it([&] { k::linear_forward(out.data(), inp.data(), W.data(), bias ? b.data() : nullptr, M, K, N); }, reps),
         per_step, gf);
  report("linear bwd " + tag,
         time_it([&] {
           k::linear_backward(dinp.data(), dW.data(), bias ? db.data() : nullptr, dout.data(),
                              inp.data(), W.data(), M, K, N);
         }, reps),
         per_step, 2 * gf);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> vocabs;
  for (int i = 1; i < argc; ++i) vocabs.push_back(std::atoi(argv[i]));
  if (vocabs.empty()) vocabs = {65, 50304};
  const int L = 6, B = 8, T = 256, C = 384, NH = 6, M = B * T, reps = 7;
  std::printf("threads %d; B %d T %d C %d NH %d layers %d\n", omp_get_max_threads(), B, T, C, NH, L);
  std::printf("%-34s %9s %9s\n", "kernel", "min", "median");

  for (const int V : vocabs) {
    step_ms = 0;
    std::printf("---- vocab %d ----\n", V);
    bench_linear("qkv", M, C, 3 * C, true, L, reps);
    bench_linear("proj", M, C, C, true, L, reps);
    bench_linear("fc", M, C, 4 * C, true, L, reps);
    bench_linear("fc2", M, 4 * C, C, true, L, reps);
    bench_linear("lm_head", M, C, V, false, 1, V > 10000 ? 3 : reps);

    {
      auto qkv = randv(static_cast<size_t>(M) * 3 * C), dout = randv(static_cast<size_t>(M) * C);
      std::vector<float> out(dout.size()), att(static_cast<size_t>(B) * NH * T * T);
      std::vector<float> dqkv(qkv.size()), scratch(k::attention_backward_scratch_floats(B, T, C, NH));
      // Useful (causal) flops: QK^T and PV over the T(T+1)/2 visible pairs, 2 flops per MAC.
      const double pairs = B * NH * (T * (T + 1.0) / 2.0);
      const double gf_fwd = 2.0 * 2.0 * pairs * (C / NH) / 1e9;
      report("attention fwd",
             time_it([&] { k::attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH); }, reps),
             L, gf_fwd);
      report("attention bwd",
             time_it([&] {
               k::attention_backward(dqkv.data(), dout.data(), qkv.data(), att.data(), B, T, C, NH,
                                     scratch.data());
             }, reps),
             L, 2 * gf_fwd);
    }
    {
      auto x = randv(static_cast<size_t>(M) * C), w = randv(C), b = randv(C), dy = randv(x.size());
      std::vector<float> y(x.size()), mean(M), rstd(M), dx(x.size()), dw(C), db(C);
      report("layernorm fwd", time_it([&] {
               k::layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), M, C);
             }, reps), 2 * L + 1);
      report("layernorm bwd", time_it([&] {
               k::layernorm_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(),
                                     mean.data(), rstd.data(), M, C);
             }, reps), 2 * L + 1);
      std::vector<float> r(x.size());
      report("residual add", time_it([&] { k::add(r.data(), x.data(), y.data(), x.size()); }, reps), 2 * L);
    }
    {
      const size_t n = static_cast<size_t>(M) * 4 * C;
      auto x = randv(n), dy = randv(n);
      std::vector<float> y(n), dx(n);
      report("relu fwd (not in step)", time_it([&] { k::relu_forward(y.data(), x.data(), n); }, reps), 0);
      report("relu bwd (not in step)", time_it([&] { k::relu_backward(dx.data(), dy.data(), x.data(), n); }, reps), 0);
      report("gelu fwd", time_it([&] { k::gelu_forward(y.data(), x.data(), n); }, reps), L);
      report("gelu bwd", time_it([&] { k::gelu_backward(dx.data(), dy.data(), x.data(), n); }, reps), L);
    }
    {
      std::vector<int32_t> tokens(M);
      std::mt19937 g(7);
      std::uniform_int_distribution<int32_t> tok(0, V - 1);
      for (auto& t : tokens) t = tok(g);
      auto wte = randv(static_cast<size_t>(V) * C), wpe = randv(static_cast<size_t>(T) * C);
      auto dy = randv(static_cast<size_t>(M) * C);
      std::vector<float> y(dy.size()), dwte(wte.size()), dwpe(wpe.size());
      report("embedding fwd", time_it([&] {
               k::embedding_forward(y.data(), tokens.data(), wte.data(), wpe.data(), B, T, C);
             }, reps), 1);
      report("embedding bwd", time_it([&] {
               k::embedding_backward(dwte.data(), dwpe.data(), dy.data(), tokens.data(), B, T, C);
             }, reps), 1);

      auto logits = randv(static_cast<size_t>(M) * V, 2.0f);
      std::vector<float> work(logits.size()), losses(M);
      report("softmax_xent fwd+bwd", time_it([&] {
               std::copy(logits.begin(), logits.end(), work.begin());
               k::softmax_xent_forward_backward(work.data(), losses.data(), tokens.data(), M, V, 1.0f / M);
             }, V > 10000 ? 3 : reps), 1);
      report("  (copy of logits, subtracted)", time_it([&] {
               std::copy(logits.begin(), logits.end(), work.begin());
             }, V > 10000 ? 3 : reps), -1);
    }
    std::printf("kernel time per training step (sum of mins): %.1f ms\n", step_ms);
  }
}
