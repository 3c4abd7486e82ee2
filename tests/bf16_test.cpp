// The bf16 matmul path: rounding, the oneDNN products (against float64 products of the same
// bf16-rounded inputs, so only the fp32 accumulation may differ), and the whole model.
#include <gtest/gtest.h>

#include <omp.h>

#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/matmul_bf16.h"
#include "optim/adamw.h"
#include "pipeline/stage.h"

namespace pipenag {
namespace {

using kernels::Bf16Linear;

// Every backend this machine can run: emulated always, the others where the CPU (and oneDNN's
// ISA cap) allow.
std::vector<std::string> runnable_backends() {
  std::vector<std::string> out = {"emulated"};
  for (const char* b : {"avx512bf16", "onednn"}) {
    try {
      Bf16Linear probe(b);
      out.push_back(b);
    } catch (const std::invalid_argument&) {
    }
  }
  return out;
}

double bf(float f) {
  uint16_t h;
  kernels::to_bf16(&h, &f, 1);
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

TEST(Bf16, RoundsToNearestEven) {
  auto bits = [](float f) {
    uint16_t h;
    kernels::to_bf16(&h, &f, 1);
    return h;
  };
  EXPECT_EQ(bits(1.0f), 0x3f80);
  EXPECT_EQ(bits(-2.0f), 0xc000);
  // 1 + 2^-8 is exactly half way between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
  EXPECT_EQ(bits(1.0f + 0x1.0p-8f), 0x3f80);
  // 1 + 3*2^-8 is half way between 1+2^-7 (odd) and 1+2^-6 (even): rounds up.
  EXPECT_EQ(bits(1.0f + 3 * 0x1.0p-8f), 0x3f82);
  EXPECT_EQ(bits(1.0f + 0x1.0p-8f + 0x1.0p-20f), 0x3f81);  // above half: up
  EXPECT_TRUE(std::isnan(bf(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_EQ(bits(std::numeric_limits<float>::infinity()), 0x7f80);
  // The vectorised path (32 at a time) agrees with the scalar rule on many values.
  std::mt19937 rng(1);
  std::normal_distribution<float> n(0, 10);
  std::vector<float> x(1000);
  for (auto& v : x) v = n(rng);
  std::vector<uint16_t> h(x.size());
  kernels::to_bf16(h.data(), x.data(), x.size());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(h[i], bits(x[i])) << i;
}

struct Shape {
  int M, K, N;
};
class Bf16Products : public ::testing::TestWithParam<Shape> {};
void check_products(const std::string& backend, const Shape& shape);

TEST_P(Bf16Products, MatchFloat64OfRoundedInputs) {
  for (const std::string& backend : runnable_backends()) {
    SCOPED_TRACE("backend " + backend);
    check_products(backend, GetParam());
  }
}

void check_products(const std::string& backend, const Shape& shape) {
  const auto [M, K, N] = shape;
  std::mt19937 rng(static_cast<unsigned>(M * 131 + K * 7 + N));
  std::normal_distribution<float> n(0, 1);
  auto rnd = [&](size_t sz) {
    std::vector<float> v(sz);
    for (auto& x : v) x = n(rng);
    return v;
  };
  auto inp = rnd(size_t(M) * K), W = rnd(size_t(N) * K), b = rnd(N), dout = rnd(size_t(M) * N);
  // The reference works on the bf16-rounded values (rounded once here, scalar rule).
  auto rounded = [](const std::vector<float>& v) {
    std::vector<double> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = bf(v[i]);
    return r;
  };
  const auto ri = rounded(inp), rW = rounded(W), rd = rounded(dout);
  Bf16Linear lin(backend);
  ASSERT_EQ(lin.backend(), backend);
  std::vector<float> out(size_t(M) * N, NAN);
  lin.forward(out.data(), inp.data(), W.data(), b.data(), M, K, N);
  // Gradients start non-zero to check accumulation.
  std::vector<float> dinp(size_t(M) * K, 0.5f), dW(size_t(N) * K, -0.25f), db(N, 1.0f);
  lin.backward(dinp.data(), dW.data(), db.data(), dout.data(), inp.data(), W.data(), M, K, N);

  auto close = [](double got, double want, double scale) { return std::abs(got - want) <= 1e-5 * scale + 1e-6; };
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < N; ++j) {
      double s = b[j], mag = std::abs(b[j]);
      for (int k = 0; k < K; ++k) {
        s += ri[m * K + k] * rW[j * K + k];
        mag += std::abs(ri[m * K + k] * rW[j * K + k]);
      }
      ASSERT_TRUE(close(out[m * N + j], s, mag)) << "out " << m << "," << j << ": " << out[m * N + j] << " vs " << s;
    }
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) {
      double s = 0.5, mag = 0.5;
      for (int j = 0; j < N; ++j) {
        s += rd[m * N + j] * rW[j * K + k];
        mag += std::abs(rd[m * N + j] * rW[j * K + k]);
      }
      ASSERT_TRUE(close(dinp[m * K + k], s, mag)) << "dinp " << m << "," << k;
    }
  for (int j = 0; j < N; ++j) {
    double sb = 1.0;
    for (int m = 0; m < M; ++m) sb += dout[m * N + j];  // bias gradient stays fp32
    ASSERT_NEAR(db[j], sb, 1e-4 * (1 + std::abs(sb)));
    for (int k = 0; k < K; ++k) {
      double s = -0.25, mag = 0.25;
      for (int m = 0; m < M; ++m) {
        s += rd[m * N + j] * ri[m * K + k];
        mag += std::abs(rd[m * N + j] * ri[m * K + k]);
      }
      ASSERT_TRUE(close(dW[j * K + k], s, mag)) << "dW " << j << "," << k;
    }
  }
  // Null outputs are skipped; no bias is fine; dinp can be overwritten instead of accumulated.
  lin.forward(out.data(), inp.data(), W.data(), nullptr, M, K, N);
  lin.backward(nullptr, nullptr, db.data(), dout.data(), inp.data(), W.data(), M, K, N);
  std::vector<float> over(size_t(M) * K, NAN), acc(size_t(M) * K, 0.0f);
  lin.backward(over.data(), nullptr, nullptr, dout.data(), inp.data(), W.data(), M, K, N, false);
  lin.backward(acc.data(), nullptr, nullptr, dout.data(), inp.data(), W.data(), M, K, N, true);
  EXPECT_EQ(over, acc);
}

TEST(Bf16, EveryBackendGivesTheSameBitsWithOneOrTwoThreads) {
  const int M = 300, K = 385, N = 200;  // odd K and M: the pair padding; two threads split each
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0, 1);
  std::vector<float> inp(size_t(M) * K), W(size_t(N) * K), dout(size_t(M) * N), b(N);
  for (auto* v : {&inp, &W, &dout, &b})
    for (auto& x : *v) x = n(rng);
  const auto backends = runnable_backends();
  EXPECT_GE(backends.size(), Bf16Linear::hardware_support() ? 2u : 1u);
  for (const std::string& backend : backends) {
    std::vector<float> out[2], dinp[2], dW[2];
    for (int t = 0; t < 2; ++t) {
      omp_set_num_threads(t + 1);
      Bf16Linear lin(backend);
      out[t].assign(size_t(M) * N, 0.0f);
      dinp[t].assign(size_t(M) * K, 0.0f);
      dW[t].assign(size_t(N) * K, 0.0f);
      lin.forward(out[t].data(), inp.data(), W.data(), b.data(), M, K, N);
      lin.backward(dinp[t].data(), dW[t].data(), nullptr, dout.data(), inp.data(), W.data(), M, K, N);
    }
    omp_set_num_threads(2);
    EXPECT_EQ(out[0], out[1]) << backend;
    EXPECT_EQ(dinp[0], dinp[1]) << backend;
    EXPECT_EQ(dW[0], dW[1]) << backend;
  }
}

TEST(Bf16, UnknownOrUnavailableBackendsAreRefused) {
  EXPECT_THROW(Bf16Linear("bf17"), std::invalid_argument);
  if (!__builtin_cpu_supports("avx512bf16")) {
    EXPECT_THROW(Bf16Linear("avx512bf16"), std::invalid_argument);
  }
  // The environment's choice: taken when runnable, else the default with a note saying so.
  const std::string def = Bf16Linear::bf16_backend();
  setenv("PIPENAG_BF16", "emulated", 1);
  EXPECT_EQ(Bf16Linear::bf16_backend(), "emulated");
  setenv("PIPENAG_BF16", "bf17", 1);
  std::string note;
  EXPECT_EQ(Bf16Linear::bf16_backend(&note), def);
  EXPECT_NE(note.find("PIPENAG_BF16=bf17 is not a bf16 backend"), std::string::npos) << note;
  unsetenv("PIPENAG_BF16");
  EXPECT_EQ(Bf16Linear::bf16_backend(), def);
}

INSTANTIATE_TEST_SUITE_P(Shapes, Bf16Products,
                         ::testing::Values(Shape{1, 1, 1}, Shape{7, 5, 3}, Shape{64, 48, 144},
                                           Shape{33, 96, 65}, Shape{128, 64, 256}));

TEST(Bf16, ModelLossCloseToFp32AndTrains) {
  ModelConfig m;
  m.n_layer = 2;
  m.n_embd = 64;
  m.n_head = 4;
  m.block_size = 32;
  m.vocab_size = 50;
  const int B = 4;
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> tok(0, m.vocab_size - 1);
  std::vector<int32_t> x(B * m.block_size), y(x.size());
  for (auto& t : x) t = tok(rng);
  for (auto& t : y) t = tok(rng);
  const MicroBatch mb{x.data(), y.data()};

  Stage f32(m, 0, m.n_layer + 2, B, 1), b16(m, 0, m.n_layer + 2, B, 1);
  f32.init_params(m.seed);
  b16.init_params(m.seed);
  b16.set_bf16(true);
  ASSERT_TRUE(b16.bf16());
  UnitContext c1, c2;
  c1.grad_scale = c2.grad_scale = 1.0f / static_cast<float>(x.size());
  f32.zero_grads();
  b16.zero_grads();
  f32.forward(0, nullptr, mb, c1);
  b16.forward(0, nullptr, mb, c2);
  EXPECT_NEAR(c2.loss_sum, c1.loss_sum, 1e-3 * c1.loss_sum);
  EXPECT_NE(c2.loss_sum, c1.loss_sum);  // it really ran in bf16
  f32.backward(0, nullptr, mb, c1);
  b16.backward(0, nullptr, mb, c2);
  double dot = 0, n1 = 0, n2 = 0;
  for (size_t i = 0; i < f32.num_params(); ++i) {
    dot += double(f32.grads()[i]) * b16.grads()[i];
    n1 += double(f32.grads()[i]) * f32.grads()[i];
    n2 += double(b16.grads()[i]) * b16.grads()[i];
  }
  EXPECT_GT(dot / std::sqrt(n1 * n2), 0.999);  // same gradient direction

  AdamW opt(b16.num_params(), AdamWHyper{});
  double loss = 0;
  for (int s = 0; s < 150; ++s) {
    b16.zero_grads();
    UnitContext c;
    c.grad_scale = 1.0f / static_cast<float>(x.size());
    b16.forward(0, nullptr, mb, c);
    b16.backward(0, nullptr, mb, c);
    loss = c.loss_sum / static_cast<double>(c.loss_count);
    opt.step(b16.params(), b16.grads(), 1e-2);
  }
  EXPECT_LT(loss, 0.1);
}

}  // namespace
}  // namespace pipenag
