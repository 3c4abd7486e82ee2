// A GPT is a list of units: embedding, block x n_layer, head. A unit owns a contiguous slice of a
// flat parameter buffer (described by its ParamSpec table) and knows how many floats of saved
// activations one micro-batch needs. Units compose into any contiguous range (a pipeline stage).
//
// Data flow between units is always an activation [B, T, C]; the embedding reads tokens instead
// of an input, and the head ends in the loss.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/param_table.h"

namespace pipenag {
namespace kernels {
class Bf16Linear;
}

// The kinds of work in a unit, for a time profile of the step (pipenag bench --profile).
enum class Work { Linear, Attention, LayerNorm, Activation, Residual, Embedding, SoftmaxXent, kCount };
const char* work_name(Work op);
struct OpTimes {
  std::array<double, static_cast<size_t>(Work::kCount)> seconds{};
};

// What a unit's forward/backward needs besides weights and activations.
struct UnitContext {
  int B = 0;                          // sequences in the micro-batch
  const int32_t* tokens = nullptr;    // [B, T], read by the embedding
  const int32_t* targets = nullptr;   // [B, T], read by the head; < 0 = ignored position
  bool training = true;               // head: compute the gradient during the forward
  float grad_scale = 1.0f;            // head: d(objective) / d(sum of per-token losses)
  // Tied embeddings: the head reads wte / accumulates dwte through these (set by the owner).
  const float* tied_wte = nullptr;
  float* tied_dwte = nullptr;
  // When set, the linear layers' matrix products run in bf16 through it (fp32 accumulation).
  kernels::Bf16Linear* bf16 = nullptr;
  // When set, each op's time is added here.
  OpTimes* profile = nullptr;
  // Outputs of the head.
  double loss_sum = 0.0;              // sum of per-token losses of the micro-batch
  int64_t loss_count = 0;             // positions that counted
};

class Unit {
 public:
  virtual ~Unit() = default;
  virtual std::string kind() const = 0;

  const std::vector<ParamSpec>& params() const { return params_; }
  size_t num_params() const { return num_params_; }

  // Floats of saved activations per micro-batch of B sequences (the unit's input not included).
  virtual size_t act_floats(int B) const = 0;
  // Floats of scratch shared by all units of an owner (sized for the largest unit).
  virtual size_t scratch_floats(int B) const = 0;
  // Parameters that enter matrix products (for the FLOP count), per token.
  virtual size_t matmul_params() const = 0;

  // in: [B,T,C] (embedding: unused); out: [B,T,C] (head: unused, writes the loss into ctx).
  // g: gradient buffer of the unit; the head, when ctx.training, accumulates its gradients here
  // already during the forward (its backward then only hands back the saved input gradient).
  virtual void forward(const float* w, float* g, const float* in, float* out, float* acts,
                       float* scratch, UnitContext& ctx) const = 0;
  // dout: gradient of the unit's output (head: unused). din: gradient of the input, accumulated
  // (+=); null for the embedding. Parameter gradients accumulate into g.
  virtual void backward(const float* w, float* g, const float* in, const float* dout, float* din,
                        const float* acts, float* scratch, UnitContext& ctx) const = 0;

 protected:
  void add_param(const std::string& name, std::vector<int64_t> shape, ParamInit init);
  const ModelConfig cfg_;
  explicit Unit(const ModelConfig& cfg) : cfg_(cfg) {}

 private:
  std::vector<ParamSpec> params_;
  size_t num_params_ = 0;
};

// The units of the whole model in order: [embedding, block 0 .. block L-1, head].
std::vector<std::unique_ptr<Unit>> make_gpt_units(const ModelConfig& cfg);

// Training FLOPs per token (forward + backward): 6 * matmul weights + 12 * L * C * T (attention).
double train_flops_per_token(const ModelConfig& cfg);

}  // namespace pipenag
