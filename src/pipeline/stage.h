// A stage: one contiguous range of units with its own flat weights and gradients, and the saved
// activations of its in-flight micro-batches (one "slot" each). forward(slot), backward(slot)
// and the parameter buffers are all a stage offers; optimizers live outside and update the
// buffers. A stage never sees another stage's weights: only activations and their gradients
// cross its boundary.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"
#include "kernels/matmul_bf16.h"
#include "model/units.h"

namespace pipenag {

struct MicroBatch {
  const int32_t* tokens = nullptr;   // [B, T]
  const int32_t* targets = nullptr;  // [B, T]
};

class Stage {
 public:
  // Units [first_unit, last_unit) of make_gpt_units(cfg); B sequences per micro-batch; `slots`
  // micro-batches can be in flight at once. With `recompute`, a slot keeps only the stage input
  // (and the head's saved input gradient); backward() reruns the forward into one shared set of
  // activation buffers first.
  Stage(const ModelConfig& cfg, int first_unit, int last_unit, int B, int slots,
        bool recompute = false);

  const ModelConfig& model_config() const { return cfg_; }
  // bf16 matrix products (fp32 master weights and accumulation).
  void set_bf16(bool on);
  bool bf16() const { return bf16_ != nullptr; }
  // The bf16 backend in use ("" without bf16): see kernels/matmul_bf16.h.
  std::string bf16_backend() const { return bf16_ ? bf16_->backend() : std::string(); }
  int micro_batch_size() const { return B_; }
  int num_slots() const { return static_cast<int>(slots_.size()); }
  bool has_embedding() const { return first_ == 0; }
  bool has_head() const { return last_ == static_cast<int>(all_units_); }
  bool recompute() const { return recompute_; }
  int first_unit() const { return first_; }
  int last_unit() const { return last_; }

  size_t num_params() const { return n_params_; }
  float* params() { return params_.data(); }
  const float* params() const { return params_.data(); }
  float* grads() { return grads_.data(); }
  const float* grads() const { return grads_.data(); }
  // Every tensor of the stage with its global name; offsets index params()/grads().
  const std::vector<ParamSpec>& param_table() const { return table_; }
  void init_params(uint64_t seed);
  void zero_grads();

  // Floats of one activation crossing a stage boundary: [B, T, C].
  size_t boundary_floats() const;

  // Forward of micro-batch `mb` into `slot`. `input` is the previous stage's output (ignored on
  // the first stage). On the last stage the loss lands in ctx (loss_sum, loss_count); set
  // ctx.grad_scale before. `w` selects the weights to use (default: params()).
  void forward(int slot, const float* input, const MicroBatch& mb, UnitContext& ctx,
               const float* w = nullptr);
  // The output activation of the slot's last forward (not on the last stage). With recompute,
  // valid only until the next forward or backward.
  const float* output(int slot) const;
  // Output of the stage's i-th unit (0-based within the stage) from the slot's last forward
  // (with recompute: from the stage's last forward or backward).
  const float* unit_output(int slot, int i) const;
  // Backward of the slot: `dout` is the gradient of this stage's output (ignored on the last
  // stage). Gradients accumulate into grads(); the input gradient is returned by input_grad().
  // With recompute, the forward is rerun under `w` first (except the head, whose gradient was
  // computed in the forward).
  void backward(int slot, const float* dout, const MicroBatch& mb, UnitContext& ctx,
                const float* w = nullptr);
  const float* input_grad() const { return din_.data(); }

  // What a slot holds between its forward and its backward (stage input, unit outputs, saved
  // activations), by name ("input", "out.3", "act.2"); empty buffers are left out. A checkpoint
  // taken with micro-batches in flight saves and restores these, so the backward finds exactly
  // what its forward left.
  std::vector<std::pair<std::string, std::vector<float>*>> slot_state(int slot);

  // Bytes of saved activations: all slots, plus the shared recompute buffers.
  size_t activation_bytes() const;
  size_t scratch_bytes() const { return scratch_.size() * sizeof(float); }

 private:
  struct Slot {
    std::vector<float> input;               // copy of the stage input (not on the first stage)
    std::vector<std::vector<float>> outs;   // output of each unit except the head
    std::vector<std::vector<float>> acts;   // saved activations of each unit
  };
  const float* unit_input(const Slot& saved, const Slot& a, int i) const;
  bool is_head(size_t i) const { return has_head() && i + 1 == units_.size(); }
  // Where unit i's saved activations live: the slot's own, or (recompute) the shared set.
  float* acts_of(Slot& saved, Slot& a, size_t i) const;
  void run_forward(Slot& saved, Slot& a, const float* w, UnitContext& ctx, bool skip_head);
  void bind_tied(UnitContext& ctx, const float* w, float* g) const;

  ModelConfig cfg_;
  std::vector<std::unique_ptr<Unit>> units_;  // only this stage's units
  size_t all_units_ = 0;
  int first_ = 0, last_ = 0, B_ = 0;
  std::unique_ptr<kernels::Bf16Linear> bf16_;
  std::vector<size_t> unit_offset_;  // into the flat buffers
  std::vector<ParamSpec> table_;
  size_t n_params_ = 0;
  std::vector<float> params_, grads_, scratch_, dbuf_, din_;
  std::vector<Slot> slots_;
  bool recompute_ = false;
  Slot work_;  // recompute: the activations of the micro-batch being computed
};

}  // namespace pipenag
