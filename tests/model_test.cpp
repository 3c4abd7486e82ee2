// The whole model: fp32 against an independent float64 reference, gradients against finite
// differences, composition of stages, determinism, and the optimizer pieces of the loop.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <random>
#include <vector>

#include "model/init.h"
#include "model/units.h"
#include "optim/adamw.h"
#include "optim/grad_clip.h"
#include "optim/lr_schedule.h"
#include "pipeline/stage.h"
#include "reference_gpt.h"
#include "util/error.h"

namespace pipenag {
namespace {

ModelConfig tiny(Activation a = Activation::ReLU, bool tied = false) {
  ModelConfig m;
  m.n_layer = 2;
  m.n_embd = 16;
  m.n_head = 2;
  m.block_size = 8;
  m.vocab_size = 11;
  m.activation = a;
  m.tie_embeddings = tied;
  m.seed = 7;
  return m;
}

int n_units(const ModelConfig& m) { return m.n_layer + 2; }

// Larger-than-init random weights so that attention, layernorm and the activation are far from
// their near-linear regime at initialisation.
void randomize(Stage& s, uint64_t seed) {
  std::mt19937 rng(static_cast<unsigned>(seed));
  std::normal_distribution<float> n(0.0f, 0.3f);
  for (const auto& p : s.param_table()) {
    const bool ln = p.name.find("ln_") != std::string::npos;
    for (size_t i = 0; i < p.numel; ++i)
      s.params()[p.offset + i] = (ln && p.name.find("weight") != std::string::npos) ? 1.0f + n(rng) : n(rng);
  }
}

struct Batch {
  std::vector<int32_t> x, y;
};
Batch random_batch(const ModelConfig& m, int B, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> tok(0, m.vocab_size - 1);
  Batch b;
  for (int i = 0; i < B * m.block_size; ++i) {
    b.x.push_back(tok(rng));
    b.y.push_back(tok(rng));
  }
  return b;
}

double stage_loss(Stage& s, const Batch& b, bool training) {
  UnitContext ctx;
  ctx.training = training;
  ctx.grad_scale = 1.0f / static_cast<float>(b.x.size());
  s.forward(0, nullptr, MicroBatch{b.x.data(), b.y.data()}, ctx);
  return ctx.loss_sum / static_cast<double>(ctx.loss_count);
}

class ModelVariants : public ::testing::TestWithParam<std::tuple<Activation, bool>> {};

TEST_P(ModelVariants, Fp32LossMatchesFloat64Reference) {
  const auto [act, tied] = GetParam();
  const ModelConfig m = tiny(act, tied);
  const int B = 2;
  Stage s(m, 0, n_units(m), B, 1);
  randomize(s, 3);
  const Batch b = random_batch(m, B, 5);
  const double fp32 = stage_loss(s, b, false);
  testing::ReferenceGPT ref(m, s);
  const double f64 = ref.loss(b.x, b.y, B);
  EXPECT_NEAR(fp32, f64, 1e-5 * std::abs(f64)) << "fp32 " << fp32 << " float64 " << f64;
  // The training-mode forward reports the same loss.
  EXPECT_EQ(stage_loss(s, b, true), fp32);
}

TEST_P(ModelVariants, GradientMatchesCentralDifferencesOfFloat64Reference) {
  const auto [act, tied] = GetParam();
  const ModelConfig m = tiny(act, tied);
  const int B = 2;
  Stage s(m, 0, n_units(m), B, 1);
  randomize(s, 11);
  const Batch b = random_batch(m, B, 13);
  s.zero_grads();
  UnitContext ctx;
  ctx.grad_scale = 1.0f / static_cast<float>(b.x.size());
  const MicroBatch mb{b.x.data(), b.y.data()};
  s.forward(0, nullptr, mb, ctx);
  s.backward(0, nullptr, mb, ctx);

  testing::ReferenceGPT ref(m, s);
  double gmax = 0;
  for (size_t i = 0; i < s.num_params(); ++i) gmax = std::max(gmax, std::abs(double(s.grads()[i])));
  ASSERT_GT(gmax, 1e-4);
  std::mt19937 rng(17);
  const double h = 1e-5;
  int checked = 0;
  for (const auto& p : s.param_table()) {
    // A few elements of every tensor, always including its first and last.
    std::vector<size_t> idx = {0, p.numel - 1};
    std::uniform_int_distribution<size_t> pick(0, p.numel - 1);
    for (int k = 0; k < 6; ++k) idx.push_back(pick(rng));
    auto& w = ref.tensor(p.name);
    for (size_t i : idx) {
      const double orig = w[i];
      w[i] = orig + h;
      const double lp = ref.loss(b.x, b.y, B);
      w[i] = orig - h;
      const double lm = ref.loss(b.x, b.y, B);
      w[i] = orig;
      const double fd = (lp - lm) / (2 * h);
      const double an = s.grads()[p.offset + i];
      EXPECT_NEAR(an, fd, 2e-3 * std::abs(fd) + 2e-4 * gmax) << p.name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 100);
}

INSTANTIATE_TEST_SUITE_P(All, ModelVariants,
                         ::testing::Combine(::testing::Values(Activation::ReLU, Activation::GELU),
                                            ::testing::Bool()));

// Forward/backward through two stages [0, k) and [k, L+2) equals the single stage, bitwise.
TEST(Stages, SplitModelEqualsWholeModelBitwise) {
  const ModelConfig m = tiny();
  const int B = 2, U = n_units(m);
  const Batch b = random_batch(m, B, 21);
  Stage whole(m, 0, U, B, 1);
  whole.init_params(m.seed);
  whole.zero_grads();
  UnitContext c0;
  c0.grad_scale = 0.25f;
  const MicroBatch mb{b.x.data(), b.y.data()};
  whole.forward(0, nullptr, mb, c0);
  whole.backward(0, nullptr, mb, c0);

  for (int k = 1; k < U; ++k) {
    Stage a(m, 0, k, B, 1), z(m, k, U, B, 1);
    a.init_params(m.seed);
    z.init_params(m.seed);
    ASSERT_EQ(a.num_params() + z.num_params(), whole.num_params());
    // Initialisation does not depend on the cut.
    for (size_t i = 0; i < a.num_params(); ++i) ASSERT_EQ(a.params()[i], whole.params()[i]);
    for (size_t i = 0; i < z.num_params(); ++i) ASSERT_EQ(z.params()[i], whole.params()[a.num_params() + i]);
    a.zero_grads();
    z.zero_grads();
    UnitContext ca, cz;
    cz.grad_scale = 0.25f;
    a.forward(0, nullptr, mb, ca);
    z.forward(0, a.output(0), mb, cz);
    EXPECT_EQ(cz.loss_sum, c0.loss_sum) << "cut at unit " << k;
    z.backward(0, nullptr, mb, cz);
    a.backward(0, z.input_grad(), mb, ca);
    for (size_t i = 0; i < a.num_params(); ++i) ASSERT_EQ(a.grads()[i], whole.grads()[i]) << k;
    for (size_t i = 0; i < z.num_params(); ++i)
      ASSERT_EQ(z.grads()[i], whole.grads()[a.num_params() + i]) << k;
  }
}

TEST(Stages, TiedEmbeddingsNeedEmbeddingAndHeadOnOneStage) {
  const ModelConfig m = tiny(Activation::ReLU, true);
  EXPECT_THROW({ Stage s(m, 0, 2, 1, 1); }, Error);
  EXPECT_NO_THROW({ Stage s(m, 0, n_units(m), 1, 1); });
}

TEST(Model, ParameterCountAndFlops) {
  ModelConfig m;  // 6 layers, 384, vocab 65, context 256
  Stage s(m, 0, n_units(m), 1, 1);
  const size_t C = 384, L = 6, V = 65, T = 256;
  const size_t block = 2 * C + 3 * C * C + C * C + C + 2 * C + 4 * C * C + 4 * C + 4 * C * C + C;
  EXPECT_EQ(s.num_params(), V * C + T * C + L * block + 2 * C + V * C + V);
  EXPECT_DOUBLE_EQ(train_flops_per_token(m), 6.0 * (L * 12.0 * C * C + V * C) + 12.0 * L * C * T);
}

std::vector<double> train_steps(const ModelConfig& m, int B, int steps, const Batch& b, int threads,
                                std::vector<float>* final_params = nullptr) {
  omp_set_num_threads(threads);
  Stage s(m, 0, n_units(m), B, 1);
  s.init_params(m.seed);
  AdamW opt(s.num_params(), AdamWHyper{0.9, 0.999, 1e-8, 0.01});
  std::vector<double> losses;
  for (int i = 0; i < steps; ++i) {
    s.zero_grads();
    UnitContext ctx;
    ctx.grad_scale = 1.0f / static_cast<float>(b.x.size());
    const MicroBatch mb{b.x.data(), b.y.data()};
    s.forward(0, nullptr, mb, ctx);
    s.backward(0, nullptr, mb, ctx);
    losses.push_back(ctx.loss_sum / static_cast<double>(ctx.loss_count));
    clip_by_norm(s.grads(), s.num_params(), sum_squares(s.grads(), s.num_params()), 1.0);
    opt.step(s.params(), s.grads(), lr_at(i, 1e-2, 10, steps, 0.1));
  }
  if (final_params) final_params->assign(s.params(), s.params() + s.num_params());
  omp_set_num_threads(2);
  return losses;
}

TEST(Training, OverfitsOneFixedBatch) {
  ModelConfig m = tiny();
  m.n_embd = 32;
  m.block_size = 16;
  m.vocab_size = 32;
  const Batch b = random_batch(m, 4, 99);
  const auto losses = train_steps(m, 4, 300, b, 2);
  EXPECT_GT(losses.front(), 3.0);
  EXPECT_LT(losses.back(), 0.05);
}

TEST(Training, BitIdenticalAcrossRunsAndThreadCounts) {
  ModelConfig m = tiny();
  m.n_embd = 64;
  m.n_head = 4;
  m.block_size = 32;
  const Batch b = random_batch(m, 4, 3);
  std::vector<float> p1, p2, p3;
  const auto l1 = train_steps(m, 4, 6, b, 2, &p1);
  const auto l2 = train_steps(m, 4, 6, b, 2, &p2);
  const auto l3 = train_steps(m, 4, 6, b, 1, &p3);
  EXPECT_EQ(l1, l2);
  EXPECT_EQ(p1, p2);
  EXPECT_EQ(l1, l3);
  EXPECT_EQ(p1, p3);
}

TEST(AdamW, MatchesHandDerivedSequence) {
  // Three steps on two parameters with fixed gradients, computed here in double from the
  // PyTorch AdamW update rule.
  const double lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
  AdamW opt(2, AdamWHyper{b1, b2, eps, wd});
  std::vector<float> w = {1.0f, -2.0f};
  const std::vector<std::vector<float>> gs = {{0.5f, -1.0f}, {0.25f, 2.0f}, {-0.5f, 0.0f}};
  double we[2] = {1.0, -2.0}, m[2] = {0, 0}, v[2] = {0, 0};
  for (int t = 1; t <= 3; ++t) {
    opt.step(w.data(), gs[t - 1].data(), lr);
    for (int i = 0; i < 2; ++i) {
      const double g = gs[t - 1][i];
      we[i] *= 1 - lr * wd;
      m[i] = b1 * m[i] + (1 - b1) * g;
      v[i] = b2 * v[i] + (1 - b2) * g * g;
      const double mh = m[i] / (1 - std::pow(b1, t)), vh = v[i] / (1 - std::pow(b2, t));
      we[i] -= lr * mh / (std::sqrt(vh) + eps);
      EXPECT_NEAR(w[i], we[i], 1e-6) << "step " << t << " param " << i;
    }
  }
  EXPECT_EQ(opt.step_count(), 3);
}

TEST(LrSchedule, WarmupThenCosineToMinimum) {
  const double lr = 1.0;
  EXPECT_DOUBLE_EQ(lr_at(0, lr, 10, 110, 0.1), 0.1);
  EXPECT_DOUBLE_EQ(lr_at(9, lr, 10, 110, 0.1), 1.0);
  EXPECT_DOUBLE_EQ(lr_at(10, lr, 10, 110, 0.1), 1.0);
  EXPECT_NEAR(lr_at(60, lr, 10, 110, 0.1), 0.55, 1e-12);  // half way: mean of max and min
  EXPECT_NEAR(lr_at(110, lr, 10, 110, 0.1), 0.1, 1e-12);
  for (int s = 11; s <= 110; ++s) EXPECT_LE(lr_at(s, lr, 10, 110, 0.1), lr_at(s - 1, lr, 10, 110, 0.1));
}

TEST(GradClip, ScalesToMaxNormLikePyTorch) {
  std::vector<float> g = {3.0f, 4.0f};
  const double norm = clip_by_norm(g.data(), 2, sum_squares(g.data(), 2), 1.0);
  EXPECT_DOUBLE_EQ(norm, 5.0);
  EXPECT_NEAR(g[0], 3.0 / (5.0 + 1e-6), 1e-7);
  EXPECT_NEAR(g[1], 4.0 / (5.0 + 1e-6), 1e-7);
  std::vector<float> small = {0.3f, 0.4f};
  clip_by_norm(small.data(), 2, sum_squares(small.data(), 2), 1.0);
  EXPECT_EQ(small[0], 0.3f);  // below the threshold: untouched
  // Deterministic sum over a buffer larger than one chunk.
  std::vector<float> big(300000, 0.5f);
  EXPECT_DOUBLE_EQ(sum_squares(big.data(), big.size()), 75000.0);
}

}  // namespace
}  // namespace pipenag
