// Pipeline schedules as data: for each stage, the ordered list of actions it performs
// (Forward(mb), Backward(mb), Step). Generators build the three schedules of the paper; engines
// only execute lists, never decide what to compute, so every engine computes the same thing.
//
// Micro-batch ids count from 0 within one schedule (the trainer adds the data position). A Step
// carries the id of the last micro-batch its update includes. All generators run backwards in
// ascending micro-batch order, so gradient accumulation order is the same for every schedule.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace pipenag {

enum class Op : uint8_t { Forward, Backward, Step };

struct Action {
  Op op;
  int64_t mb;
  bool operator==(const Action&) const = default;
};

enum class ScheduleKind { GPipe, OneFOneB, Async1F1B };

struct Schedule {
  ScheduleKind kind = ScheduleKind::GPipe;
  int stages = 1;
  int microbatches = 1;   // micro-batches per update (1 for async-1f1b)
  int64_t updates = 0;    // optimizer updates every stage performs
  int extra_inflight = 0; // async-1f1b: E extra warm-up forwards on every stage (tau_k + E)
  std::vector<std::vector<Action>> actions;  // [stage]

  int64_t num_microbatches() const { return updates * microbatches; }
  bool asynchronous() const { return kind == ScheduleKind::Async1F1B; }
};

// gpipe: per update, M forwards then M backwards, then Step (flush).
Schedule make_gpipe(int P, int M, int64_t updates);
// 1f1b (PipeDream-Flush): per update, stage k runs min(M, P-1-k) warm-up forwards, alternates
// backward/forward, drains its remaining backwards, then Step (flush). Same maths as gpipe.
Schedule make_1f1b(int P, int M, int64_t updates);
// async-1f1b (PipeDream): stage k runs P-1-k warm-up forwards, then Forward, Backward, Step per
// micro-batch, and drains at the end. One micro-batch per update, no flush until the end.
// `extra` (pipeline.extra_inflight) E more micro-batches in flight across every stage boundary:
// stage k warms up with (P-1-k)(1+E) forwards, so 1+E activations separate it from stage k+1 and
// a message may take 1+E steps to cross; the delay grows to tau_k = (P-1-k)(1+E). (E more on
// every stage alike would not help: each boundary would still carry one, see ARCHITECTURE.md.)
Schedule make_async_1f1b(int P, int64_t updates, int extra = 0);
// `extra` applies to async-1f1b only (Error for the synchronous schedules when > 0).
Schedule make_schedule(ScheduleKind kind, int P, int M, int64_t updates, int extra = 0);

// "gpipe", "1f1b", "async-1f1b"; parse_schedule_kind throws Error on anything else.
std::string_view schedule_name(ScheduleKind kind);
ScheduleKind parse_schedule_kind(std::string_view name);

// The gradient delay of stage k: tau_k = (P-1-k)(1+E) for async-1f1b, 0 for the synchronous ones.
int stage_delay(ScheduleKind kind, int P, int k, int extra = 0);

// Throws Error naming the first violation: an action list per stage; ids in range; every
// micro-batch forwarded and backwarded exactly once on every stage (so every message sent has
// a matching receive); each forward before its backward; each Step after exactly the
// backwards of its update; and no deadlock (the dependency graph has no cycle).
void validate_schedule(const Schedule& s);

// Largest number of micro-batches in flight (forwarded, not yet backwarded) on each stage:
// the saved-activation slots the stage needs.
std::vector<int> max_in_flight(const Schedule& s);

// The weight version (updates done on the stage) each forward and each backward runs at,
// indexed [stage][mb], as the schedule implies.
struct Versions {
  std::vector<std::vector<int64_t>> forward, backward;
};
Versions schedule_versions(const Schedule& s);

// A timeline of the schedule with fixed action costs, as if every stage had its own device and
// messages were free: each action starts when its stage is free and its input has arrived.
struct TimedAction {
  int stage;
  Action action;
  double start, end;
};
struct Timeline {
  std::vector<TimedAction> actions;  // in execution order per stage, stages interleaved
  double makespan = 0;
  std::vector<double> busy;          // per stage
  double utilization() const;        // sum(busy) / (stages * makespan)
};
Timeline simulate(const Schedule& s, double forward_cost, double backward_cost, double step_cost);
// As above with a cost per stage (vectors of length stages).
Timeline simulate(const Schedule& s, const std::vector<double>& forward_cost,
                  const std::vector<double>& backward_cost, const std::vector<double>& step_cost);

// Links between stages, for predictions: boundary k joins stage k and k + 1. A message of
// `message_bytes` sent at time t on boundary k arrives at max(t, link free) + bytes / bandwidth +
// latency, the link carrying one message at a time in each direction (bandwidth <= 0: infinite).
struct Links {
  std::vector<double> latency_s;          // per boundary (P - 1 values), or one value for all
  std::vector<double> bandwidth_bytes_s;  // per boundary, or one value for all
  double message_bytes = 0;               // one activation (or its gradient)
};
Timeline simulate(const Schedule& s, const std::vector<double>& forward_cost,
                  const std::vector<double>& backward_cost, const std::vector<double>& step_cost,
                  const Links& links);

// Text rendering: the action lists, the delays and an ASCII timeline (F=1, B=2 time units).
std::string describe_schedule(const Schedule& s);

}  // namespace pipenag
