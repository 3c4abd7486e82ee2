#include "pipeline/stage_worker.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "optim/grad_clip.h"
#include "optim/lr_schedule.h"
#include "util/error.h"

namespace pipenag {

StageWorker::StageWorker(const Config& cfg, const StageOptions& opt)
    : cfg_(cfg),
      opt_(opt),
      stage_(cfg.model, opt.first_unit, opt.last_unit, cfg.train.batch_size, opt.slots,
             opt.recompute),
      adamw_(stage_.num_params(), AdamWHyper{cfg.train.beta1, cfg.train.beta2, cfg.train.eps,
                                             cfg.train.weight_decay}) {
  stage_.set_bf16(cfg.train.bf16);
  const size_t bt = static_cast<size_t>(cfg.train.batch_size) * cfg.model.block_size;
  in_flight_.resize(static_cast<size_t>(opt.slots));
  x_.assign(static_cast<size_t>(opt.slots), std::vector<int32_t>(bt));
  y_.assign(static_cast<size_t>(opt.slots), std::vector<int32_t>(bt));
}

int StageWorker::slot_of(int64_t mb) const {
  for (size_t i = 0; i < in_flight_.size(); ++i)
    if (in_flight_[i].mb == mb) return static_cast<int>(i);
  return -1;
}

const float* StageWorker::weights_of_version(int64_t v) const {
  if (v == version_) return stage_.params();
  for (const auto& s : stash_)
    if (s.version == v) return s.w.data();
  throw Error("stage " + std::to_string(opt_.index) + ": weight version " + std::to_string(v) +
              " is not stashed (internal error)");
}

const float* StageWorker::forward(int64_t mb, const float* in) {
  if (slot_of(mb) >= 0)
    throw Error("stage " + std::to_string(opt_.index) + ": micro-batch " + std::to_string(mb) +
                " is already in flight");
  const int slot = slot_of(-1);
  if (slot < 0)
    throw Error("stage " + std::to_string(opt_.index) + ": more than " +
                std::to_string(opt_.slots) + " micro-batches in flight");
  const auto s = static_cast<size_t>(slot);
  in_flight_[s] = {mb, version_};
  // Only the ends read data: tokens on the first stage, targets on the last.
  if (batches_ && (is_first() || is_last())) batches_(mb, x_[s].data(), y_[s].data());
  UnitContext ctx;
  ctx.training = true;
  ctx.grad_scale = opt_.grad_scale;
  stage_.forward(slot, in, MicroBatch{x_[s].data(), y_[s].data()}, ctx);
  loss_sum_ += ctx.loss_sum;
  loss_count_ += ctx.loss_count;
  return is_last() ? nullptr : stage_.output(slot);
}

const float* StageWorker::backward(int64_t mb, const float* dout) {
  const int slot = slot_of(mb);
  if (slot < 0)
    throw Error("stage " + std::to_string(opt_.index) + ": backward of micro-batch " +
                std::to_string(mb) + " that is not in flight");
  const auto s = static_cast<size_t>(slot);
  const int64_t fv = in_flight_[s].version;
  // Stashing: the weights the forward used. Without: the current ones (an inconsistent
  // gradient when they have moved since).
  const int64_t bv = opt_.stash ? fv : version_;
  UnitContext ctx;
  ctx.training = true;
  ctx.grad_scale = opt_.grad_scale;
  stage_.backward(slot, dout, MicroBatch{x_[s].data(), y_[s].data()}, ctx, weights_of_version(bv));
  records_.push_back({mb, fv, bv});
  in_flight_[s] = InFlight{};
  // A stashed version no in-flight micro-batch needs any more is freed for reuse.
  for (auto& st : stash_) {
    if (st.version < 0) continue;
    bool used = false;
    for (const auto& f : in_flight_) used |= f.mb >= 0 && f.version == st.version;
    if (!used) st.version = -1;
  }
  return is_first() ? nullptr : stage_.input_grad();
}

void StageWorker::stash_current_if_needed() {
  if (!opt_.stash) return;
  bool used = false;
  for (const auto& f : in_flight_) used |= f.mb >= 0 && f.version == version_;
  if (!used) return;
  auto it = std::find_if(stash_.begin(), stash_.end(), [](const Stashed& s) { return s.version < 0; });
  if (it == stash_.end()) {
    // Grows to tau_k buffers during the first warm-up, then is reused.
    stash_.push_back(Stashed{});
    it = stash_.end() - 1;
    it->w.resize(stage_.num_params());
  }
  std::memcpy(it->w.data(), stage_.params(), stage_.num_params() * sizeof(float));
  it->version = version_;
}

void StageWorker::step() {
  stash_current_if_needed();
  const size_t n = stage_.num_params();
  const double norm = std::sqrt(sum_squares(stage_.grads(), n));
  const TrainConfig& t = cfg_.train;
  const double lr = lr_at(version_, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio);
  adamw_.step(stage_.params(), stage_.grads(), lr, clip_scale(norm, t.clip));
  stage_.zero_grads();
  last_loss_ = update_loss();
  last_norm_ = norm;
  last_lr_ = lr;
  loss_sum_ = 0.0;
  loss_count_ = 0;
  ++version_;
}

double StageWorker::update_loss() const {
  return loss_count_ ? loss_sum_ / static_cast<double>(loss_count_) : 0.0;
}

StageMemory StageWorker::memory() const {
  StageMemory m;
  const size_t w = stage_.num_params() * sizeof(float);
  m.weights = w;
  m.gradients = w;
  for (const auto& s : stash_) m.weight_versions += s.w.size() * sizeof(float);
  m.optimizer = (adamw_.m().size() + adamw_.v().size()) * sizeof(float);
  m.activations = stage_.activation_bytes();
  return m;
}

}  // namespace pipenag
