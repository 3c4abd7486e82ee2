// AdamW with PyTorch's semantics (torch.optim.AdamW, single-tensor path): decoupled weight decay
// w *= 1 - lr*wd, bias-corrected first and second moments, eps added to sqrt(v_hat).
// Operates on a stage's flat buffers; the state (m, v, step) is saved in checkpoints.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace pipenag {

struct AdamWHyper {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

class AdamW {
 public:
  AdamW(size_t n, const AdamWHyper& h);
  // One update of w[n] from gradient g[n] * grad_scale at learning rate lr; increments step().
  // grad_scale carries gradient clipping (clip_scale) without a separate pass over g.
  void step(float* w, const float* g, double lr, float grad_scale = 1.0f);
  int64_t step_count() const { return t_; }
  std::vector<float>& m() { return m_; }
  std::vector<float>& v() { return v_; }
  const std::vector<float>& m() const { return m_; }
  const std::vector<float>& v() const { return v_; }
  void set_step_count(int64_t t) { t_ = t; }
  const AdamWHyper& hyper() const { return h_; }

 private:
  AdamWHyper h_;
  std::vector<float> m_, v_;
  int64_t t_ = 0;
};

}  // namespace pipenag
