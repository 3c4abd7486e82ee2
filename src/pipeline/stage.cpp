#include "pipeline/stage.h"

#include <algorithm>
#include <cstring>

#include "kernels/kernels.h"
#include "model/init.h"
#include "util/error.h"

namespace pipenag {

Stage::Stage(const ModelConfig& cfg, int first_unit, int last_unit, int B, int slots,
             bool recompute)
    : cfg_(cfg), first_(first_unit), last_(last_unit), B_(B), recompute_(recompute) {
  auto all = make_gpt_units(cfg);
  all_units_ = all.size();
  if (first_unit < 0 || last_unit > static_cast<int>(all.size()) || first_unit >= last_unit)
    throw Error("stage: invalid unit range [" + std::to_string(first_unit) + ", " +
                std::to_string(last_unit) + ")");
  if (B < 1 || slots < 1) throw Error("stage: micro-batch size and slots must be >= 1");
  if (cfg.tie_embeddings && !(has_embedding() && has_head()))
    throw Error("model.tie_embeddings needs the embedding and the head on the same stage");
  for (int i = first_unit; i < last_unit; ++i) units_.push_back(std::move(all[i]));

  size_t scratch = 0;
  for (const auto& u : units_) {
    unit_offset_.push_back(n_params_);
    for (ParamSpec s : u->params()) {
      s.offset += n_params_;
      table_.push_back(std::move(s));
    }
    n_params_ += u->num_params();
    scratch = std::max(scratch, u->scratch_floats(B));
  }
  params_.assign(n_params_, 0.0f);
  grads_.assign(n_params_, 0.0f);
  scratch_.assign(scratch, 0.0f);
  const size_t nb = boundary_floats();
  dbuf_.assign(nb, 0.0f);
  din_.assign(nb, 0.0f);
  // Without recompute every slot holds everything; with it, a slot keeps its input and the
  // head's saved input gradient, and one shared set (work_) holds the rest.
  const auto alloc = [&](Slot& s, bool input, bool body, bool head) {
    if (input && !has_embedding()) s.input.assign(nb, 0.0f);
    for (size_t i = 0; i < units_.size(); ++i) {
      const bool mine = is_head(i) ? head : body;
      s.acts.emplace_back(mine ? units_[i]->act_floats(B) : 0, 0.0f);
      s.outs.emplace_back(body && !is_head(i) ? nb : 0, 0.0f);
    }
  };
  slots_.resize(static_cast<size_t>(slots));
  for (auto& s : slots_) alloc(s, true, !recompute, true);
  if (recompute) alloc(work_, false, true, false);
}

std::vector<std::pair<std::string, std::vector<float>*>> Stage::slot_state(int slot) {
  Slot& s = slots_.at(static_cast<size_t>(slot));
  std::vector<std::pair<std::string, std::vector<float>*>> out;
  if (!s.input.empty()) out.emplace_back("input", &s.input);
  for (size_t i = 0; i < s.outs.size(); ++i)
    if (!s.outs[i].empty()) out.emplace_back("out." + std::to_string(i), &s.outs[i]);
  for (size_t i = 0; i < s.acts.size(); ++i)
    if (!s.acts[i].empty()) out.emplace_back("act." + std::to_string(i), &s.acts[i]);
  return out;
}

size_t Stage::boundary_floats() const {
  return static_cast<size_t>(B_) * cfg_.block_size * cfg_.n_embd;
}

void Stage::set_bf16(bool on) {
  bf16_ = on ? std::make_unique<kernels::Bf16Linear>() : nullptr;
}

void Stage::init_params(uint64_t seed) {
  for (const auto& s : table_) init_param(params_.data() + s.offset, s, seed);
}

void Stage::zero_grads() { std::fill(grads_.begin(), grads_.end(), 0.0f); }

const float* Stage::unit_input(const Slot& saved, const Slot& a, int i) const {
  if (i == 0) return has_embedding() ? nullptr : saved.input.data();
  return a.outs[static_cast<size_t>(i - 1)].data();
}

float* Stage::acts_of(Slot& saved, Slot& a, size_t i) const {
  return (recompute_ && !is_head(i) ? a : saved).acts[i].data();
}

void Stage::run_forward(Slot& saved, Slot& a, const float* w, UnitContext& ctx, bool skip_head) {
  for (size_t i = 0; i < units_.size(); ++i) {
    if (skip_head && is_head(i)) continue;
    const size_t off = unit_offset_[i];
    units_[i]->forward(w + off, grads_.data() + off, unit_input(saved, a, static_cast<int>(i)),
                       a.outs[i].data(), acts_of(saved, a, i), scratch_.data(), ctx);
  }
}

void Stage::bind_tied(UnitContext& ctx, const float* w, float* g) const {
  if (!cfg_.tie_embeddings) return;
  // The embedding is unit 0 of this stage and wte is its first tensor.
  ctx.tied_wte = w + unit_offset_[0];
  ctx.tied_dwte = g + unit_offset_[0];
}

void Stage::forward(int slot, const float* input, const MicroBatch& mb, UnitContext& ctx,
                    const float* w) {
  if (!w) w = params_.data();
  Slot& s = slots_.at(static_cast<size_t>(slot));
  if (!has_embedding()) std::memcpy(s.input.data(), input, boundary_floats() * sizeof(float));
  ctx.B = B_;
  ctx.tokens = mb.tokens;
  ctx.targets = mb.targets;
  bind_tied(ctx, w, grads_.data());
  ctx.bf16 = bf16_.get();
  run_forward(s, recompute_ ? work_ : s, w, ctx, false);
}

const float* Stage::output(int slot) const {
  return (recompute_ ? work_ : slots_.at(static_cast<size_t>(slot))).outs.back().data();
}

const float* Stage::unit_output(int slot, int i) const {
  const Slot& a = recompute_ ? work_ : slots_.at(static_cast<size_t>(slot));
  return a.outs.at(static_cast<size_t>(i)).data();
}

void Stage::backward(int slot, const float* dout, const MicroBatch& mb, UnitContext& ctx,
                     const float* w) {
  if (!w) w = params_.data();
  Slot& s = slots_.at(static_cast<size_t>(slot));
  ctx.B = B_;
  ctx.tokens = mb.tokens;
  ctx.targets = mb.targets;
  bind_tied(ctx, w, grads_.data());
  ctx.bf16 = bf16_.get();
  Slot& a = recompute_ ? work_ : s;
  if (recompute_) {
    // The head's gradient was already taken in the forward; rerunning it would count it twice.
    const double loss_sum = ctx.loss_sum;
    const int64_t loss_count = ctx.loss_count;
    run_forward(s, a, w, ctx, true);
    ctx.loss_sum = loss_sum;
    ctx.loss_count = loss_count;
  }
  const size_t nb = boundary_floats();
  // Ping-pong between two boundary buffers: the gradient of unit i's output becomes the
  // gradient of unit i-1's output.
  const float* g_out = dout;
  float* bufs[2] = {din_.data(), dbuf_.data()};
  // Chosen so that the last unit processed (index 0) writes into din_.
  int which = static_cast<int>(units_.size() - 1) % 2;
  for (int i = static_cast<int>(units_.size()) - 1; i >= 0; --i) {
    const size_t off = unit_offset_[static_cast<size_t>(i)];
    float* g_in = (i == 0 && has_embedding()) ? nullptr : bufs[which];
    if (g_in) std::memset(g_in, 0, nb * sizeof(float));
    const auto ui = static_cast<size_t>(i);
    units_[ui]->backward(w + off, grads_.data() + off, unit_input(s, a, i), g_out, g_in,
                         acts_of(s, a, ui), scratch_.data(), ctx);
    g_out = g_in;
    which ^= 1;
  }
}

size_t Stage::activation_bytes() const {
  size_t n = 0;
  const auto count = [&](const Slot& s) {
    n += s.input.size();
    for (const auto& o : s.outs) n += o.size();
    for (const auto& a : s.acts) n += a.size();
  };
  for (const auto& s : slots_) count(s);
  count(work_);
  return n * sizeof(float);
}

}  // namespace pipenag
