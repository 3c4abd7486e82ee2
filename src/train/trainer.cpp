#include "train/trainer.h"

#include <omp.h>

#include <unistd.h>

#include <array>
#include <optional>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "comm/mpi.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/token_file.h"
#include "data/tokenizer.h"
#include "io/atomic_file.h"
#include "kernels/kernels.h"
#include "model/units.h"
#include "optim/grad_clip.h"
#include "optim/lr_schedule.h"
#include "pipeline/engine.h"
#include "pipeline/partition.h"
#include "pipeline/schedule.h"
#include "pipeline/stage.h"
#include "pipeline/stage_worker.h"
#include "train/checkpoint.h"
#include "train/config_file.h"
#include "train/progress.h"
#include "train/run_folder.h"
#include "util/error.h"

namespace pipenag {
namespace fs = std::filesystem;

namespace {

std::atomic<int> g_stop_signal{0};
// The first signal asks for a checkpoint and a stop; a second one of the same kind ends the
// process at once (the handler puts the default action back).
extern "C" void on_stop_signal(int sig) {
  g_stop_signal.store(sig);
  std::signal(sig, SIG_DFL);
}

// Installs SIGINT/SIGTERM/SIGHUP handlers for the duration of a training run: the loop finishes
// the step in progress, writes a checkpoint and stops, so nothing is lost on Ctrl-C, a kill or a
// closed terminal. SIGPIPE is ignored: a reader of the progress output that goes away (`| head`)
// must not kill the training; the write fails with EPIPE instead, and progress output ignores it.
class StopSignals {
 public:
  StopSignals() {
    g_stop_signal.store(0);
    for (size_t i = 0; i < kSignals.size(); ++i) old_[i] = std::signal(kSignals[i], on_stop_signal);
    old_pipe_ = std::signal(SIGPIPE, SIG_IGN);
  }
  ~StopSignals() {
    for (size_t i = 0; i < kSignals.size(); ++i) std::signal(kSignals[i], old_[i]);
    std::signal(SIGPIPE, old_pipe_);
  }
  int pending() const { return g_stop_signal.load(); }

 private:
  static constexpr std::array<int, 3> kSignals = {SIGINT, SIGTERM, SIGHUP};
  std::array<void (*)(int), 3> old_{};
  void (*old_pipe_)(int) = SIG_DFL;
};

int cores() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

// train.threads, or all cores; never more threads than cores (a note says so when capped).
int thread_count(const TrainConfig& t, std::string* note = nullptr) {
  if (t.threads <= 0) return cores();
  if (t.threads > cores()) {
    if (note)
      *note = "train.threads = " + std::to_string(t.threads) + " is more than the " +
              std::to_string(cores()) + " cores here; using " + std::to_string(cores());
    return cores();
  }
  return t.threads;
}

void check_vocab(const ModelConfig& m, int tokenizer_vocab) {
  if (m.vocab_size < tokenizer_vocab)
    throw Error("model.vocab_size (" + std::to_string(m.vocab_size) +
                ") is smaller than the tokenizer's vocabulary (" +
                std::to_string(tokenizer_vocab) + ")");
}

// Reads a prepared folder's meta.json (Error naming it when missing or damaged).
nlohmann::json read_meta(const std::string& dir) {
  const std::string path = dir + "/meta.json";
  try {
    return nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": not valid JSON (" + std::string(e.what()) + ")");
  }
}

// Appends one JSON object per line; every line is flushed so a crash loses at most the line
// being written.
class MetricsLog {
 public:
  // Resuming keeps the history up to the checkpoint's step; a line that is not valid JSON (a
  // torn write, a damaged file) goes to <path>.corrupt instead of silently ending the history,
  // and `note` says how many did.
  MetricsLog(const std::string& path, bool resume, int64_t resume_step, std::string* note) : path_(path) {
    std::string kept, bad;
    int n_bad = 0;
    if (resume && fs::exists(path)) {
      std::istringstream in(read_file(path));
      std::string line;
      while (std::getline(in, line)) {
        if (line.empty()) continue;
        try {
          const auto j = nlohmann::json::parse(line);
          if (!j.is_object() || !j.contains("step") || !j["step"].is_number_integer())
            throw std::invalid_argument("no step");
          if (j["step"].get<int64_t>() <= resume_step) kept += line + "\n";
        } catch (const std::exception&) {
          bad += line + "\n";
          ++n_bad;
        }
      }
    }
    if (n_bad > 0) {
      const std::string q = path + ".corrupt";
      std::string old;
      if (fs::exists(q)) old = read_file(q);
      write_file_atomic(q, old + bad);
      *note = path + ": " + std::to_string(n_bad) + " damaged line" + (n_bad == 1 ? "" : "s") +
              " moved to " + q + "; the valid lines are kept";
    }
    write_file_atomic(path, kept);
    f_ = std::fopen(path.c_str(), "ab");
    if (!f_) throw Error(path + ": cannot open for appending: " + std::strerror(errno));
  }
  ~MetricsLog() {
    if (f_) std::fclose(f_);
  }
  void write(const nlohmann::json& j) {
    const std::string s = j.dump() + "\n";
    errno = 0;
    if (std::fwrite(s.data(), 1, s.size(), f_) != s.size() || std::fflush(f_) != 0)
      throw Error(path_ + ": write failed: " + (errno ? std::strerror(errno) : "short write"));
  }

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

// `step`: the update whose loss it is (as metrics.jsonl numbers it).
double nan_guard(double loss, int64_t step, double clip) {
  if (!std::isfinite(loss)) {
    char c[64];
    std::snprintf(c, sizeof c, "%g", clip);
    throw Error("training diverged: loss is " + std::to_string(loss) + " at step " +
                std::to_string(step) +
                (clip > 0 ? " (lower train.lr; clipping at train.clip = " + std::string(c) + " is already on)"
                          : std::string(" (lower train.lr or set train.clip, e.g. 1.0)")));
  }
  return loss;
}

struct Data {
  std::string dir;  // folder with train.bin, val.bin, meta.json
  TokenFile train_file, val_file;
  std::unique_ptr<TokenLoader> train, val;
};

Data load_data(const Config& cfg, std::string* note = nullptr) {
  Data d;
  d.dir = prepared_data_dir(cfg, note);
  d.train_file = TokenFile::open(d.dir + "/train.bin");
  d.val_file = TokenFile::open(d.dir + "/val.bin");
  check_vocab(cfg.model, d.train_file.vocab_size());
  check_vocab(cfg.model, d.val_file.vocab_size());
  const Order order = cfg.data.order == "shuffled" ? Order::Shuffled : Order::Sequential;
  d.train = std::make_unique<TokenLoader>(d.train_file, cfg.train.batch_size, cfg.model.block_size,
                                          order, cfg.train.seed, "training");
  d.val = std::make_unique<TokenLoader>(d.val_file, cfg.train.batch_size, cfg.model.block_size,
                                        Order::Sequential, 0, "validation");
  return d;
}

// An evaluation scores `batches` validation batches spread evenly over the whole split (the same
// ones every evaluation and every run of the same data), or all of them when batches is 0 or at
// least the split's size.
int64_t eval_batch_count(const TokenLoader& val, int batches) {
  const int64_t n = val.batches_per_epoch();
  return batches <= 0 || batches >= n ? n : batches;
}
int64_t eval_batch_index(const TokenLoader& val, int64_t i, int64_t count) {
  return i * val.batches_per_epoch() / count;
}

// Mean validation loss, the batch passed through the stages in order, each stage on the given
// slot (a free one: micro-batches in flight keep what they saved).
double eval_loss(const std::vector<std::pair<Stage*, int>>& stages, const TokenLoader& val, int batches,
                 std::vector<int32_t>& x, std::vector<int32_t>& y) {
  double sum = 0.0;
  int64_t count = 0;
  const int64_t n = eval_batch_count(val, batches);
  for (int64_t i = 0; i < n; ++i) {
    val.batch(eval_batch_index(val, i, n), x.data(), y.data());
    UnitContext ctx;
    ctx.training = false;
    const float* in = nullptr;
    for (auto [s, slot] : stages) {
      s->forward(slot, in, MicroBatch{x.data(), y.data()}, ctx);
      if (!s->has_head()) in = s->output(slot);
    }
    sum += ctx.loss_sum;
    count += ctx.loss_count;
  }
  return count ? sum / static_cast<double>(count) : 0.0;
}

double eval_loss(const std::vector<StageWorker*>& workers, const TokenLoader& val, int batches,
                 std::vector<int32_t>& x, std::vector<int32_t>& y) {
  std::vector<std::pair<Stage*, int>> stages;
  for (auto* w : workers) stages.emplace_back(&w->stage(), w->free_slot());
  return eval_loss(stages, val, batches, x, y);
}

// mpi: the same, each rank running its own stage and passing the activations on to the next
// rank; every rank returns the loss.
double eval_loss_mpi(StageWorker& w, int P, const TokenLoader& val, int batches, std::vector<int32_t>& x,
                     std::vector<int32_t>& y, double timeout_s) {
  const int k = w.options().index;
  const int slot = w.free_slot();
  Stage& s = w.stage();
  std::vector<float> in(k > 0 ? w.boundary_floats() : 0);
  double sum = 0.0, count = 0.0;
  constexpr int kTag = 7;
  const int64_t n = eval_batch_count(val, batches);
  for (int64_t i = 0; i < n; ++i) {
    if (k == 0 || k + 1 == P) val.batch(eval_batch_index(val, i, n), x.data(), y.data());  // tokens first, targets last
    if (k > 0) mpi::recv(k - 1, kTag, in.data(), in.size() * sizeof(float), timeout_s);
    UnitContext ctx;
    ctx.training = false;
    s.forward(slot, k > 0 ? in.data() : nullptr, MicroBatch{x.data(), y.data()}, ctx);
    if (k + 1 < P) mpi::send(k + 1, kTag, s.output(slot), w.boundary_floats() * sizeof(float), timeout_s);
    sum += ctx.loss_sum;
    count += static_cast<double>(ctx.loss_count);
  }
  const std::vector<double> all = mpi::allgather(std::vector<double>{sum, count}, timeout_s, "evaluation");
  sum = all[2 * static_cast<size_t>(P - 1)];
  count = all[2 * static_cast<size_t>(P - 1) + 1];
  return count > 0 ? sum / count : 0.0;
}

// mpi start-up: one rank per stage, and every rank runs the same code on the same config.
void mpi_startup(const Config& cfg) {
  mpi::init();
  const int n = mpi::size(), P = cfg.pipeline.stages;
  // The configs first (ranks given different pipeline.stages must not disagree on what follows).
  const nlohmann::json mine = {{"version", PIPENAG_VERSION_TEXT}, {"config", config_to_json(cfg)}};
  const std::vector<std::string> all = mpi::allgather(mine.dump(), cfg.pipeline.peer_timeout_s, "start-up checks");
  const nlohmann::json zero = nlohmann::json::parse(all[0]);
  for (int r = 1; r < n; ++r) {
    const nlohmann::json other = nlohmann::json::parse(all[static_cast<size_t>(r)]);
    if (other["version"] != zero["version"])
      throw mpi::AgreedError("rank " + std::to_string(r) + " runs pipenag " + other["version"].get<std::string>() +
                             ", rank 0 runs " + zero["version"].get<std::string>() + " (use one build everywhere)");
    for (const auto& [section, keys] : zero["config"].items()) {
      if (!keys.is_object()) {
        if (other["config"][section] != keys)
          throw mpi::AgreedError("rank " + std::to_string(r) + " has a different config: " + section + " = " +
                                 other["config"][section].dump() + " there, " + keys.dump() + " on rank 0");
        continue;
      }
      for (const auto& [key, value] : keys.items())
        if (other["config"][section][key] != value)
          throw mpi::AgreedError("rank " + std::to_string(r) + " has a different config: " + section + "." + key +
                                 " = " + other["config"][section][key].dump() + " there, " + value.dump() +
                                 " on rank 0");
    }
  }
  if (n != P)
    throw mpi::AgreedError("rank " + std::to_string(mpi::rank()) + ": " + std::to_string(n) + " MPI ranks for pipeline.stages = " +
                           std::to_string(P) + " (the mpi engine runs one stage per rank: mpirun -np " + std::to_string(P) + ")");
}

}  // namespace

std::string prepared_data_dir(const Config& cfg, std::string* note) {
  if (!cfg.data.dir.empty()) {
    const std::string bad = prepared_folder_mismatch(cfg.data.dir);
    if (!bad.empty())
      throw Error(bad + " (a prepare was interrupted, or files from different runs were mixed: run "
                  "`pipenag prepare` again)");
    return cfg.data.dir;
  }
  if (cfg.data.input.empty()) throw Error("data.input or data.dir must be set");
  // data.input is tokenised once into <out.dir>/data and reused while the corpus, tokenizer and
  // split settings stay the same and the token files are the ones meta.json describes.
  const std::string dir = cfg.out.dir + "/data";
  const auto tok = load_tokenizer(cfg.data.tokenizer);
  if (std::filesystem::exists(dir + "/meta.json")) {
    std::string why;
    try {
      const nlohmann::json m = read_meta(dir);
      if (m.value("input", "") != cfg.data.input) why = "data.input differs";
      else if (m.value("tokenizer", "") != tok->name()) why = "data.tokenizer differs";
      else if (m.value("val_fraction", -1.0) != cfg.data.val_fraction) why = "data.val_fraction differs";
      else if (m.value("split_seed", uint64_t{1} << 63) != cfg.data.split_seed) why = "data.split_seed differs";
      if (why.empty()) why = prepared_folder_mismatch(dir);
      if (why.empty()) {
        const std::string changed = input_change_since(dir, cfg.data.input);
        if (!changed.empty()) why = "the corpus changed since it was tokenised: " + changed;
      }
    } catch (const Error& e) {
      why = e.what();
    }
    if (why.empty()) return dir;
    if (note) *note = "re-tokenising " + cfg.data.input + " into " + dir + " (" + why + ")";
  }
  prepare_corpus(cfg.data.input, *tok, dir, cfg.data.val_fraction, cfg.data.split_seed);
  return dir;
}

std::string tokenizer_spec(const Config& cfg) {
  if (cfg.data.dir.empty()) return cfg.data.tokenizer;
  // Where the token files are present (they need not be, to sample), they must be the ones
  // meta.json describes, or its tokenizer may not be theirs.
  if (fs::exists(cfg.data.dir + "/train.bin") || fs::exists(cfg.data.dir + "/val.bin")) {
    const std::string bad = prepared_folder_mismatch(cfg.data.dir);
    if (!bad.empty()) throw Error(bad + " (run `pipenag prepare` again)");
  }
  const nlohmann::json m = read_meta(cfg.data.dir);
  if (!m.contains("tokenizer") || !m["tokenizer"].is_string())
    throw Error(cfg.data.dir + "/meta.json: no tokenizer field");
  return m["tokenizer"].get<std::string>();
}

std::vector<std::unique_ptr<StageWorker>> make_workers(const Config& cfg, int only) {
  const ScheduleKind kind = parse_schedule_kind(cfg.pipeline.schedule);
  const int P = cfg.pipeline.stages;
  const int M = kind == ScheduleKind::Async1F1B ? 1 : cfg.pipeline.microbatches;
  const int E = cfg.pipeline.extra_inflight;
  // In-flight micro-batches per stage in the steady state of the schedule.
  const std::vector<int> slots = max_in_flight(make_schedule(kind, P, M, 2 * (P + E) + 2, E));
  const std::vector<int> bounds = unit_boundaries(cfg.model, cfg.pipeline);
  const float grad_scale =
      1.0f / static_cast<float>(static_cast<size_t>(M) * cfg.train.batch_size * cfg.model.block_size);
  std::vector<std::unique_ptr<StageWorker>> workers;
  for (int k = 0; k < P; ++k) {
    StageOptions o;
    o.index = k;
    o.first_unit = bounds[static_cast<size_t>(k)];
    o.last_unit = bounds[static_cast<size_t>(k) + 1];
    o.slots = slots[static_cast<size_t>(k)];
    o.stages = P;
    o.delay = stage_delay(kind, P, k, E);
    o.stash = cfg.pipeline.stash;
    o.recompute = cfg.pipeline.recompute;
    o.grad_scale = grad_scale;
    workers.push_back(only < 0 || only == k ? std::make_unique<StageWorker>(cfg, o) : nullptr);
  }
  return workers;
}

static std::string format_bytes(double b);

// pipeline.extra_inflight: every stage holds P-1-k+E micro-batches' activations and, with
// stashing, as many weight versions. Refused with the estimate when it exceeds this machine's
// memory (`only` >= 0: just that stage, the one this rank runs).
static void check_inflight_memory(const Config& cfg, ScheduleKind kind, int only) {
  const int P = cfg.pipeline.stages, E = cfg.pipeline.extra_inflight;
  const std::vector<int> bounds = unit_boundaries(cfg.model, cfg.pipeline);
  const auto units = make_gpt_units(cfg.model);
  const int B = cfg.train.batch_size;
  double bytes = 0;
  for (int k = 0; k < P; ++k) {
    if (only >= 0 && k != only) continue;
    double acts = static_cast<double>(B) * cfg.model.block_size * cfg.model.n_embd, params = 0;
    for (int u = bounds[static_cast<size_t>(k)]; u < bounds[static_cast<size_t>(k) + 1]; ++u) {
      acts += static_cast<double>(units[static_cast<size_t>(u)]->act_floats(B));
      params += static_cast<double>(units[static_cast<size_t>(u)]->num_params());
    }
    const double tau = stage_delay(kind, P, k, E);
    bytes += 4.0 * ((tau + 1) * acts + (cfg.pipeline.stash ? tau : 0.0) * params + 4 * params);
  }
  const double ram = static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE));
  if (ram > 0 && bytes > 0.9 * ram)
    throw Error("pipeline.extra_inflight = " + std::to_string(E) + " needs about " + format_bytes(bytes) +
                " (activations of tau_k + 1 micro-batches in flight" + (cfg.pipeline.stash ? " and tau_k weight versions" : "") +
                " per stage), more than the " + format_bytes(ram) + " of memory here");
}

// pipeline.partition = "auto": the cut that balances the unit costs measured now with each stage
// thread's BLAS threads (resuming keeps the checkpoint's cut, whose optimizer state and stashes
// are per stage). Returns cfg with explicit blocks, and in `note` a line saying what was chosen.
Config resolve_partition(const Config& cfg, bool resume, int threads_per_stage, std::string* note) {
  if (!cfg.pipeline.partition.automatic) return cfg;
  Config out = cfg;
  const auto list = [](const std::vector<int>& v) {
    std::string s;
    for (int b : v) s += (s.empty() ? "" : ",") + std::to_string(b);
    return s;
  };
  if (resume) {
    const std::vector<int> blocks = checkpoint_blocks_per_stage(cfg.out.dir + "/checkpoint");
    out.pipeline.partition = Partition(blocks);
    *note = "partition auto: blocks " + list(blocks) + ", the checkpoint's cut";
    return out;
  }
  const std::vector<double> units =
      measure_unit_costs(cfg.model, cfg.train.batch_size, cfg.pipeline.recompute, cfg.train.bf16,
                         threads_per_stage);
  const std::vector<int> blocks = balanced_partition(units, cfg.pipeline.stages);
  out.pipeline.partition = Partition(blocks);
  const std::vector<double> costs = stage_costs(units, blocks);
  std::string stages;
  double worst = 0, sum = 0;
  for (double c : costs) {
    char b[32];
    std::snprintf(b, sizeof b, "%s%.1f", stages.empty() ? "" : " | ", c * 1e3);
    stages += b;
    worst = std::max(worst, c);
    sum += c;
  }
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "partition auto: blocks %s, measured stage costs %s ms per micro-batch "
                "(embedding %.1f, block %.1f, head %.1f ms; balance %.1f%%)",
                list(blocks).c_str(), stages.c_str(), units.front() * 1e3, units[1] * 1e3,
                units.back() * 1e3, 100.0 * sum / (worst * static_cast<double>(costs.size())));
  *note = buf;
  return out;
}

namespace {

// The whole run's schedule is held in memory (16 bytes an action).
constexpr double kMaxRunActions = 3e7;
// Synchronous schedules flush every update; they run in legs of this many updates.
constexpr int64_t kSyncLeg = 100000;

// A checkpoint taken mid-flow fits a schedule when, at its cut (`updates` after the schedule's
// start), every stage has exactly the micro-batches in flight that the schedule has in flight
// there (train.steps may have changed; the prefix is the same unless the schedule ends earlier).
bool flow_fits(const Schedule& s, const std::vector<StageWorker*>& ws, int64_t updates) {
  for (size_t k = 0; k < ws.size(); ++k) {
    if (!ws[k]) continue;  // another rank's
    std::vector<int64_t> want;
    int64_t n = 0;
    for (const Action& a : s.actions[k]) {
      if (n == updates) break;
      if (a.op == Op::Forward) want.push_back(a.mb);
      else if (a.op == Op::Backward) want.erase(std::find(want.begin(), want.end(), a.mb));
      else ++n;
    }
    if (n < updates) return false;
    std::vector<int64_t> have;
    for (const auto& r : ws[k]->in_flight()) have.push_back(r.mb);
    std::sort(have.begin(), have.end());
    std::sort(want.begin(), want.end());
    if (have != want) return false;
  }
  return true;
}

}  // namespace

static std::string format_bytes(double b) {
  char buf[32];
  if (b >= 1 << 30) std::snprintf(buf, sizeof buf, "%.2f GiB", b / (1 << 30));
  else std::snprintf(buf, sizeof buf, "%.1f MiB", b / (1 << 20));
  return buf;
}

namespace {

// What an earlier run left in out.dir: continued (--resume), removed (--force), else refused.
void claim_run_folder(const Config& cfg, const TrainOptions& opt, std::vector<std::string>& notes) {
  const std::string dir = cfg.out.dir.empty() ? "." : cfg.out.dir;
  // Decided before anything is removed: a refused run deletes nothing.
  const auto clean = [&] {
    if (const int n = remove_stale_temporaries(dir); n > 0)
      notes.push_back("removed " + std::to_string(n) + " temporar" + (n == 1 ? "y" : "ies") +
                      " left in " + dir + " by killed runs");
  };
  const std::string ckpt = dir + "/checkpoint", metrics = dir + "/metrics.jsonl";
  if (opt.resume) {
    if (opt.force) throw Error("--resume and --force exclude each other");
    clean();
    return;
  }
  std::error_code ec;
  const bool has_ckpt = fs::exists(ckpt, ec);
  const bool has_metrics = fs::exists(metrics, ec) && fs::file_size(metrics, ec) > 0;
  if (!has_ckpt && !has_metrics) {
    clean();
    return;
  }
  if (!opt.force) {
    std::string what = "an earlier run";
    try {
      const auto j = nlohmann::json::parse(read_file(ckpt + "/state.json"));
      what += " (checkpoint at step " + std::to_string(j.at("step").get<int64_t>()) + ")";
    } catch (const std::exception&) {
    }
    throw Error("out.dir " + dir + " holds " + what +
                "; continue it with --resume, or start over with --force (which deletes it)");
  }
  for (const char* f : {"checkpoint", "metrics.jsonl", "metrics.jsonl.corrupt", "memory.json"})
    fs::remove_all(dir + "/" + f, ec);
  notes.push_back("--force: removed the earlier run's checkpoint and metrics from " + dir);
  clean();
}

}  // namespace

TrainResult train(const Config& user_cfg, const TrainOptions& opt) {
  const EngineKind engine = parse_engine_kind(user_cfg.pipeline.engine);
  // mpi: this process is rank k and runs stage k; rank 0 owns the run folder, the data
  // preparation, the metrics and the output. Every step that can fail on one rank is agreed on,
  // so that all ranks stop with the same line instead of waiting for each other.
  const bool dist = engine == EngineKind::Mpi;
  const double peer_timeout = user_cfg.pipeline.peer_timeout_s;
  // Steps that read or write checkpoint files wait longer for the slowest rank's disk.
  const double io_timeout = std::max(10 * peer_timeout, 600.0);
  if (!dist && mpi::launched_by_mpi() && mpi::launcher_size() > 1)
    throw Error("started by an MPI launcher with " + std::to_string(mpi::launcher_size()) +
                " ranks, but pipeline.engine = \"" + user_cfg.pipeline.engine +
                "\": set pipeline.engine = \"mpi\" (one stage per rank), or run one process");
  if (dist) mpi_startup(user_cfg);
  const int rank = dist ? mpi::rank() : 0;
  const bool root = rank == 0;
  const auto together = [&](const std::string& what, const std::function<void()>& f, double timeout = 0) {
    if (dist) mpi::agree(f, timeout > 0 ? timeout : peer_timeout, what);
    else f();
  };
  // Rank 0 may tokenise a corpus meanwhile; the others wait for it without a peer timeout.
  constexpr double kPrepareTimeout = 7 * 24 * 3600.0;
  // One owner per run folder for the whole run, data preparation included.
  std::optional<RunFolderLock> lock;
  std::vector<std::string> notes;
  together("claiming out.dir", [&] {
    if (!root) return;
    lock.emplace(user_cfg.out.dir.empty() ? "." : user_cfg.out.dir);
    claim_run_folder(user_cfg, opt, notes);
  });
  std::string threads_note;
  int cores = thread_count(user_cfg.train, &threads_note);
  if (dist && mpi::local_size() > 1) {
    // Ranks sharing a machine share its cores.
    cores = std::max(1, cores / mpi::local_size());
    threads_note = std::to_string(mpi::local_size()) + " ranks on this machine: " + std::to_string(cores) +
                   " thread" + (cores == 1 ? "" : "s") + " each";
  }
  if (!threads_note.empty()) notes.push_back(threads_note);
  const ScheduleKind kind = parse_schedule_kind(user_cfg.pipeline.schedule);
  const int P = user_cfg.pipeline.stages;
  const int M = kind == ScheduleKind::Async1F1B ? 1 : user_cfg.pipeline.microbatches;
  // Thread budget: stage threads times BLAS threads per stage never exceeds the cores (each
  // stage thread gets at least one).
  const int blas_threads = engine == EngineKind::Threads ? std::max(1, cores / P) : cores;
  std::string partition_note;
  Config cfg;
  if (dist) {
    // The cut is measured once, on rank 0, and every rank takes it.
    std::string text;
    together("choosing the partition", [&] {
      if (root) text = config_to_toml(resolve_partition(user_cfg, opt.resume, blas_threads, &partition_note));
    }, kPrepareTimeout);
    cfg = parse_config(mpi::broadcast(text, 0, peer_timeout, "the partition"), "rank 0's config", {});
    cfg.method = user_cfg.method;
  } else {
    cfg = resolve_partition(user_cfg, opt.resume, blas_threads, &partition_note);
  }
  omp_set_num_threads(cores);
  const int B = cfg.train.batch_size, T = cfg.model.block_size;
  const int64_t tokens_per_update = static_cast<int64_t>(M) * B * T;
  std::string data_note;
  Data data;
  if (dist) {
    std::string dir;
    together("preparing the data", [&] { if (root) dir = prepared_data_dir(cfg, &data_note); }, kPrepareTimeout);
    dir = mpi::broadcast(dir, 0, peer_timeout, "the data folder");
    together("opening the data", [&] {
      Config c = cfg;
      c.data.dir = dir;
      data = load_data(c);
    });
    // Every rank reads the same token files (a hash of their description, exchanged once).
    const std::string meta = read_file(dir + "/meta.json");
    const std::string mine = hex64(xxhash64(meta.data(), meta.size())) + " " + std::to_string(data.train_file.size()) +
                             " " + std::to_string(data.val_file.size());
    const auto all = mpi::allgather(mine, peer_timeout, "data check");
    for (size_t r = 1; r < all.size(); ++r)
      if (all[r] != all[0])
        throw mpi::AgreedError("rank " + std::to_string(r) + " has different data files in " + dir +
                               " than rank 0 (meta.json hash and token counts " + all[r] + " there, " + all[0] +
                               " on rank 0)");
  } else {
    data = load_data(cfg, &data_note);
  }
  if (!data_note.empty()) notes.push_back(data_note);

  if (cfg.pipeline.extra_inflight > 0) check_inflight_memory(cfg, kind, dist ? rank : -1);
  auto workers = make_workers(cfg, dist ? rank : -1);
  std::vector<StageWorker*> ws;     // P entries; mpi: null for the other ranks' stages
  std::vector<StageWorker*> mine;   // the stages this process runs
  std::vector<StagePart> parts;
  size_t n_params = 0;
  for (auto& w : workers) {
    ws.push_back(w.get());
    if (!w) continue;
    mine.push_back(w.get());
    parts.push_back({&w->stage(), &w->optimizer(), w->correction_state(), w.get()});
    n_params += w->stage().num_params();
  }
  if (dist) {
    n_params = 0;
    for (double c : mpi::allgather(std::vector<double>{static_cast<double>(parts[0].stage->num_params())},
                                   peer_timeout, "parameter count"))
      n_params += static_cast<size_t>(c);
  }
  TrainState st;
  FlowState flow_state;
  const std::string ckpt_dir = cfg.out.dir + "/checkpoint";
  together("loading the checkpoint", [&] {
    make_dirs(cfg.out.dir);
    if (opt.resume) {
      load_checkpoint(ckpt_dir, cfg, parts, &st, &flow_state);
      for (auto& n : resume_config_changes(read_checkpoint_config(ckpt_dir), user_cfg)) notes.push_back(std::move(n));
    } else {
      for (auto* w : mine) w->stage().init_params(cfg.model.seed);
    }
  }, io_timeout);
  if (!flow_state.reshard.empty()) {
    std::string delays;
    for (int k = 0; k < P; ++k) delays += (k ? ", " : "") + std::to_string(stage_delay(kind, P, k, cfg.pipeline.extra_inflight));
    notes.push_back("resharded: " + flow_state.reshard + "; weights, optimizer and correction state moved by name; "
                    "delays tau_k now " + delays);
  }
  for (auto* w : mine) w->set_version(st.step);
  // (Every rank meets these alike: mpi ranks stop together.)
  const auto fail = [&](const std::string& msg) {
    if (dist) throw mpi::AgreedError(msg);
    throw Error(msg);
  };
  if (opt.resume && st.step > cfg.train.steps)
    fail(ckpt_dir + " is at step " + std::to_string(st.step) + ", beyond train.steps = " +
                std::to_string(cfg.train.steps) + " (raise train.steps to continue it)");
  if (opt.resume && opt.stop_at >= 0 && opt.stop_at <= st.step && st.step < cfg.train.steps)
    fail("--stop-at " + std::to_string(opt.stop_at) + " is not after the checkpoint's step " +
                std::to_string(st.step));
  TrainResult res;
  if (opt.resume && st.step == cfg.train.steps) {
    // Finished already: nothing to train, evaluate or write.
    res.already_finished = true;
    res.steps = st.step;
    res.checkpoint = ckpt_dir;
    return res;
  }
  std::string metrics_note;
  std::optional<MetricsLog> metrics;
  if (root) metrics.emplace(cfg.out.dir + "/metrics.jsonl", opt.resume, st.step, &metrics_note);
  const auto log = [&](const nlohmann::json& j) {
    if (metrics) metrics->write(j);
  };
  if (!metrics_note.empty()) notes.push_back(metrics_note);
  Progress progress(cfg.train.steps, cfg.train.log_every, opt.quiet || !root);
  {
    char buf[320];
    std::snprintf(buf, sizeof buf,
                  "model: %zu parameters, %d layers, d=%d, %d heads, context %d, vocab %d | data: "
                  "%zu train / %zu val tokens | %d threads",
                  n_params, cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, T,
                  cfg.model.vocab_size, data.train_file.size(), data.val_file.size(), cores);
    progress.message(buf);
    std::string products = std::string("products: fp32 GEMM ") + kernels::gemm_isa();
    if (cfg.train.bf16) products += ", bf16 " + mine.front()->stage().bf16_backend();
    progress.message(products);
    if (P > 1 || M > 1) {
      std::string blocks;
      for (int b : blocks_per_stage(cfg.model, cfg.pipeline))
        blocks += (blocks.empty() ? "" : ",") + std::to_string(b);
      std::snprintf(buf, sizeof buf,
                    "pipeline: %d stages (blocks %s), %s, %d micro-batch%s of %d per update, "
                    "engine %s (%d BLAS thread%s per stage), stash %s, recompute %s",
                    P, blocks.c_str(), cfg.pipeline.schedule.c_str(), M, M == 1 ? "" : "es", B,
                    std::string(engine_name(engine)).c_str(),
                    engine == EngineKind::Threads ? blas_threads : cores,
                    (engine == EngineKind::Threads ? blas_threads : cores) == 1 ? "" : "s",
                    cfg.pipeline.stash ? "on" : "off", cfg.pipeline.recompute ? "on" : "off");
      progress.message(buf);
    }
    if (dist) progress.message("mpi: " + std::to_string(P) + " ranks, " + mpi::implementation());
    if (!partition_note.empty()) progress.message(partition_note);
    if (opt.resume) progress.message("resumed from " + ckpt_dir + " at step " + std::to_string(st.step));
    for (const auto& n : notes) progress.message("note: " + n);
  }

  std::vector<int32_t> x(static_cast<size_t>(B) * T), y(static_cast<size_t>(B) * T);
  // From here on a signal ends the run with a checkpoint (before, during data preparation and
  // set-up, it ends the process as usual: there is nothing to save yet).
  StopSignals signals;
  const int64_t end = opt.stop_at >= 0 ? std::min(opt.stop_at, cfg.train.steps) : cfg.train.steps;
  const auto run_start = std::chrono::steady_clock::now();
  int64_t run_tokens = 0;
  int64_t last_eval_step = -1;
  double last_util = -1;
  std::vector<TraceEvent> trace;
  auto write_trace = [&] {
    if (opt.trace.empty()) return;
    if (dist) {
      // Every rank's events to rank 0 (as text: stage kind mb version start end).
      std::string text;
      for (const auto& e : trace) {
        char b[160];
        std::snprintf(b, sizeof b, "%d %c %lld %lld %.9f %.9f\n", e.stage, e.kind, static_cast<long long>(e.mb),
                      static_cast<long long>(e.version), e.start, e.end);
        text += b;
      }
      const auto all = mpi::allgather(text, peer_timeout, "gathering the trace");
      if (!root) return;
      std::vector<TraceEvent> merged;
      for (const auto& t : all) {
        std::istringstream in(t);
        TraceEvent e;
        long long mb = 0, v = 0;
        while (in >> e.stage >> e.kind >> mb >> v >> e.start >> e.end) {
          e.mb = mb;
          e.version = v;
          merged.push_back(e);
        }
      }
      write_file_atomic(opt.trace, trace_json(merged, P));
      return;
    }
    write_file_atomic(opt.trace, trace_json(trace, P));
  };
  // A run is one schedule from its drained start to train.steps, run as a Flow in windows that
  // end at cuts (evaluations, checkpoints, a stop): the pipeline pauses there with its
  // micro-batches in flight and never drains before the end, so neither evaluations nor
  // checkpoints change what is computed. A resume continues the checkpoint's flow when it paused
  // mid-flow, else starts a new schedule at the checkpoint's step. (Synchronous schedules flush
  // every update, so they run in legs of at most kSyncLeg updates, which changes nothing.)
  int64_t base_step = flow_state.mid_flow ? flow_state.base_step : st.step;
  int64_t base_pos = flow_state.mid_flow ? flow_state.base_position : st.data_position;
  bool resume_flow = flow_state.mid_flow;
  EngineOptions eo;
  eo.kind = engine;
  eo.blas_threads = blas_threads;
  eo.trace = !opt.trace.empty();
  eo.global_clip = cfg.train.clip_global;
  eo.epoch = run_start;
  const auto seconds = [](const std::vector<double>& v, double scale) {
    std::vector<double> out;
    for (double value : v) out.push_back(value * scale);
    return out;
  };
  if (P > 1) {
    eo.link_latency_s = seconds(cfg.pipeline.link_latency_ms, 1e-3);
    eo.link_bandwidth_bytes_s = seconds(cfg.pipeline.link_bandwidth_mbps, 1e6 / 8);
  }
  eo.slowdown = cfg.pipeline.stage_slowdown;
  eo.peer_timeout_s = peer_timeout;
  EngineHooks hooks;
  auto last_step_time = std::chrono::steady_clock::now();
  hooks.pause_requested = [&] { return signals.pending() != 0; };
  hooks.on_report = [&](const UpdateReport& r) {
    const int64_t step = r.step;
    const double loss = nan_guard(r.loss, step, cfg.train.clip);
    const auto now = std::chrono::steady_clock::now();
    const double dt = std::chrono::duration<double>(now - last_step_time).count();
    last_step_time = now;
    const double tps = dt > 0 ? static_cast<double>(tokens_per_update) / dt : 0.0;
    res.last_loss = loss;
    nlohmann::json j = {{"step", step}, {"tokens", step * tokens_per_update}, {"loss", loss}, {"lr", r.lr}};
    // With several stages each clips its own gradient; the last stage's norm alone would mislead.
    if (P == 1) j["grad_norm"] = r.grad_norm;
    j["tokens_per_s"] = tps;
    j["utilization"] = r.utilization;
    log(j);
    progress.step(step, loss, tps, r.lr, P > 1 ? r.utilization : -1.0);
  };
  // Several stages: per stage, since the previous such line, the updates clipped, and the learning
  // rate and momentum coefficient of the last update. Written with evaluations and checkpoints (so a resumed run
  // writes the same lines; the counts restart with the process, at a line).
  std::vector<int64_t> clipped_logged(static_cast<size_t>(P), 0);
  int64_t stage_line_step = st.step;
  auto write_stage_line = [&] {
    // (One stage: every update's line has its grad_norm.)
    if (P == 1 || st.step == stage_line_step) return;
    std::vector<double> mine_vals;
    for (auto* w : mine)
      mine_vals.insert(mine_vals.end(), {static_cast<double>(w->options().index),
                                         static_cast<double>(w->clipped_updates()),
                                         w->stage_lr(st.step - 1), w->stage_beta1()});
    const std::vector<double> all = dist ? mpi::allgather(mine_vals, peer_timeout, "stage statistics") : mine_vals;
    nlohmann::json clipped = nlohmann::json::array(), lrs = nlohmann::json::array(), betas = nlohmann::json::array();
    std::vector<std::array<double, 3>> by_stage(static_cast<size_t>(P));
    for (size_t i = 0; i + 3 < all.size(); i += 4)
      by_stage.at(static_cast<size_t>(all[i])) = {all[i + 1], all[i + 2], all[i + 3]};
    for (size_t k = 0; k < by_stage.size(); ++k) {
      const auto c = static_cast<int64_t>(by_stage[k][0]);
      clipped.push_back(c - clipped_logged[k]);
      clipped_logged[k] = c;
      lrs.push_back(by_stage[k][1]);
      betas.push_back(by_stage[k][2]);
    }
    log({{"step", st.step}, {"tokens", st.tokens}, {"stage_updates", st.step - stage_line_step}, {"stage_clipped", clipped},
         {"stage_lr", lrs}, {"stage_beta1", betas}});
    stage_line_step = st.step;
  };
  auto evaluate = [&] {
    write_stage_line();
    // Every stage holds weight version st.step now (the flow is paused at that cut); each
    // evaluates on a free slot, so in-flight micro-batches keep what they saved.
    const double vl = dist ? eval_loss_mpi(*mine.front(), P, *data.val, cfg.train.eval_batches, x, y, peer_timeout)
                           : eval_loss(ws, *data.val, cfg.train.eval_batches, x, y);
    res.val_loss = vl;
    res.val_ppl = std::exp(vl);
    last_eval_step = st.step;
    nlohmann::json j = {{"step", st.step}, {"tokens", st.tokens}, {"val_loss", vl}, {"val_ppl", res.val_ppl}};
    if (last_util >= 0) j["utilization"] = last_util;
    log(j);
    char buf[128];
    std::snprintf(buf, sizeof buf, "step %lld: val loss %.4f, val ppl %.2f",
                  static_cast<long long>(st.step), vl, res.val_ppl);
    progress.message(buf);
  };
  // Stage time and wall time since the last utilisation line (written with evaluations and at
  // the end, so that a stopped and resumed run writes the same lines as an uninterrupted one).
  RunStats since;
  int64_t since_step = st.step;
  auto write_utilization = [&](const RunStats& now) {
    if (P == 1 || st.step == since_step) return;
    const double wall = now.wall - since.wall;
    nlohmann::json busy = nlohmann::json::array(), idle = nlohmann::json::array();
    double total = 0;
    for (int k = 0; k < P; ++k) {
      const double b = now.busy[static_cast<size_t>(k)] - since.busy[static_cast<size_t>(k)];
      busy.push_back(b);
      idle.push_back(std::max(0.0, wall - b));
      total += b;
    }
    const bool measured = engine != EngineKind::Sequential;
    const double util = measured ? (wall > 0 ? total / (P * wall) : 0.0) : now.utilization;
    const int64_t updates = st.step - since_step;
    log({{"step", st.step}, {"tokens", st.tokens}, {"utilization", util}, {"bubble", 1.0 - util},
                   {"stage_busy_s", busy}, {"stage_idle_s", idle}, {"segment_updates", updates},
                   {"segment_wall_s", wall},
                   {"tokens_per_s", wall > 0 ? static_cast<double>(updates * tokens_per_update) / wall : 0.0},
                   {"utilization_kind", measured ? "measured" : "modelled"}});
    since = now;
    since_step = st.step;
  };

  bool memory_reported = false;
  for (;;) {
    int64_t sched_updates = cfg.train.steps - base_step;
    if (kind != ScheduleKind::Async1F1B) sched_updates = std::min(sched_updates, kSyncLeg);
    // mpi: each rank checks its own stage; all must agree.
    const auto fits = [&](int64_t updates) {
      bool f = flow_fits(make_schedule(kind, P, M, updates, cfg.pipeline.extra_inflight), ws, st.step - base_step);
      if (dist)
        for (double ok : mpi::allgather(std::vector<double>{f ? 1.0 : 0.0}, peer_timeout, "checking the flow"))
          f = f && ok > 0;
      return f;
    };
    if (resume_flow && !fits(sched_updates)) {
      // This train.steps would change the checkpoint's schedule before its in-flight
      // micro-batches finish: run that schedule to its end (its drain, as the run that wrote the
      // checkpoint would have ended), then start a new one.
      sched_updates = flow_state.schedule_updates;
      if (!fits(sched_updates))
        fail(ckpt_dir + ": its in-flight micro-batches do not match its own schedule (damaged flow state)");
      progress.message("note: finishing the checkpoint's schedule (to step " +
                       std::to_string(base_step + sched_updates) + ") before the pipeline refills for train.steps = " +
                       std::to_string(cfg.train.steps));
    }
    if (static_cast<double>(sched_updates) * M * P * 3 > kMaxRunActions)
      throw Error("train.steps = " + std::to_string(cfg.train.steps) + " with " + std::to_string(P) +
                  " stages is too long an async-1f1b schedule for one run (" +
                  std::to_string(static_cast<long long>(3.0 * static_cast<double>(sched_updates) * P)) +
                  " actions, at most " + std::to_string(static_cast<long long>(kMaxRunActions)) + ")");
    const Schedule sched = make_schedule(kind, P, M, sched_updates, cfg.pipeline.extra_inflight);
    validate_schedule(sched);
    for (auto* w : mine) {
      w->clear_records();
      w->set_batch_source([&data, base_pos](int64_t mb, int32_t* bx, int32_t* by) {
        data.train->batch(base_pos + mb, bx, by);
      });
    }
    Flow flow(sched, ws, eo, hooks, base_step);
    if (resume_flow) flow.resume_at(st.step, flow_state.messages);
    resume_flow = false;
    auto save = [&] {
      write_stage_line();
      FlowState fs;
      fs.base_step = base_step;
      fs.base_position = base_pos;
      fs.schedule_updates = sched_updates;
      fs.messages = flow.messages();
      if (dist) save_checkpoint_sharded(ckpt_dir, cfg, parts.front(), st, fs, io_timeout);
      else save_checkpoint(ckpt_dir, cfg, parts, st, &fs);
      res.checkpoint = ckpt_dir;
    };
    since = flow.stats();
    since_step = st.step;
    const int64_t leg_end = std::min(end, base_step + sched_updates);
    while (st.step < leg_end) {
      int64_t target = leg_end;
      for (int64_t every : {cfg.train.eval_every, cfg.train.checkpoint_every})
        if (every > 0) target = std::min(target, (st.step / every + 1) * every);
      const int64_t reached = flow.run_until(target);
      if (reached <= st.step)
        throw Error("internal error: the pipeline made no progress at step " + std::to_string(st.step));
      const int64_t done = reached - st.step;
      st.step = reached;
      st.data_position = base_pos + (reached - base_step) * M;
      st.tokens += done * tokens_per_update;
      run_tokens += done * tokens_per_update;
      const RunStats now = flow.stats();
      last_util = now.utilization;
      if (!memory_reported) {
        // After the first window: the stashes hold what the flow needs (tau_k versions once it
        // has run 2 tau_k updates).
        memory_reported = true;
        nlohmann::json mem = nlohmann::json::array();
        for (auto* w : mine) {
          const StageMemory m = w->memory();
          mem.push_back({{"stage", w->options().index}, {"weights", m.weights},
                         {"weight_versions", m.weight_versions}, {"gradients", m.gradients},
                         {"optimizer", m.optimizer}, {"activations", m.activations},
                         {"total", m.total()}});
        }
        if (dist) {  // every rank's stage, to rank 0
          nlohmann::json all = nlohmann::json::array();
          for (const auto& t : mpi::allgather(mem.dump(), peer_timeout, "memory report"))
            for (const auto& e : nlohmann::json::parse(t)) all.push_back(e);
          mem = all;
        }
        std::string line = "memory per stage (weights + versions + grads + optimizer + activations):";
        for (const auto& e : mem) line += " " + format_bytes(e["total"].get<double>());
        if (root) write_file_atomic(cfg.out.dir + "/memory.json", nlohmann::json{{"stages", mem}}.dump(2) + "\n");
        if (P > 1) progress.message(line);
      }
      const bool eval_due = cfg.train.eval_every > 0 && st.step % cfg.train.eval_every == 0;
      if (eval_due || st.step == cfg.train.steps) write_utilization(now);
      if (eval_due) evaluate();
      const bool periodic = cfg.train.checkpoint_every > 0 && st.step % cfg.train.checkpoint_every == 0;
      if (periodic && st.step < end) save();
      // (A signal that came too late to stop the run before its end lets it finish normally.)
      // mpi: rank 0's signal decides for every rank.
      int signal = signals.pending();
      if (dist) signal = std::stoi(mpi::broadcast(std::to_string(signal), 0, peer_timeout, "stop decision"));
      if (signal && st.step < cfg.train.steps) {
        progress.finish();
        save();
        const auto ev = flow.stats().events;
        trace.insert(trace.end(), ev.begin(), ev.end());
        write_trace();
        const std::string msg = "interrupted by signal " + std::to_string(signal) + " at step " +
                                std::to_string(st.step) + "; checkpoint saved to " + ckpt_dir +
                                " (continue with --resume)";
        if (dist) throw mpi::AgreedError(msg);
        throw Error(msg);
      }
    }
    const auto ev = flow.stats().events;
    trace.insert(trace.end(), ev.begin(), ev.end());
    if (st.step >= end) {
      progress.finish();
      // A finished run always ends with an evaluation; one stopped early (stop_at) leaves the
      // metrics exactly as an uninterrupted run has them at that step.
      if (cfg.train.eval_every > 0 && st.step == cfg.train.steps && last_eval_step != st.step) evaluate();
      save();
      break;
    }
    // This leg's schedule ended (drained); the next one starts here.
    base_step = st.step;
    base_pos = st.data_position;
  }
  write_trace();
  const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
  res.steps = st.step;
  res.tokens_per_s = el > 0 ? static_cast<double>(run_tokens) / el : 0.0;
  res.utilization = last_util;
  return res;
}

EvalResult evaluate_checkpoint(const std::string& checkpoint_dir, const Config& cfg, int batches) {
  omp_set_num_threads(thread_count(cfg.train));
  Data data = load_data(cfg);
  Stage stage(cfg.model, 0, cfg.model.n_layer + 2, cfg.train.batch_size, 1);
  stage.set_bf16(cfg.train.bf16);
  load_weights(checkpoint_dir, cfg, stage);
  require_finite_weights(checkpoint_dir, stage);
  std::vector<int32_t> x(stage.boundary_floats() / static_cast<size_t>(cfg.model.n_embd));
  std::vector<int32_t> y(x.size());
  EvalResult r;
  r.loss = eval_loss({{&stage, 0}}, *data.val, batches, x, y);
  if (!std::isfinite(r.loss))
    throw Error(checkpoint_dir + ": the validation loss is " + std::to_string(r.loss) +
                " (the weights are finite but the model overflows on this data)");
  r.ppl = std::exp(r.loss);
  r.tokens = static_cast<int64_t>(batches) * static_cast<int64_t>(x.size());
  return r;
}

}  // namespace pipenag
