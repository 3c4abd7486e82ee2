#include "train/sample.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/kernels.h"
#include "pipeline/stage.h"
#include "data/tokenizer.h"
#include "train/checkpoint.h"
#include "train/trainer.h"
#include "util/error.h"

namespace pipenag {

namespace {

const ParamSpec& find_param(const Stage& s, const std::string& name) {
  for (const auto& p : s.param_table())
    if (p.name == name) return p;
  throw Error("model has no tensor '" + name + "'");
}

}  // namespace

void sample_stream(const std::string& checkpoint_dir, const SampleOptions& opt,
                   const std::function<bool(const std::string&)>& out) {
  if (!std::isfinite(opt.temperature) || opt.temperature < 0)
    throw Error("--temperature must be a number >= 0, got " + std::to_string(opt.temperature));
  if (opt.top_k < 0) throw Error("--top-k must be >= 0");
  if (opt.max_new_tokens < 0 || opt.max_new_tokens > kMaxSampleTokens)
    throw Error("--tokens must be between 0 and " + std::to_string(kMaxSampleTokens) + ", got " +
                std::to_string(opt.max_new_tokens));
  Config cfg = read_checkpoint_config(checkpoint_dir);
  const ModelConfig& m = cfg.model;
  const auto tok = load_tokenizer(tokenizer_spec(cfg));
  if (m.vocab_size < tok->vocab_size())
    throw Error(checkpoint_dir + ": model vocabulary (" + std::to_string(m.vocab_size) +
                ") is smaller than the tokenizer's (" + std::to_string(tok->vocab_size()) + ")");
  // Padding ids beyond the tokenizer's vocabulary are never sampled.
  const int n_real = tok->vocab_size();
  // The whole model except the head runs as a stage; the head is applied to one row by hand.
  Stage stage(m, 0, m.n_layer + 2, 1, 1);
  load_weights(checkpoint_dir, cfg, stage);
  require_finite_weights(checkpoint_dir, stage);
  const int T = m.block_size, C = m.n_embd, V = m.vocab_size;
  const float* w = stage.params();
  const float* lnw = w + find_param(stage, "transformer.ln_f.weight").offset;
  const float* lnb = w + find_param(stage, "transformer.ln_f.bias").offset;
  const float* W = w + find_param(stage, m.tie_embeddings ? "transformer.wte.weight" : "lm_head.weight").offset;
  const float* bias = w + find_param(stage, "lm_head.bias").offset;

  std::vector<int32_t> seq = tok->encode(opt.prompt);
  if (seq.empty()) seq = tok->eot() ? std::vector<int32_t>{*tok->eot()} : tok->encode("\n");
  if (!out(tok->decode(seq.data(), seq.size()))) return;
  std::mt19937_64 rng(opt.seed);
  std::vector<int32_t> x(static_cast<size_t>(T)), y(static_cast<size_t>(T), -1);
  std::vector<float> hidden(static_cast<size_t>(C)), normed(static_cast<size_t>(C));
  std::vector<float> logits(static_cast<size_t>(V));
  std::vector<int> order(static_cast<size_t>(V));
  for (int n = 0; n < opt.max_new_tokens; ++n) {
    // The last T tokens, left-aligned; the row of the last real token gives the next logits.
    const size_t start = seq.size() > static_cast<size_t>(T) ? seq.size() - T : 0;
    const int len = static_cast<int>(seq.size() - start);
    std::fill(x.begin(), x.end(), 0);
    std::copy(seq.begin() + static_cast<std::ptrdiff_t>(start), seq.end(), x.begin());
    UnitContext ctx;
    ctx.training = false;
    stage.forward(0, nullptr, MicroBatch{x.data(), y.data()}, ctx);
    const float* h = stage.unit_output(0, m.n_layer) + static_cast<size_t>(len - 1) * C;
    float mean, rstd;
    kernels::layernorm_forward(normed.data(), &mean, &rstd, h, lnw, lnb, 1, C);
    kernels::linear_forward(logits.data(), normed.data(), W, bias, 1, C, V);
    for (int v = n_real; v < V; ++v) logits[static_cast<size_t>(v)] = -INFINITY;
    int next;
    if (opt.temperature == 0) {
      next = static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    } else {
      for (float& l : logits) l = static_cast<float>(l / opt.temperature);
      std::iota(order.begin(), order.end(), 0);
      const int k = opt.top_k > 0 ? std::min(opt.top_k, V) : V;
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [&](int a, int b) { return logits[a] > logits[b]; });
      std::vector<double> p(static_cast<size_t>(k));
      for (int i = 0; i < k; ++i) p[static_cast<size_t>(i)] = std::exp(double(logits[order[i]]) - logits[order[0]]);
      std::discrete_distribution<int> dist(p.begin(), p.end());
      next = order[static_cast<size_t>(dist(rng))];
    }
    seq.push_back(next);
    // Only the last block_size tokens are ever read again.
    if (seq.size() > static_cast<size_t>(4 * T)) seq.erase(seq.begin(), seq.end() - T);
    const int32_t id = next;
    if (!out(tok->decode(&id, 1))) return;
  }
}

std::string sample_text(const std::string& checkpoint_dir, const SampleOptions& opt) {
  std::string text;
  sample_stream(checkpoint_dir, opt, [&](const std::string& piece) {
    text += piece;
    return true;
  });
  return text;
}

}  // namespace pipenag
