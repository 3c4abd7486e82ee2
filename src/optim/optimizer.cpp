// The optimizers of optimizer.h. Conventions shared by all of them, as in optim/adamw.cpp:
//  - scalars (bias corrections, step sizes, schedules) are computed in double, as PyTorch computes
//    them from Python floats, and rounded to float once;
//  - the per-element arithmetic is float, one OpenMP `parallel for simd` loop per step with no
//    reduction and no allocation, so that every element's bits depend only on its own inputs (the
//    same for any thread count).
// adamw is class AdamW itself (optim/adamw.cpp). sgd, nag and nadamw go further and perform PyTorch's own
// sequence of roundings: each torch op rounds once, and where torch's CPU kernels fuse
// (add(alpha) = fma(y, alpha, x), addcmul = fma(value*y, z, x)) fused_madd() fuses; elsewhere these
// functions are compiled without floating-point contraction. On a CPU with FMA they then give
// torch 1.13's bits (optim_test checks this against tests/optim_reference/torch_vectors.json).
// nag-delay, which has no torch counterpart, is rounded exactly as written, without contraction.
#include "optim/optimizer.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <string>

#include "optim/adamw.h"
#include "util/error.h"

namespace pipenag {

namespace {

std::string format_double(double x) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::general);
  return std::string(buf, res.ptr);
}

// ---------------------------------------------------------------------------------------------
// adamw: class AdamW (optim/adamw.h) behind this interface, so there is one AdamW loop.
class AdamWOpt final : public Optimizer {
 public:
  AdamWOpt(size_t n, const OptimizerSettings& s)
      : Optimizer(n), impl_(n, AdamWHyper{s.beta1, s.beta2, s.eps, s.weight_decay}) {}

  const char* name() const override { return "adamw"; }
  double momentum() const override { return impl_.hyper().beta1; }

  void step(float* w, const float* g, double lr, float grad_scale) override {
    impl_.set_step_count(t_);
    impl_.step(w, g, lr, grad_scale);
    t_ = impl_.step_count();
  }

  std::vector<std::pair<std::string, std::vector<float>*>> state_tensors() override {
    return {{"exp_avg", &impl_.m()}, {"exp_avg_sq", &impl_.v()}};
  }

 private:
  AdamW impl_;
};

// From here on: no floating-point contraction, every operation rounds where it is written
// (functions defined below this point; OpenMP's outlined loop bodies inherit it).
// Without contraction the bits do not depend on how GCC vectorises a loop either. This file and
// adamw.cpp are compiled with -fno-math-errno (CMakeLists.txt; a per-function "no-math-errno"
// has no effect), without which the loops that take a sqrt stay scalar: the vectorised loops
// here give the same bits as the scalar ones did; class AdamW's, which is contracted, may round
// its a*b + c differently once vectorised (it is checked against torch to 1e-6, not bitwise).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

// x + a*b rounded once where the CPU has FMA (as torch's AVX2 kernels compute add(alpha) and
// addcmul); without FMA, rounded twice (a library fma would not vectorise).
inline float fused_madd(float a, float b, float x) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, x);
#else
  return a * b + x;
#endif
}

// ---------------------------------------------------------------------------------------------
// sgd / nag: torch.optim.SGD(momentum=beta1, dampening=0, nesterov=...) after decoupled decay:
//   w.mul_(decay); b = g.clone() at t = 1, else b.mul_(beta1).add_(g);
//   sgd: w.add_(b, alpha=-lr);  nag: d = g.add(b, alpha=beta1); w.add_(d, alpha=-lr).
class Sgd final : public Optimizer {
 public:
  Sgd(size_t n, const OptimizerSettings& s, bool nesterov)
      : Optimizer(n), beta1_(s.beta1), wd_(s.weight_decay), nesterov_(nesterov), buf_(n, 0.0f) {}

  const char* name() const override { return nesterov_ ? "nag" : "sgd"; }
  double momentum() const override { return beta1_; }

  void step(float* w, const float* g, double lr, float grad_scale) override {
    ++t_;
    const float decay = static_cast<float>(1.0 - lr * wd_);
    const float b1 = static_cast<float>(beta1_);
    const float neg_lr = static_cast<float>(-lr);
    const bool first = t_ == 1;  // torch starts the buffer as a copy of the first gradient
    const bool nesterov = nesterov_;
    float* b = buf_.data();
    const long n = static_cast<long>(n_);
#pragma omp parallel for simd schedule(static)
    for (long i = 0; i < n; ++i) {
      const float gi = g[i] * grad_scale;
      const float wi = w[i] * decay;
      const float bi = first ? gi : b[i] * b1 + gi;
      b[i] = bi;
      const float di = nesterov ? fused_madd(bi, b1, gi) : bi;
      w[i] = fused_madd(di, neg_lr, wi);
    }
  }

  std::vector<std::pair<std::string, std::vector<float>*>> state_tensors() override {
    return {{"momentum_buffer", &buf_}};
  }

 private:
  double beta1_, wd_;
  bool nesterov_;
  std::vector<float> buf_;
};

// ---------------------------------------------------------------------------------------------
// nadamw: torch.optim.NAdam after decoupled decay, in the order of PyTorch 1.13's multi-tensor
// path (its single-tensor path has mu_t twice in the second step size, fixed in later releases):
//   w.mul_(decay); m.mul_(beta1).add_(g, alpha=1-beta1); v.mul_(beta2).addcmul_(g, g, 1-beta2);
//   denom = sqrt(v) / sqrt(1-beta2^t) + eps;
//   w.addcdiv_(g, denom, -lr(1-mu_t)/(1-P_t)); w.addcdiv_(m, denom, -lr mu_{t+1}/(1-P_t mu_{t+1}))
// with P_t = prod_{i<=t} mu_i. torch keeps P in a float32 tensor (P = float(P * float(mu_t))); so
// does this (in a double that holds a float value), so that the step sizes are torch's.
class NAdamW final : public Optimizer {
 public:
  NAdamW(size_t n, const OptimizerSettings& s)
      : Optimizer(n), beta1_(s.beta1), beta2_(s.beta2), eps_(s.eps), wd_(s.weight_decay),
        psi_(s.momentum_decay), m_(n, 0.0f), v_(n, 0.0f) {}

  const char* name() const override { return "nadamw"; }
  double momentum() const override { return t_ > 0 ? mu(t_) : 0.0; }

  void step(float* w, const float* g, double lr, float grad_scale) override {
    ++t_;
    const double mu_t = mu(t_);
    const double mu_next = mu(t_ + 1);
    mu_product_ = static_cast<float>(static_cast<float>(mu_product_) * static_cast<float>(mu_t));
    const double bc2 = 1.0 - std::pow(beta2_, static_cast<double>(t_));
    const float decay = static_cast<float>(1.0 - lr * wd_);
    const float b1 = static_cast<float>(beta1_), b2 = static_cast<float>(beta2_);
    const float one_b1 = static_cast<float>(1.0 - beta1_), one_b2 = static_cast<float>(1.0 - beta2_);
    const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    const float eps = static_cast<float>(eps_);
    const float step_g = static_cast<float>(lr * (1.0 - mu_t) / (1.0 - mu_product_));
    const float step_m = static_cast<float>(lr * mu_next / (1.0 - mu_product_ * mu_next));
    float* m = m_.data();
    float* v = v_.data();
    const long n = static_cast<long>(n_);
#pragma omp parallel for simd schedule(static)
    for (long i = 0; i < n; ++i) {
      const float gi = g[i] * grad_scale;
      const float wi = w[i] * decay;
      const float mi = fused_madd(gi, one_b1, m[i] * b1);
      const float vi = fused_madd(one_b2 * gi, gi, v[i] * b2);
      m[i] = mi;
      v[i] = vi;
      const float denom = __builtin_sqrtf(vi) / bc2_sqrt + eps;
      const float wg = wi - (step_g * gi) / denom;
      w[i] = wg - (step_m * mi) / denom;
    }
  }

  std::vector<std::pair<std::string, std::vector<float>*>> state_tensors() override {
    return {{"exp_avg", &m_}, {"exp_avg_sq", &v_}};
  }
  std::vector<std::pair<std::string, double*>> state_scalars() override {
    return {{"mu_product", &mu_product_}};
  }

 private:
  // mu_t = beta1 (1 - 0.5 * 0.96^(t psi)), exactly as torch's Python expression.
  double mu(int64_t t) const {
    return beta1_ * (1.0 - 0.5 * std::pow(0.96, static_cast<double>(t) * psi_));
  }

  double beta1_, beta2_, eps_, wd_, psi_;
  double mu_product_ = 1.0;
  std::vector<float> m_, v_;
};

// ---------------------------------------------------------------------------------------------
// nag-delay: Eq. 10 in look-ahead form (y = w + d). With a schedule gamma_t, Eq. 10 is exactly
//   m_t = gamma_t m_{t-1} + (1 - gamma_t) g_t,   y_t = y_{t-1} - lr [gamma_{t+1} m_t + (1 - gamma_t) g_t]
// (the look-ahead takes the next step's coefficient, as NAdam's mu_{t+1}); for a constant gamma
// this is the header's formula. Optionally divided by sqrt(v_hat) + eps, v as in Adam.
// No torch counterpart: plain arithmetic, rounded as written.
class NagDelay final : public Optimizer {
 public:
  NagDelay(size_t n, const OptimizerSettings& s)
      : Optimizer(n), gamma_(s.gamma), theory_(s.gamma_theory), adaptive_(s.adaptive),
        beta2_(s.beta2), eps_(s.eps), wd_(s.weight_decay), m_(n, 0.0f),
        v_(s.adaptive ? n : 0, 0.0f) {}

  const char* name() const override { return "nag-delay"; }
  double momentum() const override { return gamma_at(t_); }

  void step(float* w, const float* g, double lr, float grad_scale) override {
    ++t_;
    const double gamma_t = gamma_at(t_);
    const double gamma_next = gamma_at(t_ + 1);
    const float decay = static_cast<float>(1.0 - lr * wd_);
    const float gt = static_cast<float>(gamma_t);
    const float one_gt = static_cast<float>(1.0 - gamma_t);
    const float gn = static_cast<float>(gamma_next);
    const float lr_f = static_cast<float>(lr);
    float* m = m_.data();
    const long n = static_cast<long>(n_);
    if (!adaptive_) {
#pragma omp parallel for simd schedule(static)
      for (long i = 0; i < n; ++i) {
        const float gi = g[i] * grad_scale;
        const float wi = w[i] * decay;
        const float mi = gt * m[i] + one_gt * gi;
        m[i] = mi;
        w[i] = wi - lr_f * (gn * mi + one_gt * gi);
      }
      return;
    }
    const double bc2 = 1.0 - std::pow(beta2_, static_cast<double>(t_));
    const float b2 = static_cast<float>(beta2_), one_b2 = static_cast<float>(1.0 - beta2_);
    const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    const float eps = static_cast<float>(eps_);
    float* v = v_.data();
#pragma omp parallel for simd schedule(static)
    for (long i = 0; i < n; ++i) {
      const float gi = g[i] * grad_scale;
      const float wi = w[i] * decay;
      const float mi = gt * m[i] + one_gt * gi;
      const float vi = b2 * v[i] + one_b2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      const float denom = __builtin_sqrtf(vi) / bc2_sqrt + eps;
      w[i] = wi - lr_f * ((gn * mi + one_gt * gi) / denom);
    }
  }

  std::vector<std::pair<std::string, std::vector<float>*>> state_tensors() override {
    if (adaptive_) return {{"momentum", &m_}, {"exp_avg_sq", &v_}};
    return {{"momentum", &m_}};
  }

 private:
  // gamma_t for step t >= 1; before the first step, the constant (or 0 for the schedule).
  double gamma_at(int64_t t) const {
    if (!theory_) return gamma_;
    if (t <= 0) return 0.0;
    return std::max(0.0, static_cast<double>(t - 2) / static_cast<double>(t));
  }

  double gamma_;
  bool theory_, adaptive_;
  double beta2_, eps_, wd_;
  std::vector<float> m_, v_;
};

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

[[noreturn]] void invalid(const std::string& msg) { throw Error(msg); }

void check_unit_interval(const char* key, double x) {
  if (!(x >= 0.0 && x < 1.0))
    invalid(std::string("optim.") + key + " must be in [0, 1), got " + format_double(x));
}

void check_non_negative(const char* key, double x) {
  if (!(x >= 0.0)) invalid(std::string("optim.") + key + " must be >= 0, got " + format_double(x));
  if (!std::isfinite(x)) invalid(std::string("optim.") + key + " must be finite, got " + format_double(x));
}

void validate(const OptimizerSettings& s) {
  const auto& names = optimizer_names();
  if (std::find(names.begin(), names.end(), s.name) == names.end())
    invalid("unknown optimizer '" + s.name + "' (expected sgd, nag, adamw, nadamw or nag-delay)");
  check_unit_interval("beta1", s.beta1);
  check_unit_interval("beta2", s.beta2);
  if (!(s.eps > 0.0)) invalid("optim.eps must be > 0, got " + format_double(s.eps));
  if (!std::isfinite(s.eps)) invalid("optim.eps must be finite, got " + format_double(s.eps));
  check_non_negative("weight_decay", s.weight_decay);
  check_non_negative("momentum_decay", s.momentum_decay);
  check_unit_interval("gamma", s.gamma);
}

}  // namespace

const std::vector<std::string>& optimizer_names() {
  static const std::vector<std::string> names = {"sgd", "nag", "adamw", "nadamw", "nag-delay"};
  return names;
}

std::unique_ptr<Optimizer> make_optimizer(const OptimizerSettings& s, size_t n) {
  validate(s);
  if (s.name == "sgd") return std::make_unique<Sgd>(n, s, /*nesterov=*/false);
  if (s.name == "nag") return std::make_unique<Sgd>(n, s, /*nesterov=*/true);
  if (s.name == "adamw") return std::make_unique<AdamWOpt>(n, s);
  if (s.name == "nadamw") return std::make_unique<NAdamW>(n, s);
  return std::make_unique<NagDelay>(n, s);
}

}  // namespace pipenag
