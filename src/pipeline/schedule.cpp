#include "pipeline/schedule.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "util/error.h"

namespace pipenag {
namespace {

void check_shape(int P, int M, int64_t updates) {
  if (P < 1) throw Error("pipeline.stages must be >= 1, got " + std::to_string(P));
  if (M < 1) throw Error("pipeline.microbatches must be >= 1, got " + std::to_string(M));
  if (updates < 0) throw Error("schedule: negative number of updates");
}

Schedule empty(ScheduleKind kind, int P, int M, int64_t updates) {
  Schedule s;
  s.kind = kind;
  s.stages = P;
  s.microbatches = M;
  s.updates = updates;
  s.actions.resize(static_cast<size_t>(P));
  return s;
}

std::string name_of(const Action& a) {
  const char* op = a.op == Op::Forward ? "Forward" : a.op == Op::Backward ? "Backward" : "Step";
  return std::string(op) + "(" + std::to_string(a.mb) + ")";
}

}  // namespace

Schedule make_gpipe(int P, int M, int64_t updates) {
  check_shape(P, M, updates);
  Schedule s = empty(ScheduleKind::GPipe, P, M, updates);
  for (auto& list : s.actions) {
    for (int64_t u = 0; u < updates; ++u) {
      const int64_t base = u * M;
      for (int i = 0; i < M; ++i) list.push_back({Op::Forward, base + i});
      for (int i = 0; i < M; ++i) list.push_back({Op::Backward, base + i});
      list.push_back({Op::Step, base + M - 1});
    }
  }
  return s;
}

Schedule make_1f1b(int P, int M, int64_t updates) {
  check_shape(P, M, updates);
  Schedule s = empty(ScheduleKind::OneFOneB, P, M, updates);
  for (int k = 0; k < P; ++k) {
    auto& list = s.actions[static_cast<size_t>(k)];
    const int warm = std::min(M, P - 1 - k);
    for (int64_t u = 0; u < updates; ++u) {
      const int64_t base = u * M;
      for (int i = 0; i < warm; ++i) list.push_back({Op::Forward, base + i});
      for (int i = 0; i < M - warm; ++i) {
        list.push_back({Op::Forward, base + warm + i});
        list.push_back({Op::Backward, base + i});
      }
      for (int i = M - warm; i < M; ++i) list.push_back({Op::Backward, base + i});
      list.push_back({Op::Step, base + M - 1});
    }
  }
  return s;
}

Schedule make_async_1f1b(int P, int64_t updates, int extra) {
  check_shape(P, 1, updates);
  if (extra < 0) throw Error("schedule: extra in-flight micro-batches must be >= 0, got " + std::to_string(extra));
  Schedule s = empty(ScheduleKind::Async1F1B, P, 1, updates);
  s.extra_inflight = extra;
  for (int k = 0; k < P; ++k) {
    auto& list = s.actions[static_cast<size_t>(k)];
    const int64_t warm = std::min<int64_t>(updates, static_cast<int64_t>(P - 1 - k) * (1 + extra));
    for (int64_t j = 0; j < warm; ++j) list.push_back({Op::Forward, j});
    for (int64_t j = 0; j < updates; ++j) {
      if (j + warm < updates) list.push_back({Op::Forward, j + warm});
      list.push_back({Op::Backward, j});
      list.push_back({Op::Step, j});
    }
  }
  return s;
}

Schedule make_schedule(ScheduleKind kind, int P, int M, int64_t updates, int extra) {
  if (extra != 0 && kind != ScheduleKind::Async1F1B)
    throw Error("extra in-flight micro-batches apply to async-1f1b only (" + std::string(schedule_name(kind)) +
                " flushes every update)");
  switch (kind) {
    case ScheduleKind::GPipe: return make_gpipe(P, M, updates);
    case ScheduleKind::OneFOneB: return make_1f1b(P, M, updates);
    case ScheduleKind::Async1F1B: return make_async_1f1b(P, updates, extra);
  }
  throw Error("unknown schedule kind");
}

std::string_view schedule_name(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::GPipe: return "gpipe";
    case ScheduleKind::OneFOneB: return "1f1b";
    case ScheduleKind::Async1F1B: return "async-1f1b";
  }
  return "?";
}

ScheduleKind parse_schedule_kind(std::string_view name) {
  for (auto k : {ScheduleKind::GPipe, ScheduleKind::OneFOneB, ScheduleKind::Async1F1B})
    if (schedule_name(k) == name) return k;
  throw Error("unknown schedule '" + std::string(name) +
              "' (expected \"gpipe\", \"1f1b\" or \"async-1f1b\")");
}

int stage_delay(ScheduleKind kind, int P, int k, int extra) {
  return kind == ScheduleKind::Async1F1B ? (P - 1 - k) * (1 + extra) : 0;
}

void validate_schedule(const Schedule& s) {
  const int P = s.stages;
  if (P < 1 || static_cast<int>(s.actions.size()) != P)
    throw Error("schedule: expected one action list per stage (" + std::to_string(P) + ")");
  if (s.microbatches < 1) throw Error("schedule: micro-batches per update must be >= 1");
  const int64_t n = s.num_microbatches();
  for (int k = 0; k < P; ++k) {
    const std::string where = "schedule: stage " + std::to_string(k) + ": ";
    std::vector<char> fwd(static_cast<size_t>(n), 0), bwd(static_cast<size_t>(n), 0);
    int64_t backwards = 0, steps = 0;
    for (const Action& a : s.actions[static_cast<size_t>(k)]) {
      if (a.mb < 0 || a.mb >= n)
        throw Error(where + name_of(a) + " is outside micro-batches 0.." + std::to_string(n - 1));
      const auto i = static_cast<size_t>(a.mb);
      switch (a.op) {
        case Op::Forward:
          if (fwd[i]) throw Error(where + name_of(a) + " appears twice");
          if (!s.asynchronous() && steps != a.mb / s.microbatches)
            throw Error(where + name_of(a) + " runs after " + std::to_string(steps) +
                        " updates in a synchronous schedule (expected " +
                        std::to_string(a.mb / s.microbatches) + ")");
          fwd[i] = 1;
          break;
        case Op::Backward:
          if (bwd[i]) throw Error(where + name_of(a) + " appears twice");
          if (!fwd[i]) throw Error(where + name_of(a) + " comes before its forward");
          if (a.mb != backwards)
            throw Error(where + name_of(a) + " is out of order (expected Backward(" +
                        std::to_string(backwards) + "))");
          bwd[i] = 1;
          ++backwards;
          break;
        case Op::Step:
          if (backwards != a.mb + 1 || (a.mb + 1) % s.microbatches != 0)
            throw Error(where + name_of(a) + " does not follow exactly the backwards of its update");
          ++steps;
          break;
      }
    }
    for (int64_t mb = 0; mb < n; ++mb) {
      if (!fwd[static_cast<size_t>(mb)])
        throw Error(where + "micro-batch " + std::to_string(mb) + " is never forwarded");
      if (!bwd[static_cast<size_t>(mb)])
        throw Error(where + "micro-batch " + std::to_string(mb) + " is never backwarded");
    }
    if (steps != s.updates)
      throw Error(where + std::to_string(steps) + " updates, expected " + std::to_string(s.updates));
  }
  // Deadlock: simulate() throws when no stage can make progress.
  simulate(s, 1.0, 2.0, 0.0);
}

std::vector<int> max_in_flight(const Schedule& s) {
  std::vector<int> out;
  for (const auto& list : s.actions) {
    int cur = 0, best = 0;
    for (const Action& a : list) {
      if (a.op == Op::Forward) best = std::max(best, ++cur);
      if (a.op == Op::Backward) --cur;
    }
    out.push_back(best);
  }
  return out;
}

Versions schedule_versions(const Schedule& s) {
  Versions v;
  const auto n = static_cast<size_t>(s.num_microbatches());
  for (const auto& list : s.actions) {
    std::vector<int64_t> f(n, -1), b(n, -1);
    int64_t version = 0;
    for (const Action& a : list) {
      if (a.op == Op::Forward) f[static_cast<size_t>(a.mb)] = version;
      if (a.op == Op::Backward) b[static_cast<size_t>(a.mb)] = version;
      if (a.op == Op::Step) ++version;
    }
    v.forward.push_back(std::move(f));
    v.backward.push_back(std::move(b));
  }
  return v;
}

double Timeline::utilization() const {
  if (busy.empty() || makespan <= 0) return 0.0;
  double sum = 0;
  for (double b : busy) sum += b;
  return sum / (static_cast<double>(busy.size()) * makespan);
}

Timeline simulate(const Schedule& s, double forward_cost, double backward_cost, double step_cost) {
  const auto P = static_cast<size_t>(s.stages);
  return simulate(s, std::vector<double>(P, forward_cost), std::vector<double>(P, backward_cost),
                  std::vector<double>(P, step_cost));
}

Timeline simulate(const Schedule& s, const std::vector<double>& forward_cost,
                  const std::vector<double>& backward_cost, const std::vector<double>& step_cost) {
  return simulate(s, forward_cost, backward_cost, step_cost, Links{});
}

Timeline simulate(const Schedule& s, const std::vector<double>& forward_cost,
                  const std::vector<double>& backward_cost, const std::vector<double>& step_cost,
                  const Links& links) {
  const int P = s.stages;
  const auto per_boundary = [&](const std::vector<double>& v, const char* what) {
    if (v.empty()) return std::vector<double>(static_cast<size_t>(std::max(P - 1, 0)), 0.0);
    if (v.size() == 1) return std::vector<double>(static_cast<size_t>(std::max(P - 1, 0)), v[0]);
    if (static_cast<int>(v.size()) != P - 1)
      throw Error(std::string("simulate: ") + what + " has " + std::to_string(v.size()) + " values for " +
                  std::to_string(P - 1) + " stage boundaries");
    return v;
  };
  const std::vector<double> latency = per_boundary(links.latency_s, "link latency");
  const std::vector<double> bandwidth = per_boundary(links.bandwidth_bytes_s, "link bandwidth");
  std::vector<double> fwd_free(latency.size(), 0.0), bwd_free(latency.size(), 0.0);
  // When a message sent at `sent` on boundary b arrives (the link serialises its messages in the
  // order the sender sends them, which is the order the sender's actions run here).
  const auto deliver = [&](std::vector<double>& link_free, size_t b, double sent) {
    const double transfer = bandwidth[b] > 0 ? links.message_bytes / bandwidth[b] : 0.0;
    const double done = std::max(sent, link_free[b]) + transfer;
    link_free[b] = done;
    return done + latency[b];
  };
  const auto n = static_cast<size_t>(s.num_microbatches());
  // Completion time of each stage's forward / backward of each micro-batch (-1: not yet).
  std::vector<std::vector<double>> f_end(static_cast<size_t>(P), std::vector<double>(n, -1.0));
  std::vector<std::vector<double>> b_end = f_end;
  std::vector<size_t> next(static_cast<size_t>(P), 0);
  std::vector<double> clock(static_cast<size_t>(P), 0.0);
  Timeline t;
  t.busy.assign(static_cast<size_t>(P), 0.0);
  size_t remaining = 0;
  for (const auto& l : s.actions) remaining += l.size();
  while (remaining > 0) {
    bool progressed = false;
    for (int k = 0; k < P; ++k) {
      const auto ks = static_cast<size_t>(k);
      const auto& list = s.actions[ks];
      while (next[ks] < list.size()) {
        const Action a = list[next[ks]];
        const auto i = static_cast<size_t>(a.mb);
        double ready = clock[ks], cost = step_cost[ks];
        if (a.op == Op::Forward) {
          if (k > 0) {
            if (f_end[ks - 1][i] < 0) break;
            ready = std::max(ready, f_end[ks - 1][i]);
          }
          cost = forward_cost[ks];
        } else if (a.op == Op::Backward) {
          if (k + 1 < P) {
            if (b_end[ks + 1][i] < 0) break;
            ready = std::max(ready, b_end[ks + 1][i]);
          }
          cost = backward_cost[ks];
        }
        const double end = ready + cost;
        // What the next stage waits for: the message's arrival, not the sender's end.
        if (a.op == Op::Forward) f_end[ks][i] = k + 1 < P ? deliver(fwd_free, ks, end) : end;
        if (a.op == Op::Backward) b_end[ks][i] = k > 0 ? deliver(bwd_free, ks - 1, end) : end;
        t.actions.push_back({k, a, ready, end});
        t.busy[ks] += cost;
        clock[ks] = end;
        t.makespan = std::max(t.makespan, end);
        ++next[ks];
        --remaining;
        progressed = true;
      }
    }
    if (!progressed) {
      std::string waits;
      for (int k = 0; k < P; ++k) {
        const auto& list = s.actions[static_cast<size_t>(k)];
        if (next[static_cast<size_t>(k)] < list.size())
          waits += (waits.empty() ? "" : ", ") + std::string("stage ") + std::to_string(k) +
                   " at " + name_of(list[next[static_cast<size_t>(k)]]);
      }
      throw Error("schedule deadlocks: no stage can proceed (" + waits + ")");
    }
  }
  return t;
}

std::string describe_schedule(const Schedule& s) {
  std::string out;
  char buf[256];
  std::snprintf(buf, sizeof buf, "schedule %s: %d stages, %d micro-batch%s per update, %lld update%s\n",
                std::string(schedule_name(s.kind)).c_str(), s.stages, s.microbatches,
                s.microbatches == 1 ? "" : "es", static_cast<long long>(s.updates),
                s.updates == 1 ? "" : "s");
  out += buf;
  const auto slots = max_in_flight(s);
  const Versions v = schedule_versions(s);
  out += "\nper stage: delay tau_k (updates between the weights a gradient was computed at and the "
         "update it enters), micro-batches in flight, actions\n";
  for (int k = 0; k < s.stages; ++k) {
    const auto ks = static_cast<size_t>(k);
    // The largest delay any update of this stage sees, from the versions the schedule implies.
    int64_t delay = 0;
    for (size_t mb = 0; mb < v.forward[ks].size(); ++mb)
      delay = std::max(delay, v.backward[ks][mb] - v.forward[ks][mb]);
    std::snprintf(buf, sizeof buf, "  stage %d: tau=%lld in_flight=%d  ", k,
                  static_cast<long long>(s.asynchronous() ? delay : 0), slots[ks]);
    out += buf;
    for (const Action& a : s.actions[ks]) {
      if (a.op == Op::Step) out += "S ";
      else out += (a.op == Op::Forward ? "F" : "B") + std::to_string(a.mb) + " ";
    }
    out += "\n";
  }
  const Timeline t = simulate(s, 1.0, 2.0, 0.0);
  std::snprintf(buf, sizeof buf,
                "\ntimeline (one column = one time unit; forward = 1, backward = 2; '.' idle)\n");
  out += buf;
  const auto width = static_cast<size_t>(std::ceil(t.makespan));
  std::vector<std::string> rows(static_cast<size_t>(s.stages), std::string(width, '.'));
  for (const auto& ta : t.actions) {
    auto& row = rows[static_cast<size_t>(ta.stage)];
    const auto b = static_cast<size_t>(ta.start);
    if (ta.action.op == Op::Step) continue;
    // The last digit of the micro-batch id, lower case for the backward.
    const char d = static_cast<char>('0' + ta.action.mb % 10);
    const char c = ta.action.op == Op::Forward ? d : static_cast<char>('a' + ta.action.mb % 10);
    for (size_t x = b; x < static_cast<size_t>(ta.end) && x < width; ++x) row[x] = c;
  }
  for (int k = 0; k < s.stages; ++k) {
    std::snprintf(buf, sizeof buf, "  stage %d |", k);
    out += buf + rows[static_cast<size_t>(k)] + "|\n";
  }
  out += "  (digits: forward of micro-batch id mod 10; letters a-j: its backward)\n";
  std::snprintf(buf, sizeof buf, "\nutilisation %.1f%%, bubble %.1f%% (makespan %.0f units)\n",
                100.0 * t.utilization(), 100.0 * (1.0 - t.utilization()), t.makespan);
  out += buf;
  return out;
}

}  // namespace pipenag
