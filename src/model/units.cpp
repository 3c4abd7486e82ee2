#include "model/units.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/matmul_bf16.h"

namespace pipenag {
namespace k = kernels;

void Unit::add_param(const std::string& name, std::vector<int64_t> shape, ParamInit init) {
  ParamSpec s;
  s.name = name;
  s.numel = numel_of(shape);
  s.shape = std::move(shape);
  s.offset = num_params_;
  s.init = init;
  num_params_ += s.numel;
  params_.push_back(std::move(s));
}

namespace {

void zero(float* p, size_t n) { std::memset(p, 0, n * sizeof(float)); }

// Runs f, adding its time to the op's total when the context profiles (pipenag bench --profile).
template <typename F>
void timed(UnitContext& ctx, Work op, F&& f) {
  if (!ctx.profile) {
    f();
    return;
  }
  const auto t0 = std::chrono::steady_clock::now();
  f();
  ctx.profile->seconds[static_cast<size_t>(op)] +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void linear_fwd(const UnitContext& ctx, float* out, const float* in, const float* W,
                const float* b, int M, int K, int N) {
  if (ctx.bf16) ctx.bf16->forward(out, in, W, b, M, K, N);
  else k::linear_forward(out, in, W, b, M, K, N);
}
void linear_bwd(const UnitContext& ctx, float* din, float* dW, float* db, const float* dout,
                const float* in, const float* W, int M, int K, int N) {
  if (ctx.bf16) ctx.bf16->backward(din, dW, db, dout, in, W, M, K, N);
  else k::linear_backward(din, dW, db, dout, in, W, M, K, N);
}

// As linear_bwd, but din is overwritten rather than accumulated: saves zeroing din first.
void linear_bwd_overwrite(const UnitContext& ctx, float* din, float* dW, float* db,
                          const float* dout, const float* in, const float* W, int M, int K, int N) {
  if (ctx.bf16) {
    ctx.bf16->backward(din, dW, db, dout, in, W, M, K, N, /*accumulate_dinp=*/false);
    return;
  }
  k::sgemm(false, false, M, K, N, 1.0f, dout, N, W, K, 0.0f, din, K);
  k::linear_backward(static_cast<float*>(nullptr), dW, db, dout, in, W, M, K, N);
}

void activation_forward(Activation a, float* out, const float* in, size_t n) {
  if (a == Activation::ReLU) k::relu_forward(out, in, n);
  else k::gelu_forward(out, in, n);
}
// din = activation'(in) * dout (overwritten).
void activation_backward(Activation a, float* din, const float* dout, const float* in, size_t n) {
  if (a == Activation::ReLU) k::relu_backward(din, dout, in, n, /*accumulate=*/false);
  else k::gelu_backward(din, dout, in, n, /*accumulate=*/false);
}

class EmbeddingUnit final : public Unit {
 public:
  explicit EmbeddingUnit(const ModelConfig& cfg) : Unit(cfg) {
    add_param("transformer.wte.weight", {cfg.vocab_size, cfg.n_embd}, ParamInit::Normal002);
    add_param("transformer.wpe.weight", {cfg.block_size, cfg.n_embd}, ParamInit::Normal002);
  }
  std::string kind() const override { return "embedding"; }
  size_t act_floats(int) const override { return 0; }
  size_t scratch_floats(int) const override { return 0; }
  size_t matmul_params() const override { return 0; }

  void forward(const float* w, float*, const float*, float* out, float*, float*,
               UnitContext& ctx) const override {
    const int C = cfg_.n_embd;
    timed(ctx, Work::Embedding, [&] { k::embedding_forward(out, ctx.tokens, w + params()[0].offset, w + params()[1].offset, ctx.B,
                         cfg_.block_size, C); });
  }
  void backward(const float*, float* g, const float*, const float* dout, float*, const float*,
                float*, UnitContext& ctx) const override {
    timed(ctx, Work::Embedding, [&] { k::embedding_backward(g + params()[0].offset, g + params()[1].offset, dout, ctx.tokens, ctx.B,
                          cfg_.block_size, cfg_.n_embd); });
  }
};

class BlockUnit final : public Unit {
 public:
  BlockUnit(const ModelConfig& cfg, int layer) : Unit(cfg) {
    const int64_t C = cfg.n_embd;
    const std::string p = "transformer.h." + std::to_string(layer) + ".";
    add_param(p + "ln_1.weight", {C}, ParamInit::One);
    add_param(p + "ln_1.bias", {C}, ParamInit::Zero);
    add_param(p + "attn.c_attn.weight", {3 * C, C}, ParamInit::Normal002);
    add_param(p + "attn.c_proj.weight", {C, C}, ParamInit::Normal002);
    add_param(p + "attn.c_proj.bias", {C}, ParamInit::Zero);
    add_param(p + "ln_2.weight", {C}, ParamInit::One);
    add_param(p + "ln_2.bias", {C}, ParamInit::Zero);
    add_param(p + "mlp.c_fc.weight", {4 * C, C}, ParamInit::Normal002);
    add_param(p + "mlp.c_fc.bias", {4 * C}, ParamInit::Zero);
    add_param(p + "mlp.c_proj.weight", {C, 4 * C}, ParamInit::Normal002);
    add_param(p + "mlp.c_proj.bias", {C}, ParamInit::Zero);
  }
  std::string kind() const override { return "block"; }

  // Saved activations, in this order inside `acts`.
  struct Acts {
    float *ln1, *mean1, *rstd1, *qkv, *att, *atty, *xmid, *ln2, *mean2, *rstd2, *fc, *fca;
  };
  Acts layout(float* a, int B) const {
    const size_t M = static_cast<size_t>(B) * cfg_.block_size, C = cfg_.n_embd;
    const size_t T = cfg_.block_size;
    Acts s{};
    s.ln1 = a; a += M * C;
    s.mean1 = a; a += M;
    s.rstd1 = a; a += M;
    s.qkv = a; a += 3 * M * C;
    s.att = a; a += static_cast<size_t>(B) * cfg_.n_head * T * T;
    s.atty = a; a += M * C;
    s.xmid = a; a += M * C;
    s.ln2 = a; a += M * C;
    s.mean2 = a; a += M;
    s.rstd2 = a; a += M;
    s.fc = a; a += 4 * M * C;
    s.fca = a;
    return s;
  }
  size_t act_floats(int B) const override {
    const size_t M = static_cast<size_t>(B) * cfg_.block_size, C = cfg_.n_embd;
    const size_t T = cfg_.block_size;
    return M * C * 15 + 4 * M + static_cast<size_t>(B) * cfg_.n_head * T * T;
  }
  size_t scratch_floats(int B) const override {
    const size_t M = static_cast<size_t>(B) * cfg_.block_size, C = cfg_.n_embd;
    // dxmid, dln, datty: M*C each; dqkv 3MC; dfca, dfc: 4MC each.
    return M * C * 14 + k::attention_backward_scratch_floats(B, cfg_.block_size, cfg_.n_embd,
                                                             cfg_.n_head);
  }
  size_t matmul_params() const override {
    const size_t C = cfg_.n_embd;
    return 12 * C * C;
  }

  void forward(const float* w, float*, const float* in, float* out, float* acts, float*,
               UnitContext& ctx) const override {
    const int M = ctx.B * cfg_.block_size, C = cfg_.n_embd;
    const size_t MC = static_cast<size_t>(M) * C;
    const auto& P = params();
    const Acts a = layout(acts, ctx.B);
    timed(ctx, Work::LayerNorm, [&] { k::layernorm_forward(a.ln1, a.mean1, a.rstd1, in, w + P[0].offset, w + P[1].offset, M, C); });
    timed(ctx, Work::Linear, [&] { linear_fwd(ctx, a.qkv, a.ln1, w + P[2].offset, static_cast<const float*>(nullptr), M, C,
                      3 * C); });
    timed(ctx, Work::Attention, [&] { k::attention_forward(a.atty, a.att, a.qkv, ctx.B, cfg_.block_size, C, cfg_.n_head); });
    timed(ctx, Work::Linear, [&] { linear_fwd(ctx, a.xmid, a.atty, w + P[3].offset, w + P[4].offset, M, C, C); });
    timed(ctx, Work::Residual, [&] { k::add(a.xmid, a.xmid, in, MC); });
    timed(ctx, Work::LayerNorm, [&] { k::layernorm_forward(a.ln2, a.mean2, a.rstd2, a.xmid, w + P[5].offset, w + P[6].offset, M, C); });
    timed(ctx, Work::Linear, [&] { linear_fwd(ctx, a.fc, a.ln2, w + P[7].offset, w + P[8].offset, M, C, 4 * C); });
    timed(ctx, Work::Activation, [&] { activation_forward(cfg_.activation, a.fca, a.fc, 4 * MC); });
    timed(ctx, Work::Linear, [&] { linear_fwd(ctx, out, a.fca, w + P[9].offset, w + P[10].offset, M, 4 * C, C); });
    timed(ctx, Work::Residual, [&] { k::add(out, out, a.xmid, MC); });
  }

  void backward(const float* w, float* g, const float* in, const float* dout, float* din,
                const float* acts, float* scratch, UnitContext& ctx) const override {
    const int M = ctx.B * cfg_.block_size, C = cfg_.n_embd;
    const size_t MC = static_cast<size_t>(M) * C;
    const auto& P = params();
    // The layout only hands out pointers; nothing is written through them here.
    const Acts a = layout(const_cast<float*>(acts), ctx.B);
    float* dxmid = scratch;
    float* dln = dxmid + MC;
    float* datty = dln + MC;
    float* dqkv = datty + MC;
    float* dfca = dqkv + 3 * MC;
    float* dfc = dfca + 4 * MC;
    float* att_scratch = dfc + 4 * MC;

    timed(ctx, Work::Residual, [&] { std::memcpy(dxmid, dout, MC * sizeof(float)); });
    timed(ctx, Work::Linear, [&] { linear_bwd_overwrite(ctx, dfca, g + P[9].offset, g + P[10].offset, dout, a.fca, w + P[9].offset, M,
                       4 * C, C); });
    timed(ctx, Work::Activation, [&] { activation_backward(cfg_.activation, dfc, dfca, a.fc, 4 * MC); });
    timed(ctx, Work::Linear, [&] { linear_bwd_overwrite(ctx, dln, g + P[7].offset, g + P[8].offset, dfc, a.ln2, w + P[7].offset, M, C,
                       4 * C); });
    timed(ctx, Work::LayerNorm, [&] { k::layernorm_backward(dxmid, g + P[5].offset, g + P[6].offset, dln, a.xmid, w + P[5].offset,
                          a.mean2, a.rstd2, M, C); });
    timed(ctx, Work::Residual, [&] { k::add(din, din, dxmid, MC); });
    timed(ctx, Work::Linear, [&] { linear_bwd_overwrite(ctx, datty, g + P[3].offset, g + P[4].offset, dxmid, a.atty, w + P[3].offset, M,
                       C, C); });
    timed(ctx, Work::Attention, [&] { k::attention_backward(dqkv, datty, a.qkv, a.att, ctx.B, cfg_.block_size, C, cfg_.n_head,
                          att_scratch, /*accumulate=*/false); });
    timed(ctx, Work::Linear, [&] { linear_bwd_overwrite(ctx, dln, g + P[2].offset, static_cast<float*>(nullptr), dqkv, a.ln1,
                       w + P[2].offset, M, C, 3 * C); });
    timed(ctx, Work::LayerNorm, [&] { k::layernorm_backward(din, g + P[0].offset, g + P[1].offset, dln, in, w + P[0].offset, a.mean1,
                          a.rstd1, M, C); });
  }
};

class HeadUnit final : public Unit {
 public:
  explicit HeadUnit(const ModelConfig& cfg) : Unit(cfg) {
    add_param("transformer.ln_f.weight", {cfg.n_embd}, ParamInit::One);
    add_param("transformer.ln_f.bias", {cfg.n_embd}, ParamInit::Zero);
    if (!cfg.tie_embeddings)
      add_param("lm_head.weight", {cfg.vocab_size, cfg.n_embd}, ParamInit::Normal002);
    add_param("lm_head.bias", {cfg.vocab_size}, ParamInit::Zero);
  }
  std::string kind() const override { return "head"; }

  // Rows of logits materialised at once: bounds the scratch for large vocabularies.
  int chunk_rows(int M) const {
    const int by_budget = std::max(64, static_cast<int>((size_t{16} << 20) / cfg_.vocab_size));
    return std::min(M, by_budget);
  }
  size_t act_floats(int B) const override {
    return static_cast<size_t>(B) * cfg_.block_size * cfg_.n_embd;  // saved input gradient
  }
  size_t scratch_floats(int B) const override {
    const int M = B * cfg_.block_size;
    const size_t MC = static_cast<size_t>(M) * cfg_.n_embd;
    const size_t rows = static_cast<size_t>(chunk_rows(M));
    return 2 * MC + 2 * static_cast<size_t>(M) + rows * cfg_.vocab_size + rows;
  }
  size_t matmul_params() const override {
    return static_cast<size_t>(cfg_.vocab_size) * cfg_.n_embd;
  }

  void forward(const float* w, float* g, const float* in, float*, float* acts, float* scratch,
               UnitContext& ctx) const override {
    const int M = ctx.B * cfg_.block_size, C = cfg_.n_embd, V = cfg_.vocab_size;
    const size_t MC = static_cast<size_t>(M) * C;
    const auto& P = params();
    const bool tied = cfg_.tie_embeddings;
    const float* W = tied ? ctx.tied_wte : w + P[2].offset;
    const float* bias = w + P[tied ? 2 : 3].offset;
    float* lnf = scratch;
    float* dlnf = lnf + MC;
    float* mean = dlnf + MC;
    float* rstd = mean + M;
    float* logits = rstd + M;
    const int rows = chunk_rows(M);
    float* losses = logits + static_cast<size_t>(rows) * V;

    timed(ctx, Work::LayerNorm, [&] { k::layernorm_forward(lnf, mean, rstd, in, w + P[0].offset, w + P[1].offset, M, C); });
    if (ctx.training) zero(dlnf, MC);
    double loss_sum = 0.0;
    int64_t count = 0;
    for (int r0 = 0; r0 < M; r0 += rows) {
      const int n = std::min(rows, M - r0);
      const float* x = lnf + static_cast<size_t>(r0) * C;
      const int32_t* tgt = ctx.targets + r0;
      timed(ctx, Work::Linear, [&] { linear_fwd(ctx, logits, x, W, bias, n, C, V); });
      double mean_loss;
      if (ctx.training) {
        timed(ctx, Work::SoftmaxXent, [&] { mean_loss = k::softmax_xent_forward_backward(logits, losses, tgt, n, V, ctx.grad_scale); });
        float* dW = tied ? ctx.tied_dwte : g + P[2].offset;
        float* db = g + P[tied ? 2 : 3].offset;
        timed(ctx, Work::Linear, [&] { linear_bwd(ctx, dlnf + static_cast<size_t>(r0) * C, dW, db, logits, x, W, n, C, V); });
      } else {
        timed(ctx, Work::SoftmaxXent, [&] { mean_loss = k::softmax_xent_forward(losses, logits, tgt, n, V); });
      }
      int64_t counted = 0;
      for (int i = 0; i < n; ++i) counted += tgt[i] >= 0;
      loss_sum += mean_loss * static_cast<double>(counted);
      count += counted;
    }
    ctx.loss_sum += loss_sum;
    ctx.loss_count += count;
    if (ctx.training) {
      timed(ctx, Work::Residual, [&] { zero(acts, MC); });
      timed(ctx, Work::LayerNorm, [&] { k::layernorm_backward(acts, g + P[0].offset, g + P[1].offset, dlnf, in, w + P[0].offset,
                            mean, rstd, M, C); });
    }
  }

  void backward(const float*, float*, const float*, const float*, float* din, const float* acts,
                float*, UnitContext& ctx) const override {
    const size_t MC = static_cast<size_t>(ctx.B) * cfg_.block_size * cfg_.n_embd;
    timed(ctx, Work::Residual, [&] { k::add(din, din, acts, MC); });
  }
};

}  // namespace

const char* work_name(Work op) {
  static const char* const names[] = {"linear layers (GEMM)", "attention", "layernorm",
                                      "activation", "residual adds, copies, zeroing", "embedding",
                                      "softmax + cross-entropy"};
  return names[static_cast<size_t>(op)];
}

std::vector<std::unique_ptr<Unit>> make_gpt_units(const ModelConfig& cfg) {
  std::vector<std::unique_ptr<Unit>> units;
  units.push_back(std::make_unique<EmbeddingUnit>(cfg));
  for (int l = 0; l < cfg.n_layer; ++l) units.push_back(std::make_unique<BlockUnit>(cfg, l));
  units.push_back(std::make_unique<HeadUnit>(cfg));
  return units;
}

double train_flops_per_token(const ModelConfig& cfg) {
  const double C = cfg.n_embd, L = cfg.n_layer, T = cfg.block_size;
  const double n_matmul = L * 12.0 * C * C + static_cast<double>(cfg.vocab_size) * C;
  return 6.0 * n_matmul + 12.0 * L * C * T;
}

}  // namespace pipenag
