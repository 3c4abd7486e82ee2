// Everything one pipeline stage owns and does: its Stage (weights, gradients, saved activations
// of in-flight micro-batches), its optimizer state, its weight versions for stashing, its
// micro-batch data, and the three actions forward(mb), backward(mb), step(). Engines call these
// in the order a Schedule gives; a worker never sees another stage's weights.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"
#include "optim/optimizer.h"
#include "pipeline/stage.h"

namespace pipenag {

// Fills tokens x[B*T] and targets y[B*T] of micro-batch `mb` (an id within the current run).
using BatchSource = std::function<void(int64_t mb, int32_t* x, int32_t* y)>;

struct StageOptions {
  int index = 0;            // stage k
  int first_unit = 0;       // units [first_unit, last_unit) of the model
  int last_unit = 0;
  int slots = 1;            // micro-batches in flight at most
  int stages = 1;           // P
  int delay = 0;            // tau_k of the schedule
  bool stash = true;        // backward under the weights its forward used
  bool recompute = false;   // keep only the stage input; rerun the forward in the backward
  float grad_scale = 1.0f;  // d(objective)/d(sum of token losses): 1 / tokens per update
};

// Bytes a stage holds, by kind (report and memory test).
struct StageMemory {
  size_t weights = 0;           // current weights
  size_t weight_versions = 0;   // stashed older versions
  size_t gradients = 0;
  size_t optimizer = 0;         // optimizer state
  size_t corrections = 0;       // PipeMare's delta / SpecTrain's smoothed update and buffers
  size_t activations = 0;       // saved activations of in-flight micro-batches
  size_t total() const {
    return weights + weight_versions + gradients + optimizer + corrections + activations;
  }
};

// Weight versions seen by one micro-batch: the stage's update count at its forward and the
// version of the weights its backward ran under (equal with stashing).
struct VersionRecord {
  int64_t mb = 0;
  int64_t forward_version = 0;
  int64_t backward_version = 0;
};

// The learning rate of update `version` on a stage with delay tau: the warm-up + cosine schedule,
// divided by tau^rho (optim.stage_lr_rho) and by tau^(1 - min(t/T, 1)) (optim.lr_reschedule).
double stage_lr_at(const Config& cfg, int tau, int64_t version);
// The first-moment coefficient of a stage with delay tau among P (optim.stage_momentum).
double stage_beta1_at(const Config& cfg, int tau, int P);

class StageWorker {
 public:
  StageWorker(const Config& cfg, const StageOptions& opt);

  const StageOptions& options() const { return opt_; }
  Stage& stage() { return stage_; }
  const Stage& stage() const { return stage_; }
  Optimizer& optimizer() { return *optim_; }
  const Optimizer& optimizer() const { return *optim_; }
  // State of the staleness corrections, by name, for checkpoints ("pipemare_delta", ...).
  std::vector<std::pair<std::string, std::vector<float>*>> correction_state();
  bool is_first() const { return stage_.has_embedding(); }
  bool is_last() const { return stage_.has_head(); }
  size_t boundary_floats() const { return stage_.boundary_floats(); }

  // Updates done on this stage (the current weight version).
  int64_t version() const { return version_; }
  void set_version(int64_t v) { version_ = v; }

  void set_batch_source(BatchSource src) { batches_ = std::move(src); }

  // Forward of micro-batch mb; `in` is the previous stage's output (ignored on the first stage).
  // Returns this stage's output (nullptr on the last stage), valid until the next action.
  const float* forward(int64_t mb, const float* in);
  // Backward of micro-batch mb; `dout` is the gradient of this stage's output (ignored on the
  // last stage). Returns the gradient of the stage input (nullptr on the first stage).
  const float* backward(int64_t mb, const float* dout);
  // Sum of squares of the stage's gradient (for a global norm over stages).
  double grad_sumsq() const;
  // Clips the gradient by its norm (this stage's own, or sqrt(global_sumsq) when >= 0), applies
  // the optimizer at the stage's learning rate for the current version, updates the
  // corrections' state, zeroes the gradient, and advances the version.
  void step(double global_sumsq = -1.0);
  // The learning rate update `version` of this stage uses: the warm-up + cosine schedule, divided
  // by tau_k^rho (optim.stage_lr_rho) and by tau_k^(1 - min(t/T, 1)) (optim.lr_reschedule).
  double stage_lr(int64_t version) const;
  // The momentum coefficient of this stage's optimizer settings (optim.stage_momentum).
  double stage_beta1() const { return beta1_; }

  // Last stage: sum and count of token losses since the last step (the update's loss).
  double update_loss() const;
  // Loss of the last completed update (last stage), its gradient norm and learning rate.
  double last_update_loss() const { return last_loss_; }
  double last_grad_norm() const { return last_norm_; }
  double last_lr() const { return last_lr_; }
  // Updates of this worker whose gradient norm exceeded train.clip (and so were scaled down).
  int64_t clipped_updates() const { return clipped_; }

  // Versions of every micro-batch since clear_records() (for tests and the trace).
  const std::vector<VersionRecord>& records() const { return records_; }
  void clear_records() { records_.clear(); }

  StageMemory memory() const;

  // A slot no micro-batch is in flight on: where an evaluation between two windows of a flow runs
  // without touching what in-flight micro-batches saved. At every cut of the three schedules a
  // stage has one (async-1f1b: tau_k in flight, tau_k + 1 slots; the others: none in flight).
  int free_slot() const;

  // The state of a flow paused at a cut, for checkpoints that do not drain the pipeline.
  struct InFlightRecord {
    int slot = 0;
    int64_t mb = 0;       // id within the flow's schedule
    int64_t version = 0;  // weight version its forward ran on
    double loss_sum = 0;  // last stage with a delay (extra_inflight): its loss, not yet counted
    int64_t loss_count = 0;
  };
  std::vector<InFlightRecord> in_flight() const;
  // The stashed weight versions in-flight micro-batches still need (version, weights).
  std::vector<std::pair<int64_t, std::vector<float>*>> stashed_versions();
  std::vector<int32_t>& slot_tokens(int slot) { return x_.at(static_cast<size_t>(slot)); }
  std::vector<int32_t>& slot_targets(int slot) { return y_.at(static_cast<size_t>(slot)); }
  // Marks `slot` as holding micro-batch mb forwarded on `version` (its buffers are filled by the
  // caller through stage().slot_state(slot)).
  void restore_in_flight(int slot, int64_t mb, int64_t version, double loss_sum = 0, int64_t loss_count = 0);
  // A stash buffer for `version`, to be filled by the caller.
  std::vector<float>& restore_stash(int64_t version);
  double loss_sum() const { return loss_sum_; }
  int64_t loss_count() const { return loss_count_; }
  void set_loss(double sum, int64_t count) {
    loss_sum_ = sum;
    loss_count_ = count;
  }

 private:
  struct InFlight {
    int64_t mb = -1;
    int64_t version = 0;
    double loss_sum = 0;     // last stage with a delay: the loss of its forward, counted at
    int64_t loss_count = 0;  // its backward (the update it enters)
  };
  int slot_of(int64_t mb) const;
  const float* weights_of_version(int64_t v) const;
  // Whether an in-flight micro-batch was forwarded on weight version `version`.
  bool in_use(int64_t version) const;
  void stash_current_if_needed();

  // The weights a forward (SpecTrain) or backward (PipeMare) runs on when a correction shifts them.
  const float* shifted_weights(bool forward);

  Config cfg_;
  StageOptions opt_;
  Stage stage_;
  double beta1_ = 0.0;
  std::unique_ptr<Optimizer> optim_;
  std::vector<float> delta_;    // PipeMare: EMA of w_new - w_old; SpecTrain: EMA of (w_old - w_new)/lr
  std::vector<float> prev_w_;   // the weights before the last update (corrections only)
  std::vector<float> shifted_;  // corrected weights for the action being run
  BatchSource batches_;
  int64_t version_ = 0;
  std::vector<InFlight> in_flight_;                  // per slot
  std::vector<std::vector<int32_t>> x_, y_;           // per slot
  struct Stashed {
    int64_t version = -1;  // -1: free
    std::vector<float> w;
  };
  std::vector<Stashed> stash_;
  std::vector<VersionRecord> records_;
  double loss_sum_ = 0.0;
  int64_t loss_count_ = 0;
  double last_loss_ = 0.0, last_norm_ = 0.0, last_lr_ = 0.0;
  int64_t clipped_ = 0;
};

}  // namespace pipenag
