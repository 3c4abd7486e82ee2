// The training loop: data, the pipeline (stages, schedule, engine; a single stage is the P = 1
// case), per-stage clipping and AdamW with the warm-up + cosine schedule, evaluation, metrics,
// progress, trace and checkpoints. A run is one schedule, run as a Flow that pauses at
// consistent cuts for evaluations, checkpoints and signals without draining (docs/ARCHITECTURE.md).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/config.h"
#include "pipeline/stage_worker.h"

namespace pipenag {

struct TrainOptions {
  bool resume = false;     // continue from <out>/checkpoint
  bool force = false;      // start over in an out.dir that holds an earlier run (removing it)
  int64_t stop_at = -1;    // stop (with a checkpoint) after this many updates, as if interrupted
  bool quiet = false;      // no progress output
  std::string trace;       // write a Chrome trace-event JSON of every stage's actions here
};

struct TrainResult {
  int64_t steps = 0;
  double last_loss = 0.0;     // training loss of the last step
  double val_loss = -1.0;     // last evaluation (-1: none)
  double val_ppl = -1.0;
  double tokens_per_s = 0.0;  // mean over this invocation
  double utilization = -1.0;  // of the last segment (fraction of stage-time computing)
  std::string checkpoint;     // folder of the final checkpoint
  bool already_finished = false;  // --resume of a run that had reached train.steps: nothing done
};

TrainResult train(const Config& cfg, const TrainOptions& opt);

// The stage workers of cfg's pipeline (partition, slots from the schedule, delays, stashing,
// recomputation), weights not yet initialised. With `only` >= 0 (mpi: this rank's stage), only
// that stage's worker is made; the others are null.
std::vector<std::unique_ptr<StageWorker>> make_workers(const Config& cfg, int only = -1);

// The folder with train.bin / val.bin / meta.json for this config: data.dir, or <out.dir>/data,
// prepared from data.input with data.tokenizer when missing or made with other settings.
// `note` (optional) says why an existing cache was rebuilt.
std::string prepared_data_dir(const Config& cfg, std::string* note = nullptr);
// The tokenizer spec the config's data was made with (for sampling).
std::string tokenizer_spec(const Config& cfg);

// Mean validation loss of a checkpoint on `batches` batches of the configured validation split.
struct EvalResult {
  double loss = 0.0, ppl = 0.0;
  int64_t tokens = 0;
};
EvalResult evaluate_checkpoint(const std::string& checkpoint_dir, const Config& cfg, int batches);

}  // namespace pipenag
