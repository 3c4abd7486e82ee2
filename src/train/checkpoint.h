// Checkpoints: a folder with
//   model.safetensors      every weight under its PyTorch/nanoGPT name (loadable by PyTorch)
//   optimizer.safetensors  AdamW moments "exp_avg.<name>", "exp_avg_sq.<name>"
//   state.json             format version, step, data position, tokens seen, the full config
// written into a temporary folder and swapped in with one rename, so <out>/checkpoint is always
// a complete checkpoint (the previous one until the new one is whole). See docs/FORMATS.md.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "optim/adamw.h"
#include "pipeline/stage.h"

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
  AdamW* opt;  // may be null
};

// Written at a drain point: no micro-batch in flight, every stage at the same update count.
// state.json also records the stage layout (pipeline.stages and blocks per stage).
void save_checkpoint(const std::string& dir, const Config& cfg, const std::vector<StagePart>& parts,
                     const TrainState& st);
inline void save_checkpoint(const std::string& dir, const Config& cfg, const Stage& stage,
                            const AdamW* opt, const TrainState& st) {
  save_checkpoint(dir, cfg, {StagePart{const_cast<Stage*>(&stage), const_cast<AdamW*>(opt)}}, st);
}

// The config stored in a checkpoint (Error if the folder is not a readable checkpoint).
Config read_checkpoint_config(const std::string& dir);

// Restores weights (and optimizer/state when given). Error when the checkpoint's architecture
// differs from `cfg.model`, or on any damaged file.
// With `st` (resuming training), the checkpoint's stage layout must equal cfg's.
void load_checkpoint(const std::string& dir, const Config& cfg, const std::vector<StagePart>& parts,
                     TrainState* st);
inline void load_checkpoint(const std::string& dir, const Config& cfg, Stage& stage, AdamW* opt,
                            TrainState* st) {
  load_checkpoint(dir, cfg, {StagePart{&stage, opt}}, st);
}

// "" when equal, else a description of the first difference ("model.n_layer is 4 there, 6 here").
std::string model_config_difference(const ModelConfig& there, const ModelConfig& here);

}  // namespace pipenag
