// Model and training configuration: plain structs, no parsing (see src/train/config_file.h).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace pipenag {

enum class Activation { ReLU, GELU };

struct ModelConfig {
  int n_layer = 6;
  int n_embd = 384;
  int n_head = 6;
  int block_size = 256;   // context length T
  int vocab_size = 65;
  Activation activation = Activation::ReLU;
  bool tie_embeddings = false;
  uint64_t seed = 1337;   // weight initialisation seed (same on every stage)
};

struct TrainConfig {
  int64_t steps = 1000;       // optimizer updates
  int batch_size = 8;         // sequences per micro-batch (pipeline.microbatches of them per update)
  double lr = 3e-4;           // peak learning rate
  int64_t warmup_steps = 100; // linear warm-up from 0 to lr
  double min_lr_ratio = 0.1;  // cosine decays to lr * min_lr_ratio at `steps`
  double clip = 1.0;          // per-stage gradient-norm clipping threshold; <= 0 disables
  bool clip_global = false;   // synchronous schedules: clip by the norm over all stages
  uint64_t seed = 1337;       // data order seed
  int64_t eval_every = 100;   // steps between evaluations; 0 disables
  int eval_batches = 10;      // validation batches per evaluation, spread over the split (0: all)
  int64_t checkpoint_every = 0;  // 0: only at the end
  int64_t log_every = 10;     // steps between plain log lines (not on a terminal)
  int threads = 0;            // 0: all cores
  bool bf16 = false;          // bf16 matmul inputs, fp32 master weights
};

struct DataConfig {
  std::string input;          // text file or folder of .txt files, tokenised into <out.dir>/data
  std::string tokenizer = "byte";  // byte | gpt2 | path to a tokenizer (see data/tokenizer.h)
  std::string dir;            // a folder written by `pipenag prepare` (then input is not read)
  std::string order = "sequential";  // training batch order: sequential | shuffled
  double val_fraction = 0.1;  // fraction of the documents held out for validation
  uint64_t split_seed = 0;    // seed of the document split
};

// pipeline.partition: blocks per stage, the default split, or "auto" (pipeline/partition.h).
struct Partition {
  bool automatic = false;  // "auto": cut by the measured cost of every unit
  std::vector<int> blocks; // explicit blocks per stage; empty (and not automatic): the default
  Partition() = default;
  Partition(std::initializer_list<int> b) : blocks(b) {}
  explicit Partition(std::vector<int> b) : blocks(std::move(b)) {}
  static Partition make_auto() {
    Partition p;
    p.automatic = true;
    return p;
  }
  bool is_default() const { return !automatic && blocks.empty(); }
  bool operator==(const Partition&) const = default;
};

// How the model is cut into stages and how micro-batches flow through them (src/pipeline/).
struct PipelineConfig {
  int stages = 1;                   // P
  Partition partition;              // blocks per stage (see pipeline/partition.h)
  std::string schedule = "gpipe";   // gpipe | 1f1b | async-1f1b
  int microbatches = 1;             // M micro-batches of train.batch_size per update (sync)
  std::string engine = "sequential";  // sequential | threads | mpi
  bool stash = true;                // async: backward under the weights its forward used
  bool recompute = false;           // keep only stage inputs; recompute the forward in backward
  // Emulated network and devices (timing only, never results): one value for every stage
  // boundary (stage), or one per boundary (stage).
  std::vector<double> link_latency_ms{0.0};
  std::vector<double> link_bandwidth_mbps{0.0};  // megabits/s; 0: unlimited
  std::vector<double> stage_slowdown{1.0};       // >= 1: compute as if this many times slower
  double peer_timeout_s = 60;                    // mpi: a rank silent this long is lost
  int extra_inflight = 0;  // async-1f1b: E more in flight per boundary (tau_k = (P-1-k)(1+E))
};

// The optimizer every stage runs, and the staleness corrections (PAPER.md sections 2, 3).
struct OptimConfig {
  std::string name = "adamw";   // sgd | nag | adamw | nadamw | nag-delay (optim/optimizer.h)
  double beta1 = 0.9;           // momentum / first-moment decay
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;   // decoupled, on all parameters
  double momentum_decay = 0.004;  // nadamw's psi
  double gamma = 0.99;          // nag-delay momentum
  bool gamma_theory = false;    // nag-delay: gamma_t = max(0, (t-2)/t)
  bool adaptive = false;        // nag-delay: Adam-style second-moment scaling
  // Corrections (async-1f1b only; each stage knows its delay tau_k):
  bool lr_reschedule = false;   // eta_k(t) = eta / tau_k^(1 - min(t/T, 1))
  int64_t lr_reschedule_steps = 0;  // T (0: 14% of train.steps, the reference's 7k of 50k)
  bool pipemare = false;        // backward on w - tau_k * delta (needs stash off)
  bool spectrain = false;       // forward on w - tau_k * lr * smoothed update (needs stash off)
  double delta_decay = 0.9;     // EMA coefficient of delta / the smoothed update
  bool stage_momentum = false;  // beta1_k = beta1 + tau_k (0.99 - beta1) / P
  double stage_lr_rho = 0.0;    // eta_k = eta / tau_k^rho for tau_k >= 1 (0: off)
};

struct OutConfig {
  std::string dir = "out";
};

struct Config {
  std::string method;           // the preset applied first (train/methods.h), "" for none
  ModelConfig model;
  TrainConfig train;
  DataConfig data;
  PipelineConfig pipeline;
  OptimConfig optim;
  OutConfig out;
};

}  // namespace pipenag
