// Optimizers (src/optim/optimizer.h): every update rule against a multi-step sequence derived by
// hand in double; adamw, nadamw, sgd and nag against PyTorch's own optimizers
// (tests/optim_reference/torch_vectors.json, written by generate.py next to it); nag-delay against
// Eq. 10 run directly on a delayed quadratic; schedules, state, thread-count invariance, errors.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "optim/adamw.h"
#include "optim/optimizer.h"
#include "test_util.h"
#include "util/error.h"

namespace pipenag {
namespace {

using testutil::error_of;

OptimizerSettings settings(const std::string& name) {
  OptimizerSettings s;
  s.name = name;
  return s;
}

// |actual - expected| <= rel * |expected| + abs_floor.
void expect_close(double actual, double expected, const std::string& what, double rel = 1e-6,
                  double abs_floor = 1e-9) {
  EXPECT_LE(std::fabs(actual - expected), rel * std::fabs(expected) + abs_floor)
      << what << ": got " << actual << ", expected " << expected;
}

std::vector<float>* state(Optimizer& o, const std::string& name) {
  for (auto& [n, p] : o.state_tensors())
    if (n == name) return p;
  ADD_FAILURE() << o.name() << " has no state tensor " << name;
  static std::vector<float> none;
  return &none;
}

double* scalar(Optimizer& o, const std::string& name) {
  for (auto& [n, p] : o.state_scalars())
    if (n == name) return p;
  ADD_FAILURE() << o.name() << " has no state scalar " << name;
  static double none = 0;
  return &none;
}

// ------------------------------------------------------------------------------------------------
// Hand-derived sequences: 3 parameters, 4 steps, varying lr, decoupled weight decay.

const std::vector<std::vector<double>> kGrads = {
    {0.5, -0.25, 0.125}, {0.3, 0.1, -0.4}, {-0.2, 0.35, 0.05}, {0.45, -0.15, 0.3}};
const std::vector<double> kLrs = {0.01, 0.02, 0.03, 0.025};
const std::vector<double> kW0 = {1.0, -0.5, 0.25};

// Runs `o` over kGrads/kLrs (gradients times grad_scale) and, after every step, compares w and
// the named state tensors with the double reference: ref(t, lr, g, w) makes step t (1-based) on
// w and on the reference state that ref_state points at.
using RefStep = std::function<void(int t, double lr, const std::vector<double>& g,
                                   std::vector<double>& w)>;

void run_hand(Optimizer& o, const RefStep& ref,
              const std::vector<std::pair<std::string, std::vector<double>*>>& ref_state,
              float grad_scale = 1.0f) {
  std::vector<float> w(kW0.begin(), kW0.end());
  std::vector<double> wr = kW0;
  for (size_t t = 0; t < kGrads.size(); ++t) {
    std::vector<float> g(kGrads[t].begin(), kGrads[t].end());
    std::vector<double> gr(3);
    for (int i = 0; i < 3; ++i) gr[i] = static_cast<double>(g[i]) * grad_scale;
    o.step(w.data(), g.data(), kLrs[t], grad_scale);
    ref(static_cast<int>(t) + 1, kLrs[t], gr, wr);
    EXPECT_EQ(o.step_count(), static_cast<int64_t>(t) + 1);
    for (int i = 0; i < 3; ++i) {
      const std::string at = std::string(o.name()) + " step " + std::to_string(t + 1) + " [" +
                             std::to_string(i) + "]";
      expect_close(w[i], wr[i], "w " + at);
      for (auto& [name, vals] : ref_state) expect_close((*state(o, name))[i], (*vals)[i], name + " " + at);
    }
  }
}

TEST(OptimHand, Sgd) {
  OptimizerSettings s = settings("sgd");
  s.beta1 = 0.9;
  s.weight_decay = 0.1;
  auto o = make_optimizer(s, 3);
  std::vector<double> b(3, 0.0);
  run_hand(*o, [&](int t, double lr, const std::vector<double>& g, std::vector<double>& w) {
    for (int i = 0; i < 3; ++i) {
      w[i] *= 1 - lr * 0.1;
      b[i] = t == 1 ? g[i] : 0.9 * b[i] + g[i];
      w[i] -= lr * b[i];
    }
  }, {{"momentum_buffer", &b}});
  EXPECT_EQ(o->momentum(), 0.9);
}

TEST(OptimHand, Nag) {
  OptimizerSettings s = settings("nag");
  s.beta1 = 0.8;
  s.weight_decay = 0.05;
  auto o = make_optimizer(s, 3);
  std::vector<double> b(3, 0.0);
  run_hand(*o, [&](int t, double lr, const std::vector<double>& g, std::vector<double>& w) {
    for (int i = 0; i < 3; ++i) {
      w[i] *= 1 - lr * 0.05;
      b[i] = t == 1 ? g[i] : 0.8 * b[i] + g[i];
      w[i] -= lr * (g[i] + 0.8 * b[i]);
    }
  }, {{"momentum_buffer", &b}}, 0.75f);
  EXPECT_EQ(o->momentum(), 0.8);
}

TEST(OptimHand, AdamW) {
  OptimizerSettings s = settings("adamw");
  s.beta1 = 0.9;
  s.beta2 = 0.99;
  s.eps = 1e-3;  // large enough to matter
  s.weight_decay = 0.1;
  auto o = make_optimizer(s, 3);
  std::vector<double> m(3, 0.0), v(3, 0.0);
  run_hand(*o, [&](int t, double lr, const std::vector<double>& g, std::vector<double>& w) {
    for (int i = 0; i < 3; ++i) {
      w[i] *= 1 - lr * 0.1;
      m[i] = 0.9 * m[i] + 0.1 * g[i];
      v[i] = 0.99 * v[i] + 0.01 * g[i] * g[i];
      const double mhat = m[i] / (1 - std::pow(0.9, t)), vhat = v[i] / (1 - std::pow(0.99, t));
      w[i] -= lr * mhat / (std::sqrt(vhat) + 1e-3);
    }
  }, {{"exp_avg", &m}, {"exp_avg_sq", &v}});
  EXPECT_EQ(o->momentum(), 0.9);
}

TEST(OptimHand, NAdamW) {
  OptimizerSettings s = settings("nadamw");
  s.beta1 = 0.9;
  s.beta2 = 0.99;
  s.eps = 1e-3;
  s.weight_decay = 0.1;
  s.momentum_decay = 2.0;  // a fast ramp: mu_t changes a lot over 4 steps
  auto o = make_optimizer(s, 3);
  std::vector<double> m(3, 0.0), v(3, 0.0);
  double prod = 1.0, last_mu = 0.0;
  auto mu = [](int t) { return 0.9 * (1 - 0.5 * std::pow(0.96, t * 2.0)); };
  run_hand(*o, [&](int t, double lr, const std::vector<double>& g, std::vector<double>& w) {
    const double mu_t = mu(t), mu_next = mu(t + 1);
    prod *= mu_t;
    last_mu = mu_t;
    for (int i = 0; i < 3; ++i) {
      w[i] *= 1 - lr * 0.1;
      m[i] = 0.9 * m[i] + 0.1 * g[i];
      v[i] = 0.99 * v[i] + 0.01 * g[i] * g[i];
      const double denom = std::sqrt(v[i] / (1 - std::pow(0.99, t))) + 1e-3;
      w[i] -= lr * (1 - mu_t) / (1 - prod) * g[i] / denom;
      w[i] -= lr * mu_next / (1 - prod * mu_next) * m[i] / denom;
    }
  }, {{"exp_avg", &m}, {"exp_avg_sq", &v}});
  EXPECT_DOUBLE_EQ(o->momentum(), last_mu);
  expect_close(*scalar(*o, "mu_product"), prod, "mu_product", 1e-6, 0.0);  // kept as a float32
}

// nag-delay's look-ahead form, written as the header states it, for a constant gamma.
TEST(OptimHand, NagDelay) {
  OptimizerSettings s = settings("nag-delay");
  s.gamma = 0.9;
  s.weight_decay = 0.1;
  auto o = make_optimizer(s, 3);
  std::vector<double> m(3, 0.0);
  run_hand(*o, [&](int, double lr, const std::vector<double>& g, std::vector<double>& y) {
    for (int i = 0; i < 3; ++i) {
      y[i] *= 1 - lr * 0.1;
      m[i] = 0.9 * m[i] + 0.1 * g[i];
      y[i] -= lr * (0.9 * m[i] + 0.1 * g[i]);
    }
  }, {{"momentum", &m}});
  EXPECT_EQ(o->momentum(), 0.9);
}

TEST(OptimHand, NagDelayAdaptive) {
  OptimizerSettings s = settings("nag-delay");
  s.gamma = 0.8;
  s.adaptive = true;
  s.beta2 = 0.99;
  s.eps = 1e-3;
  s.weight_decay = 0.1;
  auto o = make_optimizer(s, 3);
  std::vector<double> m(3, 0.0), v(3, 0.0);
  run_hand(*o, [&](int t, double lr, const std::vector<double>& g, std::vector<double>& y) {
    for (int i = 0; i < 3; ++i) {
      y[i] *= 1 - lr * 0.1;
      m[i] = 0.8 * m[i] + 0.2 * g[i];
      v[i] = 0.99 * v[i] + 0.01 * g[i] * g[i];
      const double vhat = v[i] / (1 - std::pow(0.99, t));
      y[i] -= lr * (0.8 * m[i] + 0.2 * g[i]) / (std::sqrt(vhat) + 1e-3);
    }
  }, {{"momentum", &m}, {"exp_avg_sq", &v}}, 0.5f);
}

// With the theory's schedule the look-ahead term takes gamma_{t+1} (see optimizer.h).
TEST(OptimHand, NagDelayGammaTheory) {
  OptimizerSettings s = settings("nag-delay");
  s.gamma_theory = true;
  s.weight_decay = 0.0;
  auto o = make_optimizer(s, 3);
  std::vector<double> m(3, 0.0);
  auto gam = [](int t) { return std::max(0.0, (t - 2.0) / t); };
  run_hand(*o, [&](int t, double lr, const std::vector<double>& g, std::vector<double>& y) {
    for (int i = 0; i < 3; ++i) {
      m[i] = gam(t) * m[i] + (1 - gam(t)) * g[i];
      y[i] -= lr * (gam(t + 1) * m[i] + (1 - gam(t)) * g[i]);
    }
  }, {{"momentum", &m}});
}

// ------------------------------------------------------------------------------------------------
// PyTorch reference trajectories.

TEST(OptimTorch, MatchesTorchOptimizers) {
  const std::filesystem::path path =
      std::filesystem::path(PIPENAG_SOURCE_DIR) / "tests/optim_reference/torch_vectors.json";
  std::ifstream f(path);
  ASSERT_TRUE(f.good()) << "missing " << path
                        << " (run /usr/bin/python3 tests/optim_reference/generate.py)";
  const nlohmann::json j = nlohmann::json::parse(f);
  ASSERT_TRUE(j.contains("torch_version"));
  RecordProperty("torch_version", j["torch_version"].get<std::string>());
  const bool torch_fuses = j.value("torch_fuses_multiply_add", false);
#if defined(__FMA__)
  const bool kFma = true;
#else
  const bool kFma = false;
#endif
  std::printf("[ torch    ] vectors from torch %s (%s kernels, fused multiply-add %s), FMA here: %s\n",
              j["torch_version"].get<std::string>().c_str(),
              j.value("torch_cpu_capability", std::string("?")).c_str(), torch_fuses ? "yes" : "no",
              kFma ? "yes" : "no");
  const auto& cases = j.at("cases");
  ASSERT_GE(cases.size(), 5u);
  std::vector<std::string> seen;
  for (const auto& c : cases) {
    const std::string cname = c.at("name");
    SCOPED_TRACE(cname);
    const auto& js = c.at("settings");
    OptimizerSettings s = settings(c.at("optimizer"));
    s.beta1 = js.at("beta1");
    s.beta2 = js.value("beta2", 0.999);
    s.eps = js.value("eps", 1e-8);
    s.weight_decay = js.at("weight_decay");
    s.momentum_decay = js.value("momentum_decay", 0.004);
    seen.push_back(s.name);
    std::vector<float> w = c.at("w0").get<std::vector<float>>();
    const size_t n = w.size();
    auto o = make_optimizer(s, n);
    const float grad_scale = static_cast<float>(c.at("grad_scale").get<double>());
    const auto& grads = c.at("grads");
    const auto& lrs = c.at("lrs");
    const auto& expected = c.at("expected");
    ASSERT_EQ(grads.size(), expected.size());
    ASSERT_GE(expected.size(), 10u);
    size_t compared = 0, bit_equal = 0;
    double worst = 0;
    for (size_t t = 0; t < expected.size(); ++t) {
      const std::vector<float> g = grads[t].get<std::vector<float>>();
      ASSERT_EQ(g.size(), n);
      o->step(w.data(), g.data(), lrs[t].get<double>(), grad_scale);
      const auto& e = expected[t];
      for (const auto& [key, val] : e.items()) {
        if (key == "mu_product") {
          // torch's float32 product, to the bit
          EXPECT_EQ(*scalar(*o, key), val.get<double>()) << "mu_product step " << t + 1;
          continue;
        }
        const std::vector<float>* mine = key == "w" ? &w : state(*o, key);
        const std::vector<double> ref = val.get<std::vector<double>>();
        ASSERT_EQ(mine->size(), ref.size()) << key;
        double scale = 0;
        for (double r : ref) scale = std::max(scale, std::fabs(r));
        for (size_t i = 0; i < n; ++i) {
          // 1e-6 relative to the element, or to its tensor's largest element where the element
          // is much smaller (an average whose terms cancelled keeps their rounding errors).
          expect_close((*mine)[i], ref[i],
                       key + " step " + std::to_string(t + 1) + " [" + std::to_string(i) + "]",
                       1e-6, 1e-6 * scale);
          worst = std::max(worst, std::fabs((*mine)[i] - ref[i]) / std::max(std::fabs(ref[i]), scale));
          ++compared;
          bit_equal += (*mine)[i] == static_cast<float>(ref[i]);
        }
      }
    }
    std::printf("[ torch    ] %-22s %3zu/%zu values bit-equal, largest difference %.2g\n",
                cname.c_str(), bit_equal, compared, worst);
    // sgd, nag and nadamw perform torch's own roundings (optimizer.cpp), fused where torch's
    // kernels fuse: on a CPU with FMA, against vectors from a torch that fuses, every bit agrees.
    // (adamw keeps the class AdamW arithmetic, which rounds differently from torch.)
    if (s.name != "adamw" && torch_fuses && kFma) {
      EXPECT_EQ(bit_equal, compared) << "not torch's bits";
    }
  }
  for (const char* need : {"adamw", "nadamw", "sgd", "nag"})
    EXPECT_NE(std::find(seen.begin(), seen.end(), need), seen.end()) << "no torch case for " << need;
}

// pipenag's adamw and the class AdamW (optim/adamw.h) that existing checkpoints came from.
TEST(OptimAdamW, SameBitsAsClassAdamW) {
  const size_t n = 1003;
  OptimizerSettings s = settings("adamw");
  s.beta1 = 0.85;
  s.beta2 = 0.995;
  s.eps = 1e-7;
  s.weight_decay = 0.05;
  auto o = make_optimizer(s, n);
  AdamW ref(n, AdamWHyper{0.85, 0.995, 1e-7, 0.05});
  std::vector<float> w(n), wr(n), g(n);
  for (size_t i = 0; i < n; ++i) w[i] = wr[i] = std::sin(0.37 * static_cast<double>(i));
  for (int t = 0; t < 6; ++t) {
    for (size_t i = 0; i < n; ++i) g[i] = std::cos(0.11 * static_cast<double>(i * (t + 1))) * 0.3f;
    const double lr = 1e-3 * (t + 1);
    const float scale = t % 2 ? 0.6f : 1.0f;
    o->step(w.data(), g.data(), lr, scale);
    ref.step(wr.data(), g.data(), lr, scale);
  }
  EXPECT_EQ(std::memcmp(w.data(), wr.data(), n * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(state(*o, "exp_avg")->data(), ref.m().data(), n * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(state(*o, "exp_avg_sq")->data(), ref.v().data(), n * sizeof(float)), 0);
  EXPECT_EQ(o->step_count(), ref.step_count());
}

// ------------------------------------------------------------------------------------------------
// nag-delay is Eq. 10: with g_t = grad f(y_{t-tau}), the look-ahead iterate it stores is w_t + d_t.

void check_eq10(bool theory) {
  // f(x) = x'Ax/2, eigenvalues 100 and 1 along the diagonals (condition number 100).
  const double A[2][2] = {{50.5, 49.5}, {49.5, 50.5}};
  const double L = 100.0, eta = 1.0 / L, gamma = 0.9;
  const int tau = 2, steps = 50;
  auto grad = [&](const std::array<double, 2>& x) {
    return std::array<double, 2>{A[0][0] * x[0] + A[0][1] * x[1], A[1][0] * x[0] + A[1][1] * x[1]};
  };
  // The optimizer's gamma at its 1-based step k; Eq. 10's index t = k - 1.
  auto gam = [&](int k) { return theory ? std::max(0.0, (k - 2.0) / k) : gamma; };
  const std::array<double, 2> w0 = {1.0, -0.5};

  // Eq. 10 in double; w_{-1} = w_0, so d_0 = 0; wbar_t + dbar_t = w_0 for t < tau.
  std::vector<std::array<double, 2>> W(steps + 2), D(steps + 2);  // W[t + 1] = w_t
  auto w_at = [&](int t) -> std::array<double, 2>& { return W[t + 1]; };
  w_at(-1) = w0;
  w_at(0) = w0;
  auto y_at = [&](int t) {
    if (t < 0) return w0;
    return std::array<double, 2>{w_at(t)[0] + D[t][0], w_at(t)[1] + D[t][1]};
  };
  for (int t = 0; t < steps; ++t) {
    const double gt = gam(t + 1);
    for (int i = 0; i < 2; ++i) D[t][i] = gt * (w_at(t)[i] - w_at(t - 1)[i]);
    const auto G = grad(y_at(t - tau));
    for (int i = 0; i < 2; ++i) w_at(t + 1)[i] = w_at(t)[i] + D[t][i] - eta * (1 - gt) * G[i];
  }
  for (int i = 0; i < 2; ++i) D[steps][i] = gam(steps + 1) * (w_at(steps)[i] - w_at(steps - 1)[i]);

  OptimizerSettings s = settings("nag-delay");
  s.gamma = gamma;
  s.gamma_theory = theory;
  s.weight_decay = 0.0;
  auto o = make_optimizer(s, 2);
  std::vector<std::array<float, 2>> Y = {{static_cast<float>(w0[0]), static_cast<float>(w0[1])}};
  std::array<float, 2> y = Y[0];
  double moved = 0;
  for (int k = 1; k <= steps; ++k) {
    const int src = k - 1 - tau;  // the gradient applied at step k is that of y_{k-1-tau}
    const std::array<double, 2> ys =
        src < 0 ? w0 : std::array<double, 2>{Y[src][0], Y[src][1]};
    const auto gd = grad(ys);
    const float g[2] = {static_cast<float>(gd[0]), static_cast<float>(gd[1])};
    o->step(y.data(), g, eta);
    Y.push_back(y);
    const auto ref = y_at(k);
    for (int i = 0; i < 2; ++i) {
      EXPECT_NEAR(y[i], ref[i], 1e-5) << "step " << k << " [" << i << "]";
      moved = std::max(moved, std::fabs(ref[i] - w0[i]));
    }
    EXPECT_DOUBLE_EQ(o->momentum(), gam(k));
  }
  EXPECT_GT(moved, 0.3);  // the trajectory is not trivial
}

TEST(OptimNagDelay, LookAheadFormIsEq10ConstantGamma) { check_eq10(false); }
TEST(OptimNagDelay, LookAheadFormIsEq10TheorySchedule) { check_eq10(true); }

// ------------------------------------------------------------------------------------------------
// Schedules, momentum(), state, step counts.

TEST(OptimSchedule, GammaTheory) {
  OptimizerSettings s = settings("nag-delay");
  s.gamma_theory = true;
  auto o = make_optimizer(s, 4);
  EXPECT_EQ(o->momentum(), 0.0);
  std::vector<float> w(4, 1.0f), g(4, 0.5f);
  const double expect[] = {0.0, 0.0, 1.0 / 3, 0.5, 0.6, 2.0 / 3, 5.0 / 7};
  for (double e : expect) {
    o->step(w.data(), g.data(), 0.01);
    EXPECT_DOUBLE_EQ(o->momentum(), e) << "step " << o->step_count();
  }
  o->set_step_count(99);
  EXPECT_DOUBLE_EQ(o->momentum(), 97.0 / 99);
  // A constant gamma is reported as is.
  s.gamma_theory = false;
  s.gamma = 0.95;
  auto c = make_optimizer(s, 4);
  EXPECT_EQ(c->momentum(), 0.95);
  c->step(w.data(), g.data(), 0.01);
  EXPECT_EQ(c->momentum(), 0.95);
}

TEST(OptimSchedule, NAdamMu) {
  OptimizerSettings s = settings("nadamw");
  s.beta1 = 0.99;
  auto o = make_optimizer(s, 2);
  EXPECT_EQ(o->momentum(), 0.0);
  std::vector<float> w(2, 1.0f), g(2, 0.5f);
  double prod = 1;
  float prod_f = 1;
  for (int t = 1; t <= 5; ++t) {
    o->step(w.data(), g.data(), 1e-3);
    const double mu = 0.99 * (1 - 0.5 * std::pow(0.96, t * 0.004));
    prod *= mu;
    EXPECT_DOUBLE_EQ(o->momentum(), mu);
    // torch's float32 running product: float(P * float(mu)).
    prod_f = static_cast<float>(prod_f * static_cast<float>(mu));
    EXPECT_EQ(*scalar(*o, "mu_product"), static_cast<double>(prod_f));
    expect_close(*scalar(*o, "mu_product"), prod, "mu_product", 1e-6, 0.0);
  }
  EXPECT_NEAR(o->momentum(), 0.495, 0.001);  // about 0.5 at the start (PAPER.md)
  o->set_step_count(10000);
  EXPECT_NEAR(o->momentum(), 0.99 * (1 - 0.5 * std::pow(0.96, 40.0)), 1e-15);
  EXPECT_NEAR(o->momentum(), 0.89, 0.01);  // about 0.89 at 10k steps
}

TEST(OptimSchedule, ConstantMomenta) {
  for (const char* name : {"sgd", "nag", "adamw"}) {
    OptimizerSettings s = settings(name);
    s.beta1 = 0.7;
    auto o = make_optimizer(s, 2);
    std::vector<float> w(2, 1.0f), g(2, 0.5f);
    EXPECT_EQ(o->momentum(), 0.7) << name;
    o->step(w.data(), g.data(), 1e-2);
    EXPECT_EQ(o->momentum(), 0.7) << name;
  }
  OptimizerSettings s = settings("sgd");
  s.beta1 = 0.0;
  EXPECT_EQ(make_optimizer(s, 1)->momentum(), 0.0);
}

TEST(OptimState, NamesSizesAndScalars) {
  struct Want {
    std::string name;
    bool adaptive;
    std::vector<std::string> tensors, scalars;
  };
  const std::vector<Want> wants = {
      {"sgd", false, {"momentum_buffer"}, {}},
      {"nag", false, {"momentum_buffer"}, {}},
      {"adamw", false, {"exp_avg", "exp_avg_sq"}, {}},
      {"nadamw", false, {"exp_avg", "exp_avg_sq"}, {"mu_product"}},
      {"nag-delay", false, {"momentum"}, {}},
      {"nag-delay", true, {"momentum", "exp_avg_sq"}, {}},
  };
  for (const auto& want : wants) {
    OptimizerSettings s = settings(want.name);
    s.adaptive = want.adaptive;
    auto o = make_optimizer(s, 17);
    EXPECT_EQ(o->name(), want.name);
    EXPECT_EQ(o->size(), 17u);
    EXPECT_EQ(o->step_count(), 0);
    std::vector<std::string> names;
    for (auto& [n, p] : o->state_tensors()) {
      names.push_back(n);
      ASSERT_NE(p, nullptr);
      EXPECT_EQ(p->size(), 17u) << want.name << " " << n;
      EXPECT_TRUE(std::all_of(p->begin(), p->end(), [](float x) { return x == 0.0f; }));
    }
    EXPECT_EQ(names, want.tensors) << want.name;
    std::vector<std::string> snames;
    for (auto& [n, p] : o->state_scalars()) {
      snames.push_back(n);
      EXPECT_EQ(*p, 1.0) << n;  // mu_product starts at 1
    }
    EXPECT_EQ(snames, want.scalars) << want.name;
    std::vector<float> w(17, 1.0f), g(17, 0.25f);
    for (int t = 1; t <= 3; ++t) {
      o->step(w.data(), g.data(), 1e-2);
      EXPECT_EQ(o->step_count(), t);
    }
  }
  EXPECT_EQ(optimizer_names(),
            (std::vector<std::string>{"sgd", "nag", "adamw", "nadamw", "nag-delay"}));
}

// A checkpoint is the state tensors, the scalars and the step count: restoring them into a fresh
// optimizer continues with the same bits.
TEST(OptimState, RestoreContinuesBitForBit) {
  const size_t n = 257;
  for (const std::string& name : optimizer_names()) {
    for (bool adaptive : {false, true}) {
      if (adaptive && name != "nag-delay") continue;
      OptimizerSettings s = settings(name);
      s.adaptive = adaptive;
      s.gamma_theory = adaptive;  // exercise the schedule too
      auto a = make_optimizer(s, n);
      std::vector<float> w(n), g(n);
      for (size_t i = 0; i < n; ++i) w[i] = std::sin(0.1 * static_cast<double>(i));
      auto grads = [&](int t) {
        for (size_t i = 0; i < n; ++i) g[i] = std::cos(0.07 * static_cast<double>(i) + t);
      };
      for (int t = 0; t < 3; ++t) {
        grads(t);
        a->step(w.data(), g.data(), 1e-2);
      }
      auto b = make_optimizer(s, n);
      b->set_step_count(a->step_count());
      auto ta = a->state_tensors(), tb = b->state_tensors();
      for (size_t k = 0; k < ta.size(); ++k) *tb[k].second = *ta[k].second;
      auto sa = a->state_scalars(), sb = b->state_scalars();
      for (size_t k = 0; k < sa.size(); ++k) *sb[k].second = *sa[k].second;
      std::vector<float> wb = w;
      for (int t = 3; t < 6; ++t) {
        grads(t);
        a->step(w.data(), g.data(), 1e-2);
        b->step(wb.data(), g.data(), 1e-2);
      }
      EXPECT_EQ(std::memcmp(w.data(), wb.data(), n * sizeof(float)), 0) << name;
      EXPECT_EQ(a->momentum(), b->momentum()) << name;
    }
  }
}

// Every element's bits depend only on its own inputs: 1 and 2 threads agree exactly.
TEST(OptimThreads, SameBitsForAnyThreadCount) {
  const size_t n = 10007;  // not a multiple of any vector width
  const int saved = omp_get_max_threads();
  for (const std::string& name : optimizer_names()) {
    for (bool adaptive : {false, true}) {
      if (adaptive && name != "nag-delay") continue;
      OptimizerSettings s = settings(name);
      s.adaptive = adaptive;
      std::vector<std::vector<float>> results;
      for (int threads : {1, 2}) {
        omp_set_num_threads(threads);
        auto o = make_optimizer(s, n);
        std::vector<float> w(n), g(n);
        for (size_t i = 0; i < n; ++i) w[i] = std::sin(0.013 * static_cast<double>(i));
        for (int t = 0; t < 5; ++t) {
          for (size_t i = 0; i < n; ++i)
            g[i] = std::cos(0.029 * static_cast<double>(i) * (t + 1)) * (i % 5 ? 1.0f : 1e-4f);
          o->step(w.data(), g.data(), 1e-2 * (t + 1), t == 2 ? 0.5f : 1.0f);
        }
        std::vector<float> all = w;
        for (auto& [nm, p] : o->state_tensors()) all.insert(all.end(), p->begin(), p->end());
        results.push_back(std::move(all));
      }
      ASSERT_EQ(results[0].size(), results[1].size());
      EXPECT_EQ(std::memcmp(results[0].data(), results[1].data(), results[0].size() * sizeof(float)), 0)
          << name << (adaptive ? " adaptive" : "");
    }
  }
  omp_set_num_threads(saved);
}

TEST(OptimState, EmptyBuffersAreFine) {
  for (const std::string& name : optimizer_names()) {
    auto o = make_optimizer(settings(name), 0);
    o->step(nullptr, nullptr, 1e-3);
    EXPECT_EQ(o->step_count(), 1);
  }
}

// ------------------------------------------------------------------------------------------------
// Settings errors.

TEST(OptimErrors, BadSettings) {
  struct Case {
    std::function<void(OptimizerSettings&)> set;
    std::string message;
  };
  const double nan = std::nan(""), inf = HUGE_VAL;
  const std::vector<Case> cases = {
      {[](auto& s) { s.name = "adam"; },
       "unknown optimizer 'adam' (expected sgd, nag, adamw, nadamw or nag-delay)"},
      {[](auto& s) { s.name = ""; },
       "unknown optimizer '' (expected sgd, nag, adamw, nadamw or nag-delay)"},
      {[](auto& s) { s.beta1 = 1.5; }, "optim.beta1 must be in [0, 1), got 1.5"},
      {[](auto& s) { s.beta1 = 1.0; }, "optim.beta1 must be in [0, 1), got 1"},
      {[](auto& s) { s.beta1 = -0.1; }, "optim.beta1 must be in [0, 1), got -0.1"},
      {[&](auto& s) { s.beta1 = nan; }, "optim.beta1 must be in [0, 1), got nan"},
      {[](auto& s) { s.beta2 = 1.0; }, "optim.beta2 must be in [0, 1), got 1"},
      {[](auto& s) { s.beta2 = -1e-3; }, "optim.beta2 must be in [0, 1), got -0.001"},
      {[](auto& s) { s.eps = 0.0; }, "optim.eps must be > 0, got 0"},
      {[](auto& s) { s.eps = -1e-8; }, "optim.eps must be > 0, got -1e-08"},
      {[&](auto& s) { s.eps = inf; }, "optim.eps must be finite, got inf"},
      {[](auto& s) { s.weight_decay = -0.01; }, "optim.weight_decay must be >= 0, got -0.01"},
      {[&](auto& s) { s.weight_decay = nan; }, "optim.weight_decay must be >= 0, got nan"},
      {[&](auto& s) { s.weight_decay = inf; }, "optim.weight_decay must be finite, got inf"},
      {[](auto& s) { s.momentum_decay = -0.004; }, "optim.momentum_decay must be >= 0, got -0.004"},
      {[&](auto& s) { s.momentum_decay = inf; }, "optim.momentum_decay must be finite, got inf"},
      {[](auto& s) { s.gamma = 1.0; }, "optim.gamma must be in [0, 1), got 1"},
      {[](auto& s) { s.gamma = -0.5; }, "optim.gamma must be in [0, 1), got -0.5"},
  };
  for (const auto& c : cases) {
    for (const std::string& name : optimizer_names()) {
      OptimizerSettings s = settings(name);
      c.set(s);
      EXPECT_EQ(error_of([&] { make_optimizer(s, 4); }), c.message) << name;
    }
  }
  // The edges that are allowed.
  for (const std::string& name : optimizer_names()) {
    OptimizerSettings s = settings(name);
    s.beta1 = 0.0;
    s.beta2 = 0.0;
    s.weight_decay = 0.0;
    s.momentum_decay = 0.0;
    s.gamma = 0.0;
    s.eps = 1e-30;
    EXPECT_NO_THROW(make_optimizer(s, 4)) << name;
  }
}

}  // namespace
}  // namespace pipenag
