// Kernel tests. Gradients are checked against central finite differences in double precision
// (loss = sum(out * random weights), so dout is those weights); forwards against naive loops;
// float against double; and float results with 1 vs 2 OpenMP threads for bit-identity.
//
// Gradient buffers start from random values, not zeros, so every gradient check also checks the
// accumulate (+=) convention.
#include <gtest/gtest.h>
#include <cstdlib>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/vec_math.h"

namespace k = pipenag::kernels;

namespace {

using Vec = std::vector<double>;
using Rng = std::mt19937;

Vec randn(size_t n, Rng& g, double scale = 1.0) {
  std::normal_distribution<double> d(0.0, scale);
  Vec v(n);
  for (auto& x : v) x = d(g);
  return v;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

Vec minus(const Vec& a, const Vec& b) {
  Vec r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] - b[i];
  return r;
}

template <class T>
std::vector<T> to(const Vec& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <class T>
Vec wide(const std::vector<T>& v) {
  return Vec(v.begin(), v.end());
}

// Compares grad with central differences of loss() over every entry of x (x is restored).
// Every coordinate, or every `stride`-th (large inputs in the sanitizer build, for CI time).
void expect_grad_matches_fd(const std::string& what, Vec& x, const Vec& grad,
                            const std::function<double()>& loss, double tol = 1e-6, size_t stride = 1) {
  ASSERT_EQ(x.size(), grad.size()) << what;
  constexpr double h = 1e-6;
  int bad = 0;
  double max_abs_grad = 0;
  for (size_t i = 0; i < x.size(); i += stride) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double lp = loss();
    x[i] = x0 - h;
    const double lm = loss();
    x[i] = x0;
    const double fd = (lp - lm) / (2 * h);
    max_abs_grad = std::max(max_abs_grad, std::abs(grad[i]));
    if (!(std::abs(fd - grad[i]) <= tol * std::max(1.0, std::abs(fd)))) {
      if (bad < 5) ADD_FAILURE() << what << "[" << i << "]: analytic " << grad[i] << " vs fd " << fd;
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << x.size() << " entries off";
  // A gradient of all zeros would be a vacuous pass wherever the loss is flat by accident.
  EXPECT_GT(max_abs_grad, 1e-3) << what;
}

void expect_vec_near(const std::string& what, const Vec& got, const Vec& want, double tol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(std::abs(got[i] - want[i]) <= tol * std::max(1.0, std::abs(want[i])))) {
      if (bad < 5) ADD_FAILURE() << what << "[" << i << "]: " << got[i] << " vs " << want[i];
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

// Named outputs of one run of an op (forward and backward), widened to double.
using Results = std::vector<std::pair<std::string, Vec>>;

// Float vs double: each output's max error relative to the output's scale.
void expect_results_close(const Results& f, const Results& d, double tol) {
  ASSERT_EQ(f.size(), d.size());
  for (size_t r = 0; r < f.size(); ++r) {
    ASSERT_EQ(f[r].second.size(), d[r].second.size()) << f[r].first;
    double scale = 1, err = 0;
    for (size_t i = 0; i < d[r].second.size(); ++i) {
      scale = std::max(scale, std::abs(d[r].second[i]));
      err = std::max(err, std::abs(f[r].second[i] - d[r].second[i]));
    }
    EXPECT_LE(err, tol * scale) << f[r].first << ": max error " << err << " at scale " << scale;
  }
}

void expect_results_identical(const Results& a, const Results& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t r = 0; r < a.size(); ++r) {
    ASSERT_EQ(a[r].second.size(), b[r].second.size()) << a[r].first;
    size_t diff = 0, first = 0;
    for (size_t i = 0; i < a[r].second.size(); ++i) {
      // Bitwise: NaN == NaN and +0 != -0 here, as a determinism check should have it.
      if (std::memcmp(&a[r].second[i], &b[r].second[i], sizeof(double)) != 0) {
        if (diff++ == 0) first = i;
      }
    }
    EXPECT_EQ(diff, 0u) << a[r].first << ": first difference at " << first << ": "
                        << a[r].second[first] << " vs " << b[r].second[first];
  }
}

// Runs `run` with 1 and then 2 OpenMP threads (OpenBLAS's OpenMP build follows the same setting)
// and requires bit-identical results.
void expect_thread_invariant(const std::function<Results()>& run) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const Results one = run();
  omp_set_num_threads(2);
  const Results two = run();
  omp_set_num_threads(saved);
  expect_results_identical(one, two);
}

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- naive references (double) ----------------------------------------------------------------

Vec ref_linear(const Vec& inp, const Vec& W, const Vec* bias, int M, int K, int N) {
  Vec out(static_cast<size_t>(M) * N);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double s = bias ? (*bias)[j] : 0.0;
      for (int c = 0; c < K; ++c) s += inp[i * K + c] * W[j * K + c];
      out[i * N + j] = s;
    }
  return out;
}

Vec ref_layernorm(const Vec& inp, const Vec& w, const Vec& b, int M, int C, Vec* mean, Vec* rstd) {
  Vec out(inp.size());
  for (int i = 0; i < M; ++i) {
    double m = 0, v = 0;
    for (int c = 0; c < C; ++c) m += inp[i * C + c];
    m /= C;
    for (int c = 0; c < C; ++c) v += (inp[i * C + c] - m) * (inp[i * C + c] - m);
    v /= C;
    const double rs = 1.0 / std::sqrt(v + 1e-5);
    for (int c = 0; c < C; ++c) out[i * C + c] = (inp[i * C + c] - m) * rs * w[c] + b[c];
    (*mean)[i] = m;
    (*rstd)[i] = rs;
  }
  return out;
}

// Returns out [B,T,C]; fills att [B,NH,T,T] on and below the diagonal.
Vec ref_attention(const Vec& qkv, int B, int T, int C, int NH, Vec* att) {
  const int hs = C / NH;
  Vec out(static_cast<size_t>(B) * T * C);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h)
      for (int t = 0; t < T; ++t) {
        const double* q = &qkv[(static_cast<size_t>(b) * T + t) * 3 * C + h * hs];
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (int j = 0; j <= t; ++j) {
          const double* kk = &qkv[(static_cast<size_t>(b) * T + j) * 3 * C + C + h * hs];
          double d = 0;
          for (int c = 0; c < hs; ++c) d += q[c] * kk[c];
          s[j] = d / std::sqrt(static_cast<double>(hs));
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (int j = 0; j <= t; ++j) z += (s[j] = std::exp(s[j] - mx));
        for (int c = 0; c < hs; ++c) {
          double o = 0;
          for (int j = 0; j <= t; ++j)
            o += s[j] / z * qkv[(static_cast<size_t>(b) * T + j) * 3 * C + 2 * C + h * hs + c];
          out[(static_cast<size_t>(b) * T + t) * C + h * hs + c] = o;
        }
        for (int j = 0; j <= t; ++j)
          (*att)[((static_cast<size_t>(b) * NH + h) * T + t) * T + j] = s[j] / z;
      }
  return out;
}

double ref_xent_row(const double* row, int V, int target) {
  double mx = -1e300, z = 0;
  for (int v = 0; v < V; ++v) mx = std::max(mx, row[v]);
  for (int v = 0; v < V; ++v) z += std::exp(row[v] - mx);
  return std::log(z) + mx - row[target];
}

double gelu_ref(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }

// ---- one run of each op, generic in T, for float/double and thread comparisons -----------------

template <class T>
Results run_linear(int M, int K, int N, uint32_t seed) {
  Rng g(seed);
  const auto inp = to<T>(randn(static_cast<size_t>(M) * K, g));
  const auto W = to<T>(randn(static_cast<size_t>(N) * K, g, 0.05));
  const auto bias = to<T>(randn(N, g));
  const auto dout = to<T>(randn(static_cast<size_t>(M) * N, g));
  std::vector<T> out(static_cast<size_t>(M) * N), dinp(inp.size()), dW(W.size()), db(N);
  k::linear_forward(out.data(), inp.data(), W.data(), bias.data(), M, K, N);
  k::linear_backward(dinp.data(), dW.data(), db.data(), dout.data(), inp.data(), W.data(), M, K, N);
  return {{"out", wide(out)}, {"dinp", wide(dinp)}, {"dW", wide(dW)}, {"dbias", wide(db)}};
}

template <class T>
Results run_layernorm(int M, int C, uint32_t seed) {
  Rng g(seed);
  auto inp = to<T>(randn(static_cast<size_t>(M) * C, g, 2.0));
  for (int i = 0; i < M; ++i) inp[static_cast<size_t>(i) * C] += T(3);  // non-zero row means
  const auto w = to<T>(randn(C, g)), b = to<T>(randn(C, g));
  const auto dout = to<T>(randn(inp.size(), g));
  std::vector<T> out(inp.size()), mean(M), rstd(M), dinp(inp.size()), dw(C), db(C);
  k::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), M, C);
  k::layernorm_backward(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(),
                        mean.data(), rstd.data(), M, C);
  return {{"out", wide(out)}, {"mean", wide(mean)}, {"rstd", wide(rstd)},
          {"dinp", wide(dinp)}, {"dw", wide(dw)},    {"db", wide(db)}};
}

template <class T>
Results run_attention(int B, int T_, int C, int NH, uint32_t seed) {
  Rng g(seed);
  const auto qkv = to<T>(randn(static_cast<size_t>(B) * T_ * 3 * C, g));
  const auto dout = to<T>(randn(static_cast<size_t>(B) * T_ * C, g));
  std::vector<T> out(dout.size()), att(static_cast<size_t>(B) * NH * T_ * T_, T(kNaN));
  std::vector<T> dqkv(qkv.size()), scratch(k::attention_backward_scratch_floats(B, T_, C, NH));
  k::attention_forward(out.data(), att.data(), qkv.data(), B, T_, C, NH);
  k::attention_backward(dqkv.data(), dout.data(), qkv.data(), att.data(), B, T_, C, NH,
                        scratch.data());
  // Only the causal part of att is specified.
  Vec att_lower;
  for (size_t p = 0; p < static_cast<size_t>(B) * NH; ++p)
    for (int t = 0; t < T_; ++t)
      for (int j = 0; j <= t; ++j) att_lower.push_back(att[(p * T_ + t) * T_ + j]);
  return {{"out", wide(out)}, {"att", att_lower}, {"dqkv", wide(dqkv)}};
}

template <class T>
Results run_softmax_xent(int M, int V, uint32_t seed) {
  Rng g(seed);
  const auto logits = to<T>(randn(static_cast<size_t>(M) * V, g, 3.0));
  std::vector<int32_t> targets(M);
  std::uniform_int_distribution<int32_t> tok(0, V - 1);
  for (int m = 0; m < M; ++m) targets[m] = m % 7 == 3 ? -1 : tok(g);
  std::vector<T> losses(M), losses_fb(M);
  const double mean = k::softmax_xent_forward(losses.data(), logits.data(), targets.data(), M, V);
  auto dlogits = logits;
  const double mean_fb = k::softmax_xent_forward_backward(dlogits.data(), losses_fb.data(),
                                                          targets.data(), M, V, 1.0 / M);
  auto probs = logits;
  k::softmax_rows(probs.data(), M, V);
  return {{"losses", wide(losses)},   {"mean", {mean}},         {"losses_fb", wide(losses_fb)},
          {"mean_fb", {mean_fb}},      {"dlogits", wide(dlogits)}, {"probs", wide(probs)}};
}

template <class T>
Results run_embedding(int B, int T_, int C, int V, uint32_t seed) {
  Rng g(seed);
  std::vector<int32_t> tokens(static_cast<size_t>(B) * T_);
  std::uniform_int_distribution<int32_t> tok(0, V - 1);
  for (auto& t : tokens) t = tok(g);
  const auto wte = to<T>(randn(static_cast<size_t>(V) * C, g));
  const auto wpe = to<T>(randn(static_cast<size_t>(T_) * C, g));
  const auto dout = to<T>(randn(static_cast<size_t>(B) * T_ * C, g));
  std::vector<T> out(dout.size()), dwte(wte.size()), dwpe(wpe.size());
  k::embedding_forward(out.data(), tokens.data(), wte.data(), wpe.data(), B, T_, C);
  k::embedding_backward(dwte.data(), dwpe.data(), dout.data(), tokens.data(), B, T_, C);
  return {{"out", wide(out)}, {"dwte", wide(dwte)}, {"dwpe", wide(dwpe)}};
}

template <class T>
Results run_elementwise(size_t n, uint32_t seed) {
  Rng g(seed);
  const auto x = to<T>(randn(n, g, 2.0)), y = to<T>(randn(n, g)), dout = to<T>(randn(n, g));
  std::vector<T> relu(n), drelu(n), gelu(n), dgelu(n), sum(n);
  k::relu_forward(relu.data(), x.data(), n);
  k::relu_backward(drelu.data(), dout.data(), x.data(), n);
  k::gelu_forward(gelu.data(), x.data(), n);
  k::gelu_backward(dgelu.data(), dout.data(), x.data(), n);
  k::add(sum.data(), x.data(), y.data(), n);
  return {{"relu", wide(relu)}, {"drelu", wide(drelu)}, {"gelu", wide(gelu)},
          {"dgelu", wide(dgelu)}, {"add", wide(sum)}};
}

}  // namespace

// ================================ linear ==========================================================

TEST(Linear, ForwardMatchesNaiveWithAndWithoutBias) {
  Rng g(1);
  const int M = 7, K = 19, N = 11;
  const Vec inp = randn(M * K, g), W = randn(N * K, g), bias = randn(N, g);
  Vec out(M * N, kNaN);  // overwritten, never read
  k::linear_forward(out.data(), inp.data(), W.data(), bias.data(), M, K, N);
  expect_vec_near("with bias", out, ref_linear(inp, W, &bias, M, K, N), 1e-12);
  std::fill(out.begin(), out.end(), kNaN);
  k::linear_forward<double>(out.data(), inp.data(), W.data(), nullptr, M, K, N);
  expect_vec_near("no bias", out, ref_linear(inp, W, nullptr, M, K, N), 1e-12);
}

TEST(Linear, GradientsMatchFiniteDifferences) {
  Rng g(2);
  const int M = 5, K = 7, N = 6;
  Vec inp = randn(M * K, g), W = randn(N * K, g), bias = randn(N, g);
  const Vec wout = randn(M * N, g);
  auto loss = [&] {
    Vec out(M * N);
    k::linear_forward(out.data(), inp.data(), W.data(), bias.data(), M, K, N);
    return dot(out, wout);
  };
  const Vec g_inp0 = randn(inp.size(), g), g_W0 = randn(W.size(), g), g_b0 = randn(N, g);
  Vec dinp = g_inp0, dW = g_W0, db = g_b0;
  k::linear_backward(dinp.data(), dW.data(), db.data(), wout.data(), inp.data(), W.data(), M, K, N);
  expect_grad_matches_fd("dinp", inp, minus(dinp, g_inp0), loss);
  expect_grad_matches_fd("dW", W, minus(dW, g_W0), loss);
  expect_grad_matches_fd("dbias", bias, minus(db, g_b0), loss);
}

TEST(Linear, SgemmTransposesAndScales) {
  Rng g(3);
  const int M = 4, N = 5, K = 6;
  const Vec A = randn(K * M, g), B = randn(N * K, g), C0 = randn(M * N, g);
  Vec C = C0;
  // C = 2 * A^T B^T + 0.5 C with A stored [K,M] and B stored [N,K].
  k::sgemm<double>(true, true, M, N, K, 2.0, A.data(), M, B.data(), K, 0.5, C.data(), N);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double s = 0;
      for (int c = 0; c < K; ++c) s += A[c * M + i] * B[j * K + c];
      EXPECT_NEAR(C[i * N + j], 2 * s + 0.5 * C0[i * N + j], 1e-12);
    }
  // A float call with a double literal for alpha still deduces T = float.
  std::vector<float> a(4, 1.0f), b(4, 2.0f), c(4, 0.0f);
  k::sgemm(false, false, 2, 2, 2, 1.0, a.data(), 2, b.data(), 2, 0.0, c.data(), 2);
  for (float x : c) EXPECT_EQ(x, 4.0f);
}

// ================================ layernorm =======================================================

TEST(LayerNorm, ForwardMatchesNaive) {
  Rng g(4);
  const int M = 6, C = 37;
  Vec inp = randn(M * C, g, 3.0);
  for (auto& x : inp) x += 5;
  const Vec w = randn(C, g), b = randn(C, g);
  Vec out(M * C, kNaN), mean(M), rstd(M), rmean(M), rrstd(M);
  k::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), M, C);
  expect_vec_near("out", out, ref_layernorm(inp, w, b, M, C, &rmean, &rrstd), 1e-12);
  expect_vec_near("mean", mean, rmean, 1e-12);
  expect_vec_near("rstd", rstd, rrstd, 1e-12);
}

TEST(LayerNorm, GradientsMatchFiniteDifferences) {
  Rng g(5);
  const int M = 4, C = 13;
  Vec inp = randn(M * C, g), w = randn(C, g), b = randn(C, g);
  const Vec wout = randn(M * C, g);
  auto loss = [&] {
    Vec out(M * C), mean(M), rstd(M);
    k::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), M,
                         C);
    return dot(out, wout);
  };
  Vec out(M * C), mean(M), rstd(M);
  k::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), M, C);
  const Vec g_inp0 = randn(inp.size(), g), g_w0 = randn(C, g), g_b0 = randn(C, g);
  Vec dinp = g_inp0, dw = g_w0, db = g_b0;
  k::layernorm_backward(dinp.data(), dw.data(), db.data(), wout.data(), inp.data(), w.data(),
                        mean.data(), rstd.data(), M, C);
  expect_grad_matches_fd("dinp", inp, minus(dinp, g_inp0), loss);
  expect_grad_matches_fd("dw", w, minus(dw, g_w0), loss);
  expect_grad_matches_fd("db", b, minus(db, g_b0), loss);
}

// ================================ attention =======================================================

TEST(Attention, ForwardMatchesNaive) {
  // T = 150 spans three 64-row blocks, the last one partial.
  for (const int T : {1, 9, 64, 150}) {
    Rng g(6 + T);
    const int B = 2, C = 12, NH = 3;
    const Vec qkv = randn(static_cast<size_t>(B) * T * 3 * C, g, 1.5);
    Vec out(static_cast<size_t>(B) * T * C, kNaN), att(static_cast<size_t>(B) * NH * T * T, kNaN);
    Vec ratt(att.size(), 0.0);
    k::attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH);
    const Vec rout = ref_attention(qkv, B, T, C, NH, &ratt);
    expect_vec_near("out T=" + std::to_string(T), out, rout, 1e-12);
    Vec lower, rlower;
    for (int p = 0; p < B * NH; ++p)
      for (int t = 0; t < T; ++t)
        for (int j = 0; j <= t; ++j) {
          lower.push_back(att[(static_cast<size_t>(p) * T + t) * T + j]);
          rlower.push_back(ratt[(static_cast<size_t>(p) * T + t) * T + j]);
        }
    expect_vec_near("att T=" + std::to_string(T), lower, rlower, 1e-12);
  }
}

TEST(Attention, GradientsMatchFiniteDifferences) {
  // One block, and three blocks with a partial last one.
  for (const auto& [B, T, C, NH] : {std::array{2, 9, 8, 2}, std::array{1, 130, 4, 2}}) {
    Rng g(7 + T);
    Vec qkv = randn(static_cast<size_t>(B) * T * 3 * C, g);
    const Vec wout = randn(static_cast<size_t>(B) * T * C, g);
    Vec att(static_cast<size_t>(B) * NH * T * T, kNaN);
    auto loss = [&] {
      Vec out(wout.size()), a(att.size());
      k::attention_forward(out.data(), a.data(), qkv.data(), B, T, C, NH);
      return dot(out, wout);
    };
    Vec out(wout.size());
    // att starts as NaN: the backward must read only what the forward wrote.
    k::attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH);
    Vec scratch(k::attention_backward_scratch_floats(B, T, C, NH), kNaN);
    const Vec g0 = randn(qkv.size(), g);
    Vec dqkv = g0;
    k::attention_backward(dqkv.data(), wout.data(), qkv.data(), att.data(), B, T, C, NH,
                          scratch.data());
    const size_t stride = std::getenv("PIPENAG_SANITIZED") && T > 64 ? 7 : 1;
    expect_grad_matches_fd("dqkv T=" + std::to_string(T), qkv, minus(dqkv, g0), loss, 1e-6, stride);
  }
}

TEST(Attention, FutureTokensDoNotChangeEarlierOutputs) {
  const int B = 2, T = 150, C = 32, NH = 4;
  for (const int s : {10, 63, 64, 100}) {  // inside the first block, at block edges, later
    Rng g(8);
    std::vector<float> qkv = to<float>(randn(static_cast<size_t>(B) * T * 3 * C, g));
    std::vector<float> out1(static_cast<size_t>(B) * T * C), out2(out1.size());
    std::vector<float> att(static_cast<size_t>(B) * NH * T * T);
    k::attention_forward(out1.data(), att.data(), qkv.data(), B, T, C, NH);
    // Change token s's keys and values (all heads, both batch rows); queries stay.
    for (int b = 0; b < B; ++b)
      for (int c = C; c < 3 * C; ++c) qkv[(static_cast<size_t>(b) * T + s) * 3 * C + c] += 1.5f;
    k::attention_forward(out2.data(), att.data(), qkv.data(), B, T, C, NH);
    for (int b = 0; b < B; ++b) {
      const size_t row0 = static_cast<size_t>(b) * T * C;
      for (size_t i = row0; i < row0 + static_cast<size_t>(s) * C; ++i)
        ASSERT_EQ(out1[i], out2[i]) << "s=" << s << " b=" << b << " row " << (i - row0) / C;
      // ...while token s itself (which sees its own k/v) does change.
      bool changed = false;
      for (int c = 0; c < C; ++c)
        changed |= out1[row0 + static_cast<size_t>(s) * C + c] !=
                   out2[row0 + static_cast<size_t>(s) * C + c];
      EXPECT_TRUE(changed) << "s=" << s;
    }
  }
}

// ================================ softmax + cross-entropy =========================================

TEST(SoftmaxXent, ForwardMatchesNaiveAndIgnoresNegativeTargets) {
  Rng g(9);
  const int M = 6, V = 37;
  const Vec logits = randn(M * V, g, 4.0);
  const std::vector<int32_t> targets = {3, -1, 0, 36, -5, 17};
  Vec losses(M, kNaN);
  const double mean = k::softmax_xent_forward(losses.data(), logits.data(), targets.data(), M, V);
  double sum = 0;
  for (int m = 0; m < M; ++m) {
    if (targets[m] < 0) {
      EXPECT_EQ(losses[m], 0.0);
      continue;
    }
    const double want = ref_xent_row(&logits[m * V], V, targets[m]);
    EXPECT_NEAR(losses[m], want, 1e-12);
    sum += want;
  }
  EXPECT_NEAR(mean, sum / 4, 1e-12);  // four rows count

  const std::vector<int32_t> none(M, -1);
  EXPECT_EQ(k::softmax_xent_forward(losses.data(), logits.data(), none.data(), M, V), 0.0);
  Vec d = logits;
  EXPECT_EQ(k::softmax_xent_forward_backward(d.data(), losses.data(), none.data(), M, V, 1.0), 0.0);
  for (double x : d) ASSERT_EQ(x, 0.0);
}

TEST(SoftmaxXent, GradientsMatchFiniteDifferences) {
  Rng g(10);
  const int M = 5, V = 37;
  Vec logits = randn(M * V, g, 2.0);
  const std::vector<int32_t> targets = {4, -1, 36, 0, 9};
  const double grad_scale = 0.37;
  auto loss = [&] {
    Vec losses(M);
    k::softmax_xent_forward(losses.data(), logits.data(), targets.data(), M, V);
    double s = 0;
    for (double l : losses) s += l;
    return grad_scale * s;
  };
  Vec d = logits, losses(M), losses_fwd(M);
  const double mean =
      k::softmax_xent_forward_backward(d.data(), losses.data(), targets.data(), M, V, grad_scale);
  EXPECT_EQ(mean, k::softmax_xent_forward(losses_fwd.data(), logits.data(), targets.data(), M, V));
  expect_vec_near("losses", losses, losses_fwd, 0.0);
  for (int v = 0; v < V; ++v) EXPECT_EQ(d[1 * V + v], 0.0) << "ignored row has no gradient";
  expect_grad_matches_fd("dlogits", logits, d, loss);
}

TEST(SoftmaxXent, SoftmaxRowsMatchesNaive) {
  Rng g(11);
  const int M = 3, V = 53;
  Vec x = randn(M * V, g, 5.0);
  x[7] = -std::numeric_limits<double>::infinity();  // masked entry: probability exactly 0
  const Vec x0 = x;
  k::softmax_rows(x.data(), M, V);
  for (int m = 0; m < M; ++m) {
    double mx = -1e300, z = 0;
    for (int v = 0; v < V; ++v) mx = std::max(mx, x0[m * V + v]);
    for (int v = 0; v < V; ++v) z += std::exp(x0[m * V + v] - mx);
    for (int v = 0; v < V; ++v) EXPECT_NEAR(x[m * V + v], std::exp(x0[m * V + v] - mx) / z, 1e-14);
  }
  EXPECT_EQ(x[7], 0.0);
  std::vector<float> xf = to<float>(x0);
  k::softmax_rows(xf.data(), M, V);
  EXPECT_EQ(xf[7], 0.0f);
  for (size_t i = 0; i < xf.size(); ++i) EXPECT_NEAR(xf[i], x[i], 1e-6 * std::max(x[i], 1e-3));
}

// ================================ embedding =======================================================

TEST(Embedding, ForwardAndGradientsWithRepeatedTokens) {
  Rng g(12);
  const int B = 2, T = 5, C = 6, V = 4;  // 10 tokens over 4 ids: repeats are certain
  const std::vector<int32_t> tokens = {1, 3, 1, 0, 1, 3, 3, 2, 1, 0};
  Vec wte = randn(V * C, g), wpe = randn(T * C, g);
  const Vec wout = randn(B * T * C, g);
  Vec out(B * T * C, kNaN);
  k::embedding_forward(out.data(), tokens.data(), wte.data(), wpe.data(), B, T, C);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < C; ++c)
        ASSERT_EQ(out[(b * T + t) * C + c], wte[tokens[b * T + t] * C + c] + wpe[t * C + c]);
  auto loss = [&] {
    Vec o(B * T * C);
    k::embedding_forward(o.data(), tokens.data(), wte.data(), wpe.data(), B, T, C);
    return dot(o, wout);
  };
  const Vec g_te0 = randn(wte.size(), g), g_pe0 = randn(wpe.size(), g);
  Vec dwte = g_te0, dwpe = g_pe0;
  k::embedding_backward(dwte.data(), dwpe.data(), wout.data(), tokens.data(), B, T, C);
  expect_grad_matches_fd("dwte", wte, minus(dwte, g_te0), loss);
  expect_grad_matches_fd("dwpe", wpe, minus(dwpe, g_pe0), loss);
}

// ================================ elementwise =====================================================

TEST(Elementwise, ForwardsMatchFormulas) {
  Rng g(13);
  const size_t n = 45;
  const Vec x = randn(n, g, 3.0), y = randn(n, g);
  Vec r(n, kNaN), ge(n, kNaN), s(n, kNaN);
  k::relu_forward(r.data(), x.data(), n);
  k::gelu_forward(ge.data(), x.data(), n);
  k::add(s.data(), x.data(), y.data(), n);
  for (size_t i = 0; i < n; ++i) {
    EXPECT_EQ(r[i], std::max(x[i], 0.0));
    EXPECT_NEAR(ge[i], gelu_ref(x[i]), 1e-15);
    EXPECT_EQ(s[i], x[i] + y[i]);
  }
}

TEST(Elementwise, GradientsMatchFiniteDifferences) {
  Rng g(14);
  const size_t n = 45;
  Vec x = randn(n, g, 2.0);
  for (auto& v : x)
    if (std::abs(v) < 1e-3) v = 0.5;  // keep ReLU's kink out of the differences
  const Vec wout = randn(n, g), g0 = randn(n, g);
  auto relu_loss = [&] {
    Vec o(n);
    k::relu_forward(o.data(), x.data(), n);
    return dot(o, wout);
  };
  auto gelu_loss = [&] {
    Vec o(n);
    k::gelu_forward(o.data(), x.data(), n);
    return dot(o, wout);
  };
  Vec d = g0;
  k::relu_backward(d.data(), wout.data(), x.data(), n);
  expect_grad_matches_fd("relu", x, minus(d, g0), relu_loss);
  d = g0;
  k::gelu_backward(d.data(), wout.data(), x.data(), n);
  expect_grad_matches_fd("gelu", x, minus(d, g0), gelu_loss);
}

TEST(Elementwise, FloatErfAndExpAreAccurate) {
  namespace d = pipenag::kernels::detail;
  double max_erf = 0, max_exp = 0;
  std::vector<float> xs;
  for (int i = -60000; i <= 60000; ++i) xs.push_back(static_cast<float>(i) * 1e-4f);
  for (size_t i = 0; i + 16 <= xs.size(); i += 16) {
    const d::Vf16 e = d::erf16(d::load16(xs.data() + i));
    for (int l = 0; l < 16; ++l)
      max_erf = std::max(max_erf, std::abs(e[l] - std::erf(static_cast<double>(xs[i + l]))));
  }
  EXPECT_LT(max_erf, 5e-7);
  // exp through the float row primitive: exp(x - 0) stored and summed.
  std::vector<float> ys(xs.size());
  for (auto& x : xs) x *= 14.0f;  // [-84, 84]
  d::exp_shift_store_sum(ys.data(), xs.data(), static_cast<int>(xs.size()), 0.0f);
  for (size_t i = 0; i < xs.size(); ++i) {
    const double want = std::exp(static_cast<double>(xs[i]));
    max_exp = std::max(max_exp, std::abs(ys[i] - want) / want);
  }
  EXPECT_LT(max_exp, 3e-7);
  // The edges: -inf gives exactly 0, NaN stays NaN, overflow gives inf, and results in the
  // subnormal range are rounded once (within one subnormal step of the true value).
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> edge = {-inf, std::numeric_limits<float>::quiet_NaN(), 89.0f, inf,
                                   -87.0f, -95.5f, -103.0f, -110.0f, 88.7f, 0.0f};
  std::vector<float> out(edge.size());
  d::exp_shift_store_sum(out.data(), edge.data(), static_cast<int>(edge.size()), 0.0f);
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_TRUE(std::isnan(out[1]));
  EXPECT_EQ(out[2], inf);
  EXPECT_EQ(out[3], inf);
  for (size_t i : {4, 5, 6, 8})
    EXPECT_NEAR(out[i], std::exp(static_cast<double>(edge[i])),
                std::max(1e-6 * std::exp(static_cast<double>(edge[i])), 1.5e-45))
        << edge[i];
  EXPECT_EQ(out[7], 0.0f);
  EXPECT_EQ(out[9], 1.0f);
}

// ================================ conventions =====================================================

TEST(Conventions, NullGradientPointersAreSkipped) {
  Rng g(15);
  const int M = 6, K = 5, N = 4;
  const Vec inp = randn(M * K, g), W = randn(N * K, g), dout = randn(M * N, g);
  Vec dinp(M * K), dW(N * K), db(N);
  k::linear_backward(dinp.data(), dW.data(), db.data(), dout.data(), inp.data(), W.data(), M, K, N);
  Vec dW2(N * K);
  k::linear_backward<double>(nullptr, dW2.data(), nullptr, dout.data(), inp.data(), W.data(), M, K,
                             N);
  EXPECT_EQ(dW2, dW);
  Vec dinp2(M * K), db2(N);
  k::linear_backward<double>(dinp2.data(), nullptr, db2.data(), dout.data(), inp.data(), W.data(),
                             M, K, N);
  EXPECT_EQ(dinp2, dinp);
  EXPECT_EQ(db2, db);

  const int C = K;
  const Vec w = randn(C, g), b = randn(C, g), dy = randn(M * C, g);
  Vec out(M * C), mean(M), rstd(M), lx(M * C), lw(C), lb(C);
  k::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), M, C);
  k::layernorm_backward(lx.data(), lw.data(), lb.data(), dy.data(), inp.data(), w.data(),
                        mean.data(), rstd.data(), M, C);
  Vec lw2(C), lx2(M * C), lb2(C);
  k::layernorm_backward<double>(nullptr, lw2.data(), nullptr, dy.data(), inp.data(), w.data(),
                                mean.data(), rstd.data(), M, C);
  k::layernorm_backward<double>(lx2.data(), nullptr, lb2.data(), dy.data(), inp.data(), w.data(),
                                mean.data(), rstd.data(), M, C);
  EXPECT_EQ(lw2, lw);
  EXPECT_EQ(lx2, lx);
  EXPECT_EQ(lb2, lb);

  const std::vector<int32_t> tokens = {0, 2, 2, 1, 0, 2};
  const int B = 2, T = 3, V = 3;
  Vec ete(V * C), epe(T * C), ete2(V * C), epe2(T * C);
  k::embedding_backward(ete.data(), epe.data(), dy.data(), tokens.data(), B, T, C);
  k::embedding_backward<double>(nullptr, epe2.data(), dy.data(), tokens.data(), B, T, C);
  k::embedding_backward<double>(ete2.data(), nullptr, dy.data(), tokens.data(), B, T, C);
  EXPECT_EQ(ete2, ete);
  EXPECT_EQ(epe2, epe);

  // The attention backward has one gradient output: null means nothing to do.
  const Vec qkv = randn(B * T * 3 * 4, g), ado = randn(B * T * 4, g);
  Vec att(B * 2 * T * T), aout(B * T * 4), scratch(k::attention_backward_scratch_floats(B, T, 4, 2));
  k::attention_forward(aout.data(), att.data(), qkv.data(), B, T, 4, 2);
  k::attention_backward<double>(nullptr, ado.data(), qkv.data(), att.data(), B, T, 4, 2,
                                scratch.data());
}

TEST(Conventions, BackwardsAccumulate) {
  // Two backward calls into the same buffers give twice one call, for every op (an overwrite
  // would give once). Float, at shapes that take the vectorised paths. Not bit-exact: a GEMM's
  // second call continues its multiply-add chain from the first call's result (gemm.h), so it
  // rounds like one long sum, within a few ulp of the buffer's largest value.
  Rng g(16);
  auto twice_is_double = [](const std::string& what, const std::function<void(float*)>& back,
                            size_t n) {
    std::vector<float> once(n, 0.0f), two(n, 0.0f);
    back(once.data());
    back(two.data());
    back(two.data());
    float largest = 0;
    for (float v : once) largest = std::max(largest, std::abs(v));
    for (size_t i = 0; i < n; ++i)
      ASSERT_NEAR(two[i], 2.0f * once[i], 1e-6f * (std::abs(once[i]) + largest))
          << what << "[" << i << "]";
    EXPECT_NE(*std::max_element(once.begin(), once.end()), 0.0f) << what;
  };
  const int M = 33, K = 40, N = 20;
  const auto inp = to<float>(randn(M * K, g)), W = to<float>(randn(N * K, g));
  const auto dout = to<float>(randn(M * N, g)), dy = to<float>(randn(M * K, g));
  twice_is_double("linear dinp", [&](float* p) {
    k::linear_backward<float>(p, nullptr, nullptr, dout.data(), inp.data(), W.data(), M, K, N);
  }, M * K);
  twice_is_double("linear dW", [&](float* p) {
    k::linear_backward<float>(nullptr, p, nullptr, dout.data(), inp.data(), W.data(), M, K, N);
  }, N * K);
  twice_is_double("linear dbias", [&](float* p) {
    k::linear_backward<float>(nullptr, nullptr, p, dout.data(), inp.data(), W.data(), M, K, N);
  }, N);
  const auto w = to<float>(randn(K, g)), b = to<float>(randn(K, g));
  std::vector<float> out(M * K), mean(M), rstd(M);
  k::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), M, K);
  twice_is_double("layernorm dinp", [&](float* p) {
    k::layernorm_backward<float>(p, nullptr, nullptr, dy.data(), inp.data(), w.data(), mean.data(),
                                 rstd.data(), M, K);
  }, M * K);
  twice_is_double("layernorm dw", [&](float* p) {
    k::layernorm_backward<float>(nullptr, p, nullptr, dy.data(), inp.data(), w.data(), mean.data(),
                                 rstd.data(), M, K);
  }, K);
  twice_is_double("layernorm db", [&](float* p) {
    k::layernorm_backward<float>(nullptr, nullptr, p, dy.data(), inp.data(), w.data(), mean.data(),
                                 rstd.data(), M, K);
  }, K);
  const int B = 1, T = 33, C = 20, NH = 2;
  const auto qkv = to<float>(randn(B * T * 3 * C, g)), ado = to<float>(randn(B * T * C, g));
  std::vector<float> att(B * NH * T * T), aout(B * T * C);
  std::vector<float> scratch(k::attention_backward_scratch_floats(B, T, C, NH));
  k::attention_forward(aout.data(), att.data(), qkv.data(), B, T, C, NH);
  twice_is_double("attention dqkv", [&](float* p) {
    k::attention_backward(p, ado.data(), qkv.data(), att.data(), B, T, C, NH, scratch.data());
  }, qkv.size());
  const std::vector<int32_t> tokens = {5, 1, 5, 5, 0, 2, 1, 5, 3, 3, 0};
  const int V = 6;  // B = 1, T = 11, C = K
  twice_is_double("embedding dwte", [&](float* p) {
    k::embedding_backward<float>(p, nullptr, dy.data(), tokens.data(), 1, 11, K);
  }, V * K);
  twice_is_double("embedding dwpe", [&](float* p) {
    k::embedding_backward<float>(nullptr, p, dy.data(), tokens.data(), 1, 11, K);
  }, 11 * K);
  twice_is_double("relu", [&](float* p) { k::relu_backward(p, dy.data(), inp.data(), M * K); },
                  M * K);
  twice_is_double("gelu", [&](float* p) { k::gelu_backward(p, dy.data(), inp.data(), M * K); },
                  M * K);
}

TEST(Conventions, OverwriteEqualsAccumulateIntoZeros) {
  // accumulate = false ignores what the buffer held (NaN here) and writes what accumulating into
  // zeros writes, bit for bit.
  Rng g(17);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto same = [&](const std::string& what, const std::function<void(float*, bool)>& back, size_t n) {
    std::vector<float> acc(n, 0.0f), over(n, nan);
    back(acc.data(), true);
    back(over.data(), false);
    EXPECT_EQ(std::memcmp(acc.data(), over.data(), n * sizeof(float)), 0) << what;
  };
  const size_t n = 40000;
  const auto x = to<float>(randn(n, g)), dy = to<float>(randn(n, g));
  same("relu", [&](float* p, bool a) { k::relu_backward(p, dy.data(), x.data(), n, a); }, n);
  same("gelu", [&](float* p, bool a) { k::gelu_backward(p, dy.data(), x.data(), n, a); }, n);
  const int B = 2, T = 150, C = 64, NH = 4;
  const auto qkv = to<float>(randn(B * T * 3 * C, g)), ado = to<float>(randn(B * T * C, g));
  std::vector<float> att(B * NH * T * T), aout(B * T * C);
  std::vector<float> scratch(k::attention_backward_scratch_floats(B, T, C, NH));
  k::attention_forward(aout.data(), att.data(), qkv.data(), B, T, C, NH);
  same("attention", [&](float* p, bool a) {
    k::attention_backward(p, ado.data(), qkv.data(), att.data(), B, T, C, NH, scratch.data(), a);
  }, qkv.size());
}

// ================================ float vs double =================================================

TEST(FloatVsDouble, Linear) {
  expect_results_close(run_linear<float>(64, 384, 96, 20), run_linear<double>(64, 384, 96, 20),
                       1e-5);
}
TEST(FloatVsDouble, LayerNorm) {
  expect_results_close(run_layernorm<float>(32, 384, 21), run_layernorm<double>(32, 384, 21), 1e-5);
}
TEST(FloatVsDouble, Attention) {
  expect_results_close(run_attention<float>(2, 150, 64, 2, 22),
                       run_attention<double>(2, 150, 64, 2, 22), 1e-5);
}
TEST(FloatVsDouble, SoftmaxXent) {
  expect_results_close(run_softmax_xent<float>(16, 1003, 23),
                       run_softmax_xent<double>(16, 1003, 23), 1e-5);
}
TEST(FloatVsDouble, Embedding) {
  expect_results_close(run_embedding<float>(3, 17, 40, 5, 24),
                       run_embedding<double>(3, 17, 40, 5, 24), 1e-5);
}
TEST(FloatVsDouble, Elementwise) {
  expect_results_close(run_elementwise<float>(10007, 25), run_elementwise<double>(10007, 25), 1e-5);
}

// ================================ thread-count invariance =========================================
// Shapes are large enough that every kernel takes its parallel path and OpenBLAS splits the
// GEMMs over both threads.

TEST(ThreadInvariance, Linear) {
  expect_thread_invariant([] { return run_linear<float>(256, 384, 520, 30); });
}
TEST(ThreadInvariance, LinearAtAwkwardK) {
  // K = 1000 and a backward K (= N) of 650: neither a multiple of 32 (see matmul.cpp).
  expect_thread_invariant([] { return run_linear<float>(200, 1000, 650, 36); });
}
TEST(ThreadInvariance, LinearDouble) {
  expect_thread_invariant([] { return run_linear<double>(200, 1000, 650, 37); });
}
TEST(ThreadInvariance, LayerNorm) {
  expect_thread_invariant([] { return run_layernorm<float>(256, 384, 31); });
}
TEST(ThreadInvariance, Attention) {
  expect_thread_invariant([] { return run_attention<float>(2, 150, 128, 4, 32); });
}
TEST(ThreadInvariance, SoftmaxXent) {
  expect_thread_invariant([] { return run_softmax_xent<float>(64, 2003, 33); });
}
TEST(ThreadInvariance, Embedding) {
  expect_thread_invariant([] { return run_embedding<float>(4, 64, 384, 50, 34); });
}
TEST(ThreadInvariance, Elementwise) {
  expect_thread_invariant([] { return run_elementwise<float>(100003, 35); });
}
