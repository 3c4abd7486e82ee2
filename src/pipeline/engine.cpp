#include "pipeline/engine.h"

#include <omp.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <nlohmann/json.hpp>
#include <thread>

#include "comm/mpi.h"
#include "util/error.h"

namespace pipenag {

std::string_view engine_name(EngineKind k) {
  return k == EngineKind::Threads ? "threads" : k == EngineKind::Mpi ? "mpi" : "sequential";
}

EngineKind parse_engine_kind(std::string_view name) {
  if (name == "sequential") return EngineKind::Sequential;
  if (name == "threads") return EngineKind::Threads;
  if (name == "mpi") return EngineKind::Mpi;
  throw Error("unknown pipeline.engine '" + std::string(name) +
              "' (expected \"sequential\", \"threads\" or \"mpi\")");
}

namespace {

using Clock = std::chrono::steady_clock;

struct Aborted {};  // another stage failed; unwinds this one quietly

// State every stage of one run shares: where the run was cut, and whether it failed.
struct Shared {
  std::atomic<int64_t> cut;
  std::atomic<bool> aborted{false};
};

// Messages across one stage boundary in one direction, keyed by micro-batch id. Buffers are
// pooled: after the first few micro-batches nothing is allocated.
class Mailbox {
 public:
  enum class Got { Message, NotYet, Cut };

  // One link in one direction: latency (s) and bandwidth (bytes/s, 0: unlimited) delay delivery;
  // `real_time`: in real time (threads, mpi), else only on the modelled timeline.
  Mailbox(size_t floats, const Shared& sh, double latency, double bandwidth, bool real_time)
      : floats_(floats), sh_(sh), latency_(latency), bandwidth_(bandwidth), real_time_(real_time) {}

  // `ready`: when the message was sent on the sequential engine's modelled timeline.
  void put(int64_t mb, const float* data, double ready) {
    const double transfer = bandwidth_ > 0 ? static_cast<double>(floats_ * sizeof(float)) / bandwidth_ : 0.0;
    Clock::time_point deliver = Clock::time_point::min();
    if (latency_ > 0 || transfer > 0) {
      std::lock_guard<std::mutex> l(mu_);
      // Serialised per link: a message starts when the one before it has left.
      model_free_ = std::max(model_free_, ready) + transfer;
      ready = model_free_ + latency_;
      if (real_time_) {
        const auto dur = [](double sec) {
          return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(sec));
        };
        real_free_ = std::max(real_free_, Clock::now()) + dur(transfer);
        deliver = real_free_ + dur(latency_);
      }
    }
    std::vector<float> buf;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!pool_.empty()) {
        buf = std::move(pool_.back());
        pool_.pop_back();
      }
    }
    buf.resize(floats_);
    std::memcpy(buf.data(), data, floats_ * sizeof(float));
    {
      std::lock_guard<std::mutex> l(mu_);
      msgs_.push_back({mb, ready, deliver, std::move(buf)});
    }
    cv_.notify_all();
  }

  // Takes micro-batch mb's message into `out`. With `wait`, blocks until it arrives (or the run
  // is cut before mb, or aborted); without, returns NotYet when it is not there.
  Got take(int64_t mb, std::vector<float>& out, double* ready, bool wait) {
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      if (sh_.aborted.load()) throw Aborted{};
      bool early = false;
      for (auto it = msgs_.begin(); it != msgs_.end(); ++it) {
        if (it->mb != mb) continue;
        if (it->deliver > Clock::now()) {  // still on the emulated link
          if (!wait) return Got::NotYet;
          // A copy: the wait releases the lock, and a put may move the messages meanwhile.
          const Clock::time_point until = it->deliver;
          cv_.wait_until(l, until);
          early = true;
          break;
        }
        out = std::move(it->data);
        *ready = it->ready;
        msgs_.erase(it);
        return Got::Message;
      }
      if (early) continue;
      if (mb >= sh_.cut.load()) return Got::Cut;
      if (!wait) return Got::NotYet;
      cv_.wait(l);
    }
  }

  // The messages not yet taken (mb, data), in arrival order.
  std::vector<std::pair<int64_t, std::vector<float>>> pending() const {
    std::lock_guard<std::mutex> l(mu_);
    std::vector<std::pair<int64_t, std::vector<float>>> out;
    for (const auto& m : msgs_) out.emplace_back(m.mb, m.data);
    return out;
  }

  void give_back(std::vector<float>&& buf) {
    std::lock_guard<std::mutex> l(mu_);
    pool_.push_back(std::move(buf));
  }

  void wake() {
    { std::lock_guard<std::mutex> l(mu_); }
    cv_.notify_all();
  }

 private:
  size_t floats_;
  const Shared& sh_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  struct Message {
    int64_t mb;
    double ready;
    Clock::time_point deliver;  // real time the emulated link delivers it
    std::vector<float> data;
  };
  std::vector<Message> msgs_;
  std::vector<std::vector<float>> pool_;
  double latency_ = 0, bandwidth_ = 0;
  bool real_time_ = false;
  double model_free_ = 0;                               // modelled time the link is free
  Clock::time_point real_free_ = Clock::time_point::min();  // real time it is free
};

// The all-reduce of the gradient's sum of squares for global clipping: each stage deposits its
// sum for update u; the total is the sum in stage order once all have.
class NormExchange {
 public:
  NormExchange(int stages, const Shared& sh) : P_(stages), sh_(sh) {}

  void deposit(int k, int64_t u, double sumsq) {
    {
      std::lock_guard<std::mutex> l(mu_);
      Entry& e = entries_[u];
      if (e.sums.empty()) e.sums.assign(static_cast<size_t>(P_), 0.0);
      e.sums[static_cast<size_t>(k)] = sumsq;
      ++e.count;
    }
    cv_.notify_all();
  }

  // The total for update u once every stage deposited (false without `wait` if not yet).
  bool total(int64_t u, bool wait, double* out) {
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      if (sh_.aborted.load()) throw Aborted{};
      auto it = entries_.find(u);
      if (it != entries_.end() && it->second.count == P_) {
        double t = 0;
        for (double x : it->second.sums) t += x;
        *out = t;
        if (++it->second.readers == P_) entries_.erase(it);
        return true;
      }
      if (!wait) return false;
      cv_.wait(l);
    }
  }

  void wake() {
    { std::lock_guard<std::mutex> l(mu_); }
    cv_.notify_all();
  }

 private:
  struct Entry {
    std::vector<double> sums;
    int count = 0, readers = 0;
  };
  int P_;
  const Shared& sh_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int64_t, Entry> entries_;
};

// Per-stage counters, readable from any thread while the run goes on.
struct StageCounters {
  std::atomic<int64_t> f_ns{0}, b_ns{0}, s_ns{0}, wait_ns{0};
  std::atomic<int64_t> f_n{0}, b_n{0}, s_n{0};
};

class Run final : public RunMonitor {
 public:
  Run(const Schedule& s, const std::vector<StageWorker*>& workers, const EngineOptions& opt,
      const EngineHooks& hooks)
      : s_(s), w_(workers), opt_(opt), hooks_(hooks), counters_(workers.size()),
        next_(workers.size(), 0), done_(workers.size(), 0), deposited_(workers.size(), -1),
        sim_clock_(workers.size(), 0.0),
        events_(workers.size()),
        norms_(s.stages, sh_) {
    if (opt.global_clip && s.asynchronous())
      throw Error("global gradient clipping needs a synchronous schedule");
    if (static_cast<int>(workers.size()) != s.stages)
      throw Error("engine: " + std::to_string(workers.size()) + " stage workers for a " +
                  std::to_string(s.stages) + "-stage schedule");
    size_t nb = 0;
    for (int k = 0; k < s.stages; ++k) {
      if (!local(k)) {
        if (opt.kind != EngineKind::Mpi) throw Error("engine: no worker for stage " + std::to_string(k));
        continue;
      }
      local_.push_back(k);
      nb = workers[static_cast<size_t>(k)]->boundary_floats();
    }
    if (local_.empty()) throw Error("engine: no stage to run");
    const auto per = [&](const std::vector<double>& v, size_t i, double none) {
      return v.empty() ? none : v.size() == 1 ? v[0] : v.at(i);
    };
    for (int k = 0; k + 1 < s.stages; ++k) {
      const double lat = per(opt.link_latency_s, static_cast<size_t>(k), 0.0);
      const double bw = per(opt.link_bandwidth_bytes_s, static_cast<size_t>(k), 0.0);
      const bool real = opt.kind != EngineKind::Sequential;
      fwd_.push_back(std::make_unique<Mailbox>(nb, sh_, lat, bw, real));
      bwd_.push_back(std::make_unique<Mailbox>(nb, sh_, lat, bw, real));
    }
    for (int k = 0; k < s.stages; ++k) slowdown_.push_back(per(opt.slowdown, static_cast<size_t>(k), 1.0));
    sh_.cut.store(s.num_microbatches());
    if (opt.kind == EngineKind::Mpi) {
      if (local_.size() != 1 || local_[0] != mpi::rank())
        throw Error("engine: the mpi engine runs stage " + std::to_string(mpi::rank()) + " on rank " +
                    std::to_string(mpi::rank()));
      links_ = std::make_unique<mpi::Links>(nb, 5);
    }
    start_ = Clock::now();
  }

  bool local(int k) const { return w_[static_cast<size_t>(k)] != nullptr; }
  bool pause_received() const { return pause_received_; }

  // Seconds the stages have been running (a flow's pauses between windows not counted).
  double elapsed() const override {
    const Clock::time_point now = paused_since_ ? *paused_since_ : Clock::now();
    return std::chrono::duration<double>(now - start_).count() - paused_;
  }

  // ---- windows (Flow): every stage runs until it has made weight version `stop` ----
  void window(int64_t stop) {
    if (paused_since_) {
      paused_ += std::chrono::duration<double>(Clock::now() - *paused_since_).count();
      paused_since_.reset();
    }
    stop_version_.store(stop);
    stop_decided_ = false;
    std::fill(done_.begin(), done_.end(), 0);
    pause_received_ = false;
    if (opt_.kind == EngineKind::Threads) run_threads();
    else if (opt_.kind == EngineKind::Mpi) run_mpi();
    else run_sequential();
    paused_since_ = Clock::now();
  }
  int64_t min_version() const {
    int64_t v = INT64_MAX;
    for (int k : local_) v = std::min(v, w_[static_cast<size_t>(k)]->version());
    return v;
  }
  // Starts every stage right after the Step that made weight version base + `updates`.
  void start_after(int64_t updates) {
    for (size_t k = 0; k < w_.size(); ++k) {
      if (!local(static_cast<int>(k))) continue;
      size_t i = 0;
      for (int64_t n = 0; n < updates; ++i) {
        if (i >= s_.actions[k].size())
          throw Error("flow: the schedule has fewer than " + std::to_string(updates) + " updates on stage " +
                      std::to_string(k));
        if (s_.actions[k][i].op == Op::Step) ++n;
      }
      next_[k] = i;
    }
  }
  Mailbox& forward_box(int k) { return *fwd_.at(static_cast<size_t>(k)); }
  Mailbox& backward_box(int k) { return *bwd_.at(static_cast<size_t>(k)); }
  int64_t stop_version() const { return stop_version_.load(); }

  double utilization() const override {
    const size_t P = w_.size();
    if (opt_.kind == EngineKind::Mpi) {  // this rank's own stage
      const auto& c = counters_[static_cast<size_t>(local_[0])];
      const double el = elapsed();
      return el > 0 ? 1e-9 * static_cast<double>(c.f_ns + c.b_ns + c.s_ns) / el : 0.0;
    }
    if (opt_.kind == EngineKind::Threads) {
      const double el = elapsed();
      double busy = 0;
      for (const auto& c : counters_) busy += 1e-9 * static_cast<double>(c.f_ns + c.b_ns + c.s_ns);
      return el > 0 ? busy / (static_cast<double>(P) * el) : 0.0;
    }
    // Sequential: the timeline the actions run so far would have had with every stage on its own
    // core, each action taking its measured time (sim_clock_, advanced as they run).
    double busy = 0, makespan = 0;
    for (size_t k = 0; k < P; ++k) {
      const auto& c = counters_[k];
      busy += 1e-9 * static_cast<double>(c.f_ns + c.b_ns + c.s_ns);
      makespan = std::max(makespan, sim_clock_[k]);
    }
    return makespan > 0 ? busy / (static_cast<double>(P) * makespan) : 0.0;
  }

  RunStats go() {
    if (opt_.kind == EngineKind::Threads) run_threads();
    else if (opt_.kind == EngineKind::Mpi) throw Error("run_schedule: the mpi engine runs as a Flow");
    else run_sequential();
    RunStats r = stats();
    const int64_t cut = sh_.cut.load();
    r.microbatches = cut;
    r.updates = cut / s_.microbatches;
    return r;
  }

  // Time and utilisation so far (updates and micro-batches are the caller's to fill).
  RunStats stats() const {
    RunStats r;
    r.wall = elapsed();
    for (const auto& c : counters_) {
      r.busy.push_back(1e-9 * static_cast<double>(c.f_ns + c.b_ns + c.s_ns));
      r.wait.push_back(1e-9 * static_cast<double>(c.wait_ns));
    }
    r.utilization = utilization();
    if (opt_.kind == EngineKind::Mpi) {
      // Every stage's busy and wait time, from every rank (collective).
      const size_t me = static_cast<size_t>(local_[0]);
      const std::vector<double> all =
          mpi::allgather(std::vector<double>{r.busy[me], r.wait[me]}, opt_.peer_timeout_s, "gathering stage times");
      double busy = 0;
      for (size_t k = 0; k < r.busy.size(); ++k) {
        r.busy[k] = all.at(2 * k);
        r.wait[k] = all.at(2 * k + 1);
        busy += r.busy[k];
      }
      r.utilization = r.wall > 0 ? busy / (static_cast<double>(r.busy.size()) * r.wall) : 0.0;
    }
    if (opt_.trace)
      for (auto& e : events_) r.events.insert(r.events.end(), e.begin(), e.end());
    return r;
  }

 private:
  double since_epoch(Clock::time_point t) const {
    return std::chrono::duration<double>(t - opt_.epoch).count();
  }

  void record(int k, char kind, int64_t mb, int64_t version, Clock::time_point a,
              Clock::time_point b) {
    const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count();
    auto& c = counters_[static_cast<size_t>(k)];
    switch (kind) {
      case 'F': c.f_ns += ns; ++c.f_n; break;
      case 'B': c.b_ns += ns; ++c.b_n; break;
      case 'S': c.s_ns += ns; ++c.s_n; break;
      default: c.wait_ns += ns;
    }
    if (opt_.trace)
      events_[static_cast<size_t>(k)].push_back({k, kind, mb, version, since_epoch(a), since_epoch(b)});
  }

  // Advances stage k's modelled clock over an action that could start once its input was ready
  // (`ready`) and took a-b; returns its modelled end.
  double advance(int k, double ready, Clock::time_point a, Clock::time_point b) {
    double& c = sim_clock_[static_cast<size_t>(k)];
    c = std::max(c, ready) + std::chrono::duration<double>(b - a).count();
    return c;
  }

  void wake_mailboxes() {
    for (auto& m : fwd_) m->wake();
    for (auto& m : bwd_) m->wake();
  }

  // Receives micro-batch mb's message for stage k, timing the wait.
  Mailbox::Got receive(int k, Mailbox& box, int64_t mb, std::vector<float>& buf, double* ready,
                       bool wait) {
    const auto t0 = Clock::now();
    const Mailbox::Got g = box.take(mb, buf, ready, wait);
    const auto t1 = Clock::now();
    if (wait && t1 - t0 > std::chrono::microseconds(20))
      record(k, 'W', mb, w_[static_cast<size_t>(k)]->version(), t0, t1);
    return g;
  }

  // Passes over an action of a micro-batch the run was cut before.
  bool skip(size_t ks) {
    ++next_[ks];
    return true;
  }

  // The end of an action that ran from t0 to t1 on a stage emulated `slowdown_` times slower:
  // the real engines wait out the difference, the sequential one only models it.
  Clock::time_point slowed(int k, Clock::time_point t0, Clock::time_point t1) {
    const double f = slowdown_[static_cast<size_t>(k)];
    if (f <= 1.0) return t1;
    const auto end = t0 + std::chrono::duration_cast<Clock::duration>((t1 - t0) * f);
    if (opt_.kind != EngineKind::Sequential) std::this_thread::sleep_until(end);
    return end;
  }

  // Stage k's output (forward) or input gradient (backward) for micro-batch mb, to the neighbour.
  void send(bool forward, int k, int64_t mb, const float* data, double ready) {
    const int to = forward ? k + 1 : k - 1;
    if (local(to)) {
      (forward ? *fwd_[static_cast<size_t>(k)] : *bwd_[static_cast<size_t>(to)]).put(mb, data, ready);
      return;
    }
    links_->send_data(to, mb, data);
  }

  // Runs stage k's next action if its input is there (always, when `wait`). Returns false when
  // it must wait (only without `wait`).
  bool execute(int k, bool wait) {
    const auto ks = static_cast<size_t>(k);
    StageWorker& w = *w_[ks];
    const Action a = s_.actions[ks][next_[ks]];
    if (k == 0 && a.op == Op::Forward && a.mb % s_.microbatches == 0 && hooks_.stop_requested &&
        sh_.cut.load() == s_.num_microbatches() && hooks_.stop_requested()) {
      sh_.cut.store(a.mb);
      wake_mailboxes();
    }
    if (a.mb >= sh_.cut.load()) return skip(ks);
    const bool first = k == 0, last = k + 1 == s_.stages;
    const int64_t version = w.version();
    std::vector<float> buf;
    double ready = 0.0;
    if (a.op == Op::Forward) {
      if (!first) {
        const auto g = receive(k, *fwd_[ks - 1], a.mb, buf, &ready, wait);
        if (g == Mailbox::Got::NotYet) return false;
        if (g == Mailbox::Got::Cut) return skip(ks);
      }
      const auto t0 = Clock::now();
      const float* out = w.forward(a.mb, first ? nullptr : buf.data());
      const auto t1 = slowed(k, t0, Clock::now());
      record(k, 'F', a.mb, version, t0, t1);
      const double end = advance(k, ready, t0, t1);
      if (!first) fwd_[ks - 1]->give_back(std::move(buf));
      if (!last) send(true, k, a.mb, out, end);
    } else if (a.op == Op::Backward) {
      if (!last) {
        const auto g = receive(k, *bwd_[ks], a.mb, buf, &ready, wait);
        if (g == Mailbox::Got::NotYet) return false;
        if (g == Mailbox::Got::Cut) return skip(ks);
      }
      const auto t0 = Clock::now();
      const float* din = w.backward(a.mb, last ? nullptr : buf.data());
      const auto t1 = slowed(k, t0, Clock::now());
      record(k, 'B', a.mb, version, t0, t1);
      const double end = advance(k, ready, t0, t1);
      if (!last) bwd_[ks]->give_back(std::move(buf));
      if (!first) send(false, k, a.mb, din, end);
    } else {
      double global = -1.0;
      if (opt_.global_clip) {
        const int64_t u = a.mb / s_.microbatches;
        if (opt_.kind == EngineKind::Mpi) {
          // Every stage's sum of squares, added in stage order as the in-process exchange does.
          const auto tw = Clock::now();
          const std::vector<double> all = mpi::allgather(std::vector<double>{w.grad_sumsq()}, opt_.peer_timeout_s,
                                                         "the gradient norm of update " + std::to_string(u + 1));
          global = 0;
          for (double x : all) global += x;
          record(k, 'W', a.mb, version, tw, Clock::now());
        } else {
          if (deposited_[ks] != u) {
            norms_.deposit(k, u, w.grad_sumsq());
            deposited_[ks] = u;
          }
          const auto tw = Clock::now();
          if (!norms_.total(u, wait, &global)) return false;
          if (wait) record(k, 'W', a.mb, version, tw, Clock::now());
        }
      }
      const auto t0 = Clock::now();
      w.step(global);
      const auto t1 = slowed(k, t0, Clock::now());
      record(k, 'S', a.mb, version, t0, t1);
      advance(k, 0.0, t0, t1);
      if (hooks_.on_step) hooks_.on_step(k, w, *this);
      if (last && hooks_.on_report) {
        const UpdateReport r{w.version(), w.last_update_loss(), w.last_lr(), w.last_grad_norm(), utilization()};
        if (opt_.kind == EngineKind::Mpi && mpi::rank() != 0)
          links_->send_report({static_cast<double>(r.step), r.loss, r.lr, r.grad_norm, r.utilization});
        else
          report(r);
      }
      if (k == 0 && !stop_decided_ && hooks_.pause_requested && hooks_.pause_requested()) {
        // The first version no stage can have made yet: stage k is at most k versions ahead
        // of stage 0 in async-1f1b (it needs stage 0's forwards), and no stage is ahead in the
        // synchronous schedules.
        stop_decided_ = true;
        const int64_t soon =
            w.version() + (s_.asynchronous() ? stage_delay(s_.kind, s_.stages, 0, s_.extra_inflight) + 1 : 1);
        int64_t cur = stop_version_.load();
        const bool lowers = soon < cur;
        while (soon < cur && !stop_version_.compare_exchange_weak(cur, soon)) {
        }
        // Other ranks learn it down the chain, ahead of any message that could take them past it
        // (only when it ends this window earlier: a stop that changes nothing is not sent, so no
        // stale one can reach a rank in a later window).
        if (lowers && opt_.kind == EngineKind::Mpi && s_.stages > 1) links_->send_stop(1, soon);
      }
      if (w.version() >= stop_version_.load()) done_[ks] = 1;
    }
    ++next_[ks];
    return true;
  }

  void report(const UpdateReport& r) {
    last_report_ = r.step;
    hooks_.on_report(r);
  }

  // ---- mpi: this rank's stage, its messages from MPI ----
  // What arrived: activations and gradients into the mailboxes (where the link emulation
  // applies), stop requests (applied and passed down the chain), reports (rank 0).
  bool handle_arrivals(double wait_s) {
    events_in_.clear();
    reports_in_.clear();
    if (!links_->poll(events_in_, reports_in_, wait_s)) return false;
    const int k = local_[0];
    for (auto& e : events_in_) {
      if (e.kind == mpi::Links::Kind::Data) {
        Mailbox& box = e.from < k ? *fwd_[static_cast<size_t>(e.from)] : *bwd_[static_cast<size_t>(k)];
        box.put(e.value, e.data.data(), 0.0);
        links_->give_back(std::move(e.data));
      } else if (e.kind == mpi::Links::Kind::Marker) {
        (e.from < k ? marker_prev_ : marker_next_) = true;
      } else {
        pause_received_ = true;
        if (e.value < stop_version_.load()) {
          stop_version_.store(e.value);
          if (k + 1 < s_.stages) links_->send_stop(k + 1, e.value);
          if (w_[static_cast<size_t>(k)]->version() >= e.value) done_[static_cast<size_t>(k)] = 1;
        }
      }
    }
    for (const auto& v : reports_in_)
      report({static_cast<int64_t>(v[0]), v[1], v[2], v[3], v[4]});
    return true;
  }

  [[noreturn]] void lost(int peer, double since) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.0f", since);
    throw Error("rank " + std::to_string(local_[0]) + ": nothing from rank " + std::to_string(peer) + " for " + buf +
                " s (pipeline.peer_timeout_s): rank " + std::to_string(peer) +
                " was lost or stalled; last completed update " + std::to_string(w_[static_cast<size_t>(local_[0])]->version()));
  }

  void run_mpi() {
    const int k = local_[0];
    const auto ks = static_cast<size_t>(k);
    // A neighbour's marker can arrive before this stage reaches the cut.
    marker_prev_ = k == 0;
    marker_next_ = k + 1 == s_.stages;
    auto quiet_since = Clock::now();
    const auto idle = [&] { return std::chrono::duration<double>(Clock::now() - quiet_since).count(); };
    while (!done_[ks] && next_[ks] < s_.actions[ks].size()) {
      if (handle_arrivals(0.0)) quiet_since = Clock::now();
      if (done_[ks]) break;
      if (execute(k, false)) {
        quiet_since = Clock::now();
        continue;
      }
      if (handle_arrivals(0.002)) {
        quiet_since = Clock::now();
      } else if (idle() > opt_.peer_timeout_s) {
        const Op op = s_.actions[ks][next_[ks]].op;
        lost(op == Op::Forward ? k - 1 : k + 1, idle());
      }
    }
    // The cut: a marker to each neighbour after everything sent before it; what a neighbour sent
    // before its marker is in transit at the cut and stays in the mailboxes (Flow::messages).
    for (int nb : {k - 1, k + 1})
      if (nb >= 0 && nb < s_.stages) links_->send_marker(nb);
    quiet_since = Clock::now();
    const int64_t mine = w_[ks]->version();
    while (!marker_prev_ || !marker_next_ || (k == 0 && s_.stages > 1 && hooks_.on_report && last_report_ < mine)) {
      if (handle_arrivals(0.002)) quiet_since = Clock::now();
      else if (idle() > opt_.peer_timeout_s)
        lost(!marker_prev_ ? k - 1 : !marker_next_ ? k + 1 : s_.stages - 1, idle());
    }
    links_->flush(opt_.peer_timeout_s);
  }

  void run_sequential() {
    const int P = s_.stages;
    for (;;) {
      bool progressed = false, left = false;
      for (int k = 0; k < P; ++k) {
        const auto ks = static_cast<size_t>(k);
        while (!done_[ks] && next_[ks] < s_.actions[ks].size() && execute(k, false)) progressed = true;
        left |= !done_[ks] && next_[ks] < s_.actions[ks].size();
      }
      if (!left) return;
      if (!progressed) throw Error("engine: schedule deadlocked (validate_schedule should have caught it)");
    }
  }

  void run_threads() {
    const int P = s_.stages;
    std::mutex err_mu;
    std::exception_ptr err;
    std::vector<std::thread> threads;
    for (int k = 0; k < P; ++k) {
      threads.emplace_back([this, k, &err_mu, &err] {
        try {
          omp_set_num_threads(opt_.blas_threads);
          const auto ks = static_cast<size_t>(k);
          while (!done_[ks] && next_[ks] < s_.actions[ks].size()) execute(k, true);
        } catch (const Aborted&) {
        } catch (...) {
          {
            std::lock_guard<std::mutex> l(err_mu);
            if (!err) err = std::current_exception();
          }
          sh_.aborted.store(true);
          wake_mailboxes();
          norms_.wake();
        }
      });
    }
    for (auto& t : threads) t.join();
    if (err) std::rethrow_exception(err);
  }

  const Schedule& s_;
  const std::vector<StageWorker*>& w_;
  const EngineOptions& opt_;
  const EngineHooks& hooks_;
  Shared sh_;
  std::vector<StageCounters> counters_;
  std::vector<size_t> next_;
  std::vector<char> done_;          // per stage: reached the window's stop version
  std::atomic<int64_t> stop_version_{INT64_MAX};
  bool stop_decided_ = false;       // stage 0's thread only
  std::optional<Clock::time_point> paused_since_;
  double paused_ = 0;
  std::vector<int64_t> deposited_;  // the last update each stage deposited its norm for
  std::vector<double> sim_clock_;   // per stage, the modelled timeline (each written by its stage)
  std::vector<std::unique_ptr<Mailbox>> fwd_, bwd_;  // fwd_[k]: k -> k+1; bwd_[k]: k+1 -> k
  std::vector<std::vector<TraceEvent>> events_;
  NormExchange norms_;
  Clock::time_point start_;
  std::vector<int> local_;          // the stages this process runs
  std::vector<double> slowdown_;    // per stage
  std::unique_ptr<mpi::Links> links_;  // mpi
  std::vector<mpi::Links::Event> events_in_;
  std::vector<std::vector<double>> reports_in_;
  bool marker_prev_ = false, marker_next_ = false;
  int64_t last_report_ = -1;
  bool pause_received_ = false;
};

}  // namespace

RunStats run_schedule(const Schedule& s, const std::vector<StageWorker*>& workers,
                      const EngineOptions& opt, const EngineHooks& hooks) {
  Run run(s, workers, opt, hooks);
  return run.go();
}

struct Flow::Impl {
  Schedule schedule;
  std::vector<StageWorker*> workers;
  EngineOptions opt;
  EngineHooks hooks;
  int64_t base = 0;
  std::unique_ptr<Run> run;
};

Flow::Flow(Schedule s, std::vector<StageWorker*> workers, const EngineOptions& opt, EngineHooks hooks,
           int64_t base_version)
    : impl_(std::make_unique<Impl>()) {
  impl_->schedule = std::move(s);
  impl_->workers = std::move(workers);
  impl_->opt = opt;
  impl_->hooks = std::move(hooks);
  impl_->base = base_version;
  impl_->run = std::make_unique<Run>(impl_->schedule, impl_->workers, impl_->opt, impl_->hooks);
}

Flow::~Flow() = default;

int64_t Flow::run_until(int64_t version) {
  // Every stage stops after a Step that reaches `version`; one already past it would never stop.
  if (version <= impl_->run->min_version())
    throw Error("flow: run_until(" + std::to_string(version) + ") at version " +
                std::to_string(impl_->run->min_version()) + " (internal error)");
  impl_->run->window(version);
  return impl_->run->min_version();
}

bool Flow::pause_received() const { return impl_->run->pause_received(); }

RunStats Flow::stats() const {
  RunStats r = impl_->run->stats();
  r.updates = impl_->run->min_version() - impl_->base;
  r.microbatches = r.updates * impl_->schedule.microbatches;
  return r;
}

std::vector<Flow::Message> Flow::messages() const {
  std::vector<Message> out;
  for (int k = 0; k + 1 < impl_->schedule.stages; ++k) {
    if (impl_->run->local(k + 1))
      for (auto& [mb, data] : impl_->run->forward_box(k).pending()) out.push_back({true, k, mb, std::move(data)});
    if (impl_->run->local(k))
      for (auto& [mb, data] : impl_->run->backward_box(k).pending()) out.push_back({false, k, mb, std::move(data)});
  }
  return out;
}

void Flow::resume_at(int64_t version, const std::vector<Message>& msgs) {
  impl_->run->start_after(version - impl_->base);
  for (const Message& m : msgs) {
    if (m.boundary < 0 || m.boundary + 1 >= impl_->schedule.stages)
      throw Error("flow: a message across boundary " + std::to_string(m.boundary) + " of a " +
                  std::to_string(impl_->schedule.stages) + "-stage pipeline");
    const int receiver = m.forward ? m.boundary + 1 : m.boundary;
    if (!impl_->run->local(receiver)) continue;  // another rank's
    Mailbox& box = m.forward ? impl_->run->forward_box(m.boundary) : impl_->run->backward_box(m.boundary);
    const size_t want = impl_->workers[static_cast<size_t>(receiver)]->boundary_floats();
    if (m.data.size() != want)
      throw Error("flow: a message of " + std::to_string(m.data.size()) + " floats across boundary " +
                  std::to_string(m.boundary) + ", expected " + std::to_string(want));
    box.put(m.mb, m.data.data(), 0.0);
  }
}

Schedule truncate_schedule(const Schedule& s, int64_t cut) {
  if (cut < 0 || cut > s.num_microbatches() || cut % s.microbatches != 0)
    throw Error("truncate_schedule: cut " + std::to_string(cut) + " is not an update boundary");
  Schedule t = s;
  t.updates = cut / s.microbatches;
  for (auto& list : t.actions)
    list.erase(std::remove_if(list.begin(), list.end(), [&](const Action& a) { return a.mb >= cut; }),
               list.end());
  return t;
}

std::string trace_json(const std::vector<TraceEvent>& events, int stages) {
  nlohmann::json ev = nlohmann::json::array();
  for (int k = 0; k < stages; ++k) {
    ev.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", 0}, {"tid", k},
                  {"args", {{"name", "stage " + std::to_string(k)}}}});
    ev.push_back({{"name", "thread_sort_index"}, {"ph", "M"}, {"pid", 0}, {"tid", k},
                  {"args", {{"sort_index", k}}}});
  }
  for (const auto& e : events) {
    const char* name = e.kind == 'F' ? "forward" : e.kind == 'B' ? "backward" : e.kind == 'S' ? "step" : "wait";
    nlohmann::json j = {{"name", e.kind == 'S' || e.kind == 'W' ? std::string(name)
                                                                : std::string(1, e.kind) + std::to_string(e.mb)},
                        {"cat", name},
                        {"ph", "X"},
                        {"pid", 0},
                        {"tid", e.stage},
                        {"ts", e.start * 1e6},
                        {"dur", (e.end - e.start) * 1e6},
                        {"args", {{"mb", e.mb}, {"version", e.version}}}};
    ev.push_back(std::move(j));
  }
  return nlohmann::json{{"traceEvents", ev}, {"displayTimeUnit", "ms"}}.dump() + "\n";
}

}  // namespace pipenag
