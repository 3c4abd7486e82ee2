// An independent, deliberately naive float64 implementation of the GPT forward pass and loss,
// written from the model description (PAPER.md section 4) with plain loops and no shared code
// with src/kernels. Tests compare the optimised fp32 model against it.
#pragma once
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "model/config.h"
#include "pipeline/stage.h"

namespace pipenag::testing {

class ReferenceGPT {
 public:
  // Takes the weights of a single stage that holds the whole model.
  ReferenceGPT(const ModelConfig& cfg, const Stage& stage) : cfg_(cfg) {
    for (const auto& p : stage.param_table())
      w_[p.name] = std::vector<double>(stage.params() + p.offset, stage.params() + p.offset + p.numel);
  }
  std::vector<double>& tensor(const std::string& name) { return w_.at(name); }

  // Mean cross-entropy over all B*T positions.
  double loss(const std::vector<int32_t>& tokens, const std::vector<int32_t>& targets, int B) {
    const int T = cfg_.block_size, C = cfg_.n_embd, V = cfg_.vocab_size;
    double total = 0.0;
    for (int b = 0; b < B; ++b) {
      std::vector<std::vector<double>> x(T, std::vector<double>(C));
      const auto& wte = w_.at("transformer.wte.weight");
      const auto& wpe = w_.at("transformer.wpe.weight");
      for (int t = 0; t < T; ++t)
        for (int c = 0; c < C; ++c)
          x[t][c] = wte[tokens[b * T + t] * C + c] + wpe[t * C + c];
      for (int l = 0; l < cfg_.n_layer; ++l) block(x, "transformer.h." + std::to_string(l) + ".");
      const auto& hw = cfg_.tie_embeddings ? wte : w_.at("lm_head.weight");
      const auto& hb = w_.at("lm_head.bias");
      for (int t = 0; t < T; ++t) {
        auto h = layernorm(x[t], "transformer.ln_f.");
        std::vector<double> logits(V);
        double mx = -1e300;
        for (int v = 0; v < V; ++v) {
          double s = hb[v];
          for (int c = 0; c < C; ++c) s += hw[v * C + c] * h[c];
          logits[v] = s;
          mx = std::max(mx, s);
        }
        double z = 0.0;
        for (int v = 0; v < V; ++v) z += std::exp(logits[v] - mx);
        total += -(logits[targets[b * T + t]] - mx - std::log(z));
      }
    }
    return total / (static_cast<double>(B) * T);
  }

 private:
  std::vector<double> layernorm(const std::vector<double>& x, const std::string& p) {
    const auto& g = w_.at(p + "weight");
    const auto& be = w_.at(p + "bias");
    const size_t C = x.size();
    double mean = 0, var = 0;
    for (double v : x) mean += v;
    mean /= C;
    for (double v : x) var += (v - mean) * (v - mean);
    var /= C;
    const double rstd = 1.0 / std::sqrt(var + 1e-5);
    std::vector<double> y(C);
    for (size_t c = 0; c < C; ++c) y[c] = (x[c] - mean) * rstd * g[c] + be[c];
    return y;
  }
  // y = W x + b for W [N, K]
  static std::vector<double> linear(const std::vector<double>& x, const std::vector<double>& W,
                                    const std::vector<double>* b, size_t N) {
    const size_t K = x.size();
    std::vector<double> y(N);
    for (size_t n = 0; n < N; ++n) {
      double s = b ? (*b)[n] : 0.0;
      for (size_t k = 0; k < K; ++k) s += W[n * K + k] * x[k];
      y[n] = s;
    }
    return y;
  }
  double act(double v) const {
    if (cfg_.activation == Activation::ReLU) return v > 0 ? v : 0;
    return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
  }
  void block(std::vector<std::vector<double>>& x, const std::string& p) {
    const int T = cfg_.block_size, C = cfg_.n_embd, NH = cfg_.n_head, hs = C / NH;
    std::vector<std::vector<double>> qkv(T), y(T, std::vector<double>(C, 0.0));
    for (int t = 0; t < T; ++t) qkv[t] = linear(layernorm(x[t], p + "ln_1."), w_.at(p + "attn.c_attn.weight"), nullptr, 3 * C);
    for (int h = 0; h < NH; ++h)
      for (int t = 0; t < T; ++t) {
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (int u = 0; u <= t; ++u) {
          double d = 0;
          for (int i = 0; i < hs; ++i) d += qkv[t][h * hs + i] * qkv[u][C + h * hs + i];
          s[u] = d / std::sqrt(static_cast<double>(hs));
          mx = std::max(mx, s[u]);
        }
        double z = 0;
        for (int u = 0; u <= t; ++u) z += (s[u] = std::exp(s[u] - mx));
        for (int u = 0; u <= t; ++u)
          for (int i = 0; i < hs; ++i) y[t][h * hs + i] += s[u] / z * qkv[u][2 * C + h * hs + i];
      }
    for (int t = 0; t < T; ++t) {
      auto o = linear(y[t], w_.at(p + "attn.c_proj.weight"), &w_.at(p + "attn.c_proj.bias"), C);
      for (int c = 0; c < C; ++c) x[t][c] += o[c];
      auto f = linear(layernorm(x[t], p + "ln_2."), w_.at(p + "mlp.c_fc.weight"), &w_.at(p + "mlp.c_fc.bias"), 4 * C);
      for (double& v : f) v = act(v);
      auto m = linear(f, w_.at(p + "mlp.c_proj.weight"), &w_.at(p + "mlp.c_proj.bias"), C);
      for (int c = 0; c < C; ++c) x[t][c] += m[c];
    }
  }

  ModelConfig cfg_;
  std::map<std::string, std::vector<double>> w_;
};

}  // namespace pipenag::testing
