#include "pipeline/stage_worker.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "optim/grad_clip.h"
#include "optim/lr_schedule.h"
#include "util/error.h"

namespace pipenag {

namespace {

OptimizerSettings settings_of(const OptimConfig& o, double beta1) {
  OptimizerSettings s;
  s.name = o.name;
  s.beta1 = beta1;
  s.beta2 = o.beta2;
  s.eps = o.eps;
  s.weight_decay = o.weight_decay;
  s.momentum_decay = o.momentum_decay;
  s.gamma = o.gamma;
  s.gamma_theory = o.gamma_theory;
  s.adaptive = o.adaptive;
  return s;
}

}  // namespace

StageWorker::StageWorker(const Config& cfg, const StageOptions& opt)
    : cfg_(cfg),
      opt_(opt),
      stage_(cfg.model, opt.first_unit, opt.last_unit, cfg.train.batch_size, opt.slots,
             opt.recompute) {
  const OptimConfig& o = cfg.optim;
  // Ours-No-WS: stages with a longer delay lean more on momentum.
  beta1_ = stage_beta1_at(cfg, opt.delay, opt.stages);
  optim_ = make_optimizer(settings_of(o, beta1_), stage_.num_params());
  if ((o.pipemare || o.spectrain) && opt.delay > 0) {
    delta_.assign(stage_.num_params(), 0.0f);
    prev_w_.assign(stage_.num_params(), 0.0f);
    shifted_.assign(stage_.num_params(), 0.0f);
  }
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

bool StageWorker::in_use(int64_t version) const {
  for (const auto& f : in_flight_)
    if (f.mb >= 0 && f.version == version) return true;
  return false;
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
  stage_.forward(slot, in, MicroBatch{x_[s].data(), y_[s].data()}, ctx, shifted_weights(true));
  // A micro-batch's loss belongs to the update its backward enters: the same one unless the last
  // stage has a delay (pipeline.extra_inflight), where it waits in the slot until then.
  if (opt_.delay > 0) {
    in_flight_[s].loss_sum = ctx.loss_sum;
    in_flight_[s].loss_count = ctx.loss_count;
  } else {
    loss_sum_ += ctx.loss_sum;
    loss_count_ += ctx.loss_count;
  }
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
  const float* shifted = shifted_weights(false);
  stage_.backward(slot, dout, MicroBatch{x_[s].data(), y_[s].data()}, ctx,
                  shifted ? shifted : weights_of_version(bv));
  records_.push_back({mb, fv, bv});
  loss_sum_ += in_flight_[s].loss_sum;
  loss_count_ += in_flight_[s].loss_count;
  in_flight_[s] = InFlight{};
  // A stashed version no in-flight micro-batch needs any more is freed for reuse.
  for (auto& st : stash_)
    if (st.version >= 0 && !in_use(st.version)) st.version = -1;
  return is_first() ? nullptr : stage_.input_grad();
}

void StageWorker::stash_current_if_needed() {
  if (!opt_.stash || !in_use(version_)) return;
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

double stage_lr_at(const Config& cfg, int tau, int64_t version) {
  const TrainConfig& t = cfg.train;
  const OptimConfig& o = cfg.optim;
  double lr = lr_at(version, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio);
  if (tau >= 1) {
    if (o.stage_lr_rho > 0) lr /= std::pow(static_cast<double>(tau), o.stage_lr_rho);
    if (o.lr_reschedule) {
      const int64_t horizon = o.lr_reschedule_steps > 0 ? o.lr_reschedule_steps : std::max<int64_t>(1, t.steps * 14 / 100);
      const double p = std::min(1.0, static_cast<double>(version) / static_cast<double>(horizon));
      lr /= std::pow(static_cast<double>(tau), 1.0 - p);
    }
  }
  return lr;
}

double stage_beta1_at(const Config& cfg, int tau, int P) {
  const OptimConfig& o = cfg.optim;
  return o.stage_momentum ? o.beta1 + tau * (0.99 - o.beta1) / P : o.beta1;
}

double StageWorker::stage_lr(int64_t version) const { return stage_lr_at(cfg_, opt_.delay, version); }

const float* StageWorker::shifted_weights(bool forward) {
  if (delta_.empty()) return nullptr;
  const OptimConfig& o = cfg_.optim;
  // SpecTrain moves the forward to where the weights will be when its gradient is applied,
  // tau_k updates from now; PipeMare moves the backward back to where the forward probably was.
  float scale;
  if (forward && o.spectrain) scale = -static_cast<float>(opt_.delay * stage_lr(version_));
  else if (!forward && o.pipemare) scale = -static_cast<float>(opt_.delay);
  else return nullptr;
  const float* w = stage_.params();
  const float* d = delta_.data();
  float* out = shifted_.data();
  const long n = static_cast<long>(delta_.size());
#pragma omp parallel for simd schedule(static)
  for (long i = 0; i < n; ++i) out[i] = w[i] + scale * d[i];
  return out;
}

double StageWorker::grad_sumsq() const { return sum_squares(stage_.grads(), stage_.num_params()); }

void StageWorker::step(double global_sumsq) {
  stash_current_if_needed();
  const size_t n = stage_.num_params();
  const double norm = std::sqrt(global_sumsq >= 0 ? global_sumsq : grad_sumsq());
  const double lr = stage_lr(version_);
  if (!delta_.empty()) std::memcpy(prev_w_.data(), stage_.params(), n * sizeof(float));
  optim_->step(stage_.params(), stage_.grads(), lr, clip_scale(norm, cfg_.train.clip));
  if (!delta_.empty()) {
    // PipeMare's delta averages w_new - w_old; SpecTrain's smoothed update averages
    // (w_old - w_new) / lr, the step direction per unit learning rate.
    const float a = static_cast<float>(cfg_.optim.delta_decay);
    const float b = static_cast<float>(1.0 - cfg_.optim.delta_decay);
    const bool spec = cfg_.optim.spectrain;
    const float inv_lr = spec && lr > 0 ? static_cast<float>(1.0 / lr) : 0.0f;
    const float* w = stage_.params();
    const float* pw = prev_w_.data();
    float* d = delta_.data();
    const long nl = static_cast<long>(n);
#pragma omp parallel for simd schedule(static)
    for (long i = 0; i < nl; ++i) {
      const float change = spec ? (pw[i] - w[i]) * inv_lr : w[i] - pw[i];
      d[i] = a * d[i] + b * change;
    }
  }
  stage_.zero_grads();
  last_loss_ = update_loss();
  last_norm_ = norm;
  last_lr_ = lr;
  if (cfg_.train.clip > 0 && norm > cfg_.train.clip) ++clipped_;
  loss_sum_ = 0.0;
  loss_count_ = 0;
  ++version_;
}

int StageWorker::free_slot() const {
  const int s = slot_of(-1);
  if (s < 0)
    throw Error("stage " + std::to_string(opt_.index) + ": no free slot for an evaluation (internal error)");
  return s;
}

std::vector<StageWorker::InFlightRecord> StageWorker::in_flight() const {
  std::vector<InFlightRecord> out;
  for (size_t i = 0; i < in_flight_.size(); ++i)
    if (in_flight_[i].mb >= 0)
      out.push_back({static_cast<int>(i), in_flight_[i].mb, in_flight_[i].version, in_flight_[i].loss_sum,
                     in_flight_[i].loss_count});
  return out;
}

std::vector<std::pair<int64_t, std::vector<float>*>> StageWorker::stashed_versions() {
  std::vector<std::pair<int64_t, std::vector<float>*>> out;
  for (auto& st : stash_)
    if (st.version >= 0) out.emplace_back(st.version, &st.w);
  return out;
}

void StageWorker::restore_in_flight(int slot, int64_t mb, int64_t version, double loss_sum, int64_t loss_count) {
  if (slot < 0 || slot >= opt_.slots || in_flight_[static_cast<size_t>(slot)].mb >= 0 || slot_of(mb) >= 0)
    throw Error("stage " + std::to_string(opt_.index) + ": cannot restore micro-batch " + std::to_string(mb) +
                " into slot " + std::to_string(slot) + " (the checkpoint does not fit this pipeline)");
  in_flight_[static_cast<size_t>(slot)] = {mb, version, loss_sum, loss_count};
}

std::vector<float>& StageWorker::restore_stash(int64_t version) {
  stash_.push_back(Stashed{version, std::vector<float>(stage_.num_params())});
  return stash_.back().w;
}

std::vector<std::pair<std::string, std::vector<float>*>> StageWorker::correction_state() {
  if (delta_.empty()) return {};
  return {{cfg_.optim.spectrain ? "spectrain_update" : "pipemare_delta", &delta_}};
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
  for (const auto& [name, buf] : const_cast<Optimizer&>(*optim_).state_tensors())
    m.optimizer += buf->size() * sizeof(float);
  m.corrections = (delta_.size() + prev_w_.size() + shifted_.size()) * sizeof(float);
  m.activations = stage_.activation_bytes();
  return m;
}

}  // namespace pipenag
