// Engines execute a Schedule over a set of StageWorkers. They decide only *when* an action runs,
// never what it computes, so for the same schedule and workers every engine produces the same
// bits:
//   sequential  one thread runs every stage's next runnable action (reference, tests);
//   threads     one thread per stage, in-process channels carrying (micro-batch id, tensor);
//   mpi         one rank per stage (this process runs the stages whose workers it holds; the
//               others' messages go through MPI, src/comm/mpi.h).
// Link and device emulation (latency, bandwidth, slowdown) changes when things happen, never what
// is computed.
// The only things crossing a stage boundary are activations (forward) and their gradients
// (backward), keyed by micro-batch id.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "pipeline/schedule.h"
#include "pipeline/stage_worker.h"

namespace pipenag {

enum class EngineKind { Sequential, Threads, Mpi };
std::string_view engine_name(EngineKind k);
// "sequential" | "threads" | "mpi"; Error otherwise.
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
  // Emulated links, per stage boundary (P - 1 values; empty: none): a message is delivered
  // latency + bytes / bandwidth after it is sent, one message at a time per link and direction
  // (as simulate() with Links models it). Bandwidth in bytes/s, 0: unlimited. The sequential
  // engine applies them to its modelled timeline, the others in real time.
  std::vector<double> link_latency_s, link_bandwidth_bytes_s;
  // Per stage (empty: none): each action takes this many times its measured time.
  std::vector<double> slowdown;
  // mpi: a peer that sends nothing for this long is lost (Error naming it).
  double peer_timeout_s = 60;
};

// After each update of the last stage: what progress and metrics need. Delivered in the process
// that reports (the last stage's own for in-process engines, rank 0 for mpi).
struct UpdateReport {
  int64_t step = 0;  // the last stage's weight version after the update
  double loss = 0, lr = 0, grad_norm = 0;
  double utilization = 0;  // the RunMonitor's (mpi: the last stage's own)
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
  std::function<void(const UpdateReport&)> on_report;
  // Polled by stage 0 before each forward that would begin an update: true ends the run early at
  // a drain point (all in-flight micro-batches finish, no new ones start).
  std::function<bool()> stop_requested;
  // Flow only: polled by stage 0 after each of its steps; true ends the current window early, at
  // the first cut no stage has passed yet (no drain: micro-batches in flight stay in flight).
  std::function<bool()> pause_requested;
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

// A schedule run in windows. Each window ends at a consistent cut: every stage stops right after
// the Step that made weight version N, with its micro-batches still in flight and the messages in
// transit left in their mailboxes. Between windows the caller evaluates (each stage's current
// weights are version N) or checkpoints (weights, stashes, in-flight slots, messages), and the
// next window goes on as if nothing had happened: no drain, the same delays, the same bits.
class Flow {
 public:
  // `base_version`: the weight version every stage had when the schedule began (its drained start).
  // mpi: `workers` has P entries, null for the stages other ranks run.
  Flow(Schedule s, std::vector<StageWorker*> workers, const EngineOptions& opt, EngineHooks hooks,
       int64_t base_version);
  ~Flow();
  Flow(const Flow&) = delete;
  Flow& operator=(const Flow&) = delete;

  // Runs until every stage has made weight version `version` (or reached the end of its actions);
  // hooks.pause_requested can end the window earlier. Returns the version all stages have made.
  int64_t run_until(int64_t version);
  // So far; `updates` counts from the base version. mpi: collective (every rank calls it at the
  // same point), busy and wait of every stage.
  RunStats stats() const;
  // mpi: a rank that did not decide the pause itself learned of it from stage 0 in this window.
  bool pause_received() const;

  struct Message {
    bool forward = true;  // activation (stage boundary -> boundary + 1) or gradient (back)
    int boundary = 0;     // between stage `boundary` and `boundary + 1`
    int64_t mb = 0;
    std::vector<float> data;
  };
  // The messages in transit at the current cut (mpi: those this process's stages receive).
  std::vector<Message> messages() const;
  // Continues a flow that was checkpointed at the cut after weight version `version`: every stage
  // starts right after its Step that made it, with `msgs` in transit. The workers must already
  // hold that version, their stashes and in-flight micro-batches.
  void resume_at(int64_t version, const std::vector<Message>& msgs);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The schedule without the micro-batches from `cut` on (cut a multiple of microbatches): what
// a run ended early at `cut` executed. For async-1f1b, truncate(async(P, N), n) == async(P, n).
Schedule truncate_schedule(const Schedule& s, int64_t cut);

// Chrome trace-event JSON (viewable in Perfetto or chrome://tracing): one track per stage.
std::string trace_json(const std::vector<TraceEvent>& events, int stages);

}  // namespace pipenag
