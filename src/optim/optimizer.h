// The optimizers a stage can run on its flat buffers (PAPER.md sections 2 and 3). Every one
// applies decoupled weight decay first (w *= 1 - lr*wd), then its own update. Step counts start
// at 1 for the first update, as in PyTorch.
//
//   sgd        heavy ball: b = beta1*b + g (b = g at t = 1); w -= lr*b            (torch SGD)
//   nag        classic Nesterov (Eq. 8) in PyTorch's form: b = beta1*b + g;
//              w -= lr*(g + beta1*b)                                    (torch SGD nesterov)
//   adamw      torch.optim.AdamW
//   nadamw     torch.optim.NAdam with decoupled weight decay: the mu_t = beta1(1 - 0.5*0.96^(t*psi))
//              schedule, the running product of mu, bias corrections (PAPER.md section 2)
//   nag-delay  Eq. 10 in the look-ahead form the pipeline stores (y = w + d):
//              m = gamma*m + (1-gamma)*g;  y -= lr*[gamma*m + (1-gamma)*g]
//              gamma constant, or gamma_t = max(0, (t-2)/t) (the theory's schedule); with a
//              schedule the look-ahead term takes the next step's coefficient (like NAdam's
//              mu_{t+1}): m = gamma_t*m + (1-gamma_t)*g; y -= lr*[gamma_{t+1}*m + (1-gamma_t)*g],
//              which is exactly Eq. 10 with gamma_t. With `adaptive`, the step is divided by
//              sqrt(v_hat) + eps as in Adam (v, v_hat as adamw's, m not bias-corrected).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace pipenag {

struct OptimizerSettings {
  std::string name = "adamw";    // sgd | nag | adamw | nadamw | nag-delay
  double beta1 = 0.9;            // momentum (sgd, nag), first-moment decay (adamw, nadamw)
  double beta2 = 0.999;          // second-moment decay (adamw, nadamw, adaptive nag-delay)
  double eps = 1e-8;
  double weight_decay = 0.01;    // decoupled
  double momentum_decay = 0.004; // nadamw's psi
  double gamma = 0.99;           // nag-delay momentum
  bool gamma_theory = false;     // nag-delay: gamma_t = max(0, (t-2)/t) instead of gamma
  bool adaptive = false;         // nag-delay: Adam-style second-moment scaling
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  virtual const char* name() const = 0;
  // One update of w[n] from gradient g[n] * grad_scale at learning rate lr (grad_scale carries
  // gradient clipping without a pass over g); increments step_count().
  virtual void step(float* w, const float* g, double lr, float grad_scale = 1.0f) = 0;
  // The momentum coefficient the update just made used (beta1, mu_t, gamma_t; 0 without momentum).
  // Computed from step_count(), so it is right after set_step_count() too; before the first
  // step: beta1 or the constant gamma, and 0 for the mu_t and gamma_t schedules.
  virtual double momentum() const = 0;

  int64_t step_count() const { return t_; }
  void set_step_count(int64_t t) { t_ = t; }
  size_t size() const { return n_; }

  // State for checkpoints: named buffers of size() floats ("exp_avg", "exp_avg_sq",
  // "momentum_buffer", ...) and named scalars beyond the step count ("mu_product").
  virtual std::vector<std::pair<std::string, std::vector<float>*>> state_tensors() = 0;
  virtual std::vector<std::pair<std::string, double*>> state_scalars() { return {}; }

 protected:
  explicit Optimizer(size_t n) : n_(n) {}
  size_t n_;
  int64_t t_ = 0;
};

// Error (one line) on an unknown name or settings out of range (betas outside [0, 1), eps <= 0,
// negative weight decay or momentum decay, gamma outside [0, 1)).
std::unique_ptr<Optimizer> make_optimizer(const OptimizerSettings& s, size_t n);

// "sgd", "nag", "adamw", "nadamw", "nag-delay".
const std::vector<std::string>& optimizer_names();

}  // namespace pipenag
