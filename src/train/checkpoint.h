// Checkpoints: a folder with
//   model.safetensors      every weight under its PyTorch/nanoGPT name (loadable by PyTorch)
//   optimizer.safetensors  optimizer state "<state>.<name>" (AdamW/NAdamW: exp_avg, exp_avg_sq)
//                          and correction state (pipemare_delta / spectrain_update) per weight
//   state.json             format version, step, data position, tokens seen, stage layout,
//                          optimizer name and scalars per stage, the full config
// written into a temporary folder and swapped in with one rename, so <out>/checkpoint is always
// a complete checkpoint (the previous one until the new one is whole). See docs/FORMATS.md.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "optim/optimizer.h"
#include "pipeline/engine.h"
#include "pipeline/stage.h"
#include "pipeline/stage_worker.h"

namespace pipenag {

struct TrainState {
  int64_t step = 0;           // optimizer updates done
  int64_t data_position = 0;  // next training batch index
  int64_t tokens = 0;         // training tokens seen
};

// One stage's share of a checkpoint: its weights and, when given, its optimizer state. The
// stages of a pipeline together hold every tensor once; names are global, so the files are the
// same whatever the cut.
struct StagePart {
  Stage* stage;
  Optimizer* opt = nullptr;  // may be null (eval, sample: weights only)
  std::vector<std::pair<std::string, std::vector<float>*>> extra;  // correction state
  StageWorker* worker = nullptr;  // training: its in-flight micro-batches and stashes (FlowState)
};

// A pipeline paused at a cut rather than drained: the schedule it runs (from its drained start)
// and the messages in transit. With it, a checkpoint also stores each stage's in-flight
// micro-batches (slot contents, tokens, forward version), the stashed weight versions they need
// and the loss accumulated since the last step (flow.safetensors, state.json "flow"), so that a
// resume continues the very same flow.
struct FlowState {
  int64_t base_step = 0;         // weight version at the schedule's start
  int64_t base_position = 0;     // data position of the schedule's micro-batch 0
  int64_t schedule_updates = 0;  // updates the schedule was made for
  std::vector<Flow::Message> messages;
  bool mid_flow = false;         // loaded: something was in flight or in transit
  std::string reshard;           // loaded under another stage layout: what changed ("" if none)
};

// Written at a drain point: no micro-batch in flight, every stage at the same update count.
// state.json also records the stage layout (pipeline.stages and blocks per stage).
// With `flow`, the parts' workers' in-flight state is saved too.
void save_checkpoint(const std::string& dir, const Config& cfg, const std::vector<StagePart>& parts,
                     const TrainState& st, const FlowState* flow = nullptr);

// mpi (collective: every rank calls it with its own stage): each rank writes
// stage<k>.safetensors (weights, optimizer and correction state under their global names, its
// in-flight state and the messages it receives) into the new folder; rank 0 then writes
// state.json, the manifest listing every file with its checksum, last, and swaps the folder in.
// out.dir must be one folder every rank sees (a shared filesystem across machines).
void save_checkpoint_sharded(const std::string& dir, const Config& cfg, const StagePart& part, const TrainState& st,
                             const FlowState& flow, double timeout_s);

// The config stored in a checkpoint (Error if the folder is not a readable checkpoint).
Config read_checkpoint_config(const std::string& dir);

// The blocks per stage the checkpoint was trained with (its stage layout).
std::vector<int> checkpoint_blocks_per_stage(const std::string& dir);

// Restores weights (and optimizer/state when given). Error when the checkpoint's architecture
// differs from `cfg.model`, or on any damaged file.
// Any stage layout reads any checkpoint (tensors go by global name); resuming under another
// layout than the checkpoint's (resharding) drops its flow, and `flow->reshard` says so.
// With `flow` (resuming training, parts with workers), the in-flight state is restored into the
// workers and `flow` receives the schedule identity and the messages (mid_flow false when the
// checkpoint holds none: a drained pipeline).
void load_checkpoint(const std::string& dir, const Config& cfg, const std::vector<StagePart>& parts,
                     TrainState* st, FlowState* flow = nullptr);
// Weights only, into one stage holding the whole model (eval, sample).
inline void load_weights(const std::string& dir, const Config& cfg, Stage& stage) {
  load_checkpoint(dir, cfg, {StagePart{&stage, nullptr, {}}}, nullptr);
}

// Resuming a checkpoint trained with config `there` under config `here`: Error naming the first
// key whose change would make the continuation a different run (batch size, data, data order,
// schedule, micro-batches, stashing, recomputation); the returned lines say what else changes
// ("train.lr: 0.001 -> 0.0006"). Threads, engine and out.dir may change freely.
std::vector<std::string> resume_config_changes(const Config& there, const Config& here);

// Error naming the first tensor of `stage` that holds a NaN or an infinity (eval and sample
// refuse such weights instead of printing "nan").
void require_finite_weights(const std::string& dir, const Stage& stage);

// "" when equal, else a description of the first difference ("model.n_layer is 4 there, 6 here").
std::string model_config_difference(const ModelConfig& there, const ModelConfig& here);

}  // namespace pipenag
