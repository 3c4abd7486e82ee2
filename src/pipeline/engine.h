// Engines execute a Schedule over a set of StageWorkers. They decide only *when* an action runs,
// never what it computes, so for the same schedule and workers every engine produces the same
// bits:
//   sequential  one thread runs every stage's next runnable action (reference, tests);
//   threads     one thread per stage, in-process channels carrying (micro-batch id, tensor).
// The only things crossing a stage boundary are activations (forward) and their gradients
// (backward), keyed by micro-batch id.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "pipeline/schedule.h"
#include "pipeline/stage_worker.h"

namespace pipenag {

enum class EngineKind { Sequential, Threads };
std::string_view engine_name(EngineKind k);
// "sequential" | "threads"; Error otherwise (naming "mpi" as not available in this build).
EngineKind parse_engine_kind(std::string_view name);

// One timed interval of a stage, for the trace: compute (F, B, S) or waiting for a message (W).
struct TraceEvent {
  int stage = 0;
  char kind = 'F';        // 'F' forward, 'B' backward, 'S' step, 'W' wait
  int64_t mb = -1;        // micro-batch id within the run (-1 for waits on nothing specific)
  int64_t version = 0;    // the stage's weight version when the interval began
  double start = 0, end = 0;  // seconds since the engine's epoch
};

struct EngineOptions {
  EngineKind kind = EngineKind::Sequential;
  int blas_threads = 1;   // per stage thread (threads engine); the sequential engine keeps its own
  bool trace = false;     // record every interval in RunStats::events
  // Synchronous schedules: every stage clips by the gradient norm over all stages (the stages
  // exchange their sums of squares before each update; added in stage order, deterministic).
  bool global_clip = false;
  std::chrono::steady_clock::time_point epoch = std::chrono::steady_clock::now();
};

// What the hooks can read while the run is going.
class RunMonitor {
 public:
  virtual ~RunMonitor() = default;
  // Fraction of stage-time spent computing so far: measured (threads) or, for the sequential
  // engine, modelled: the timeline of the actions run so far, each taking its measured time, as
  // if every stage had its own core (kept up to date as actions run, O(1) per action).
  virtual double utilization() const = 0;
  virtual double elapsed() const = 0;  // seconds since the run began
};

struct EngineHooks {
  // After every Step, on the stage's own thread (k = stage index).
  std::function<void(int k, StageWorker& w, const RunMonitor& m)> on_step;
  // Polled by stage 0 before each forward that would begin an update: true ends the run early at
  // a drain point (all in-flight micro-batches finish, no new ones start).
  std::function<bool()> stop_requested;
};

struct RunStats {
  int64_t updates = 0;             // updates every stage completed
  int64_t microbatches = 0;        // micro-batches that went through the whole pipeline
  double wall = 0;                 // seconds
  std::vector<double> busy, wait;  // per stage, seconds computing / waiting for messages
  double utilization = 0;          // as RunMonitor::utilization, at the end
  std::vector<TraceEvent> events;  // with EngineOptions::trace
};

// Runs the whole schedule (validated by the caller). Exceptions from any stage stop every stage
// and are rethrown here.
RunStats run_schedule(const Schedule& s, const std::vector<StageWorker*>& workers,
                      const EngineOptions& opt, const EngineHooks& hooks);

// The schedule without the micro-batches from `cut` on (cut a multiple of microbatches): what
// a run ended early at `cut` executed. For async-1f1b, truncate(async(P, N), n) == async(P, n).
Schedule truncate_schedule(const Schedule& s, int64_t cut);

// Chrome trace-event JSON (viewable in Perfetto or chrome://tracing): one track per stage.
std::string trace_json(const std::vector<TraceEvent>& events, int stages);

}  // namespace pipenag
