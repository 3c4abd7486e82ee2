#include "train/trainer.h"

#include <omp.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "data/loader.h"
#include "data/prepare.h"
#include "data/token_file.h"
#include "data/tokenizer.h"
#include "io/atomic_file.h"
#include "model/units.h"
#include "optim/adamw.h"
#include "optim/grad_clip.h"
#include "optim/lr_schedule.h"
#include "pipeline/stage.h"
#include "train/checkpoint.h"
#include "train/progress.h"
#include "util/error.h"

namespace pipenag {
namespace fs = std::filesystem;

namespace {

std::atomic<int> g_stop_signal{0};
extern "C" void on_stop_signal(int sig) { g_stop_signal.store(sig); }

// Installs SIGINT/SIGTERM handlers for the duration of a training run: the loop finishes the
// step in progress, writes a checkpoint and stops, so nothing is lost on Ctrl-C or a kill.
class StopSignals {
 public:
  StopSignals() {
    g_stop_signal.store(0);
    old_int_ = std::signal(SIGINT, on_stop_signal);
    old_term_ = std::signal(SIGTERM, on_stop_signal);
  }
  ~StopSignals() {
    std::signal(SIGINT, old_int_);
    std::signal(SIGTERM, old_term_);
  }
  int pending() const { return g_stop_signal.load(); }

 private:
  void (*old_int_)(int) = SIG_DFL;
  void (*old_term_)(int) = SIG_DFL;
};

int thread_count(const TrainConfig& t) {
  if (t.threads > 0) return t.threads;
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
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
  MetricsLog(const std::string& path, bool resume, int64_t resume_step) : path_(path) {
    std::string kept;
    if (resume && fs::exists(path)) {
      // Keep only the history up to the checkpoint we continue from.
      std::istringstream in(read_file(path));
      std::string line;
      while (std::getline(in, line)) {
        try {
          const auto j = nlohmann::json::parse(line);
          if (j.value("step", int64_t{0}) <= resume_step) kept += line + "\n";
        } catch (const nlohmann::json::exception&) {
          break;  // a torn last line from a crash
        }
      }
    }
    write_file_atomic(path, kept);
    f_ = std::fopen(path.c_str(), "ab");
    if (!f_) throw Error(path + ": cannot open for appending");
  }
  ~MetricsLog() {
    if (f_) std::fclose(f_);
  }
  void write(const nlohmann::json& j) {
    const std::string s = j.dump() + "\n";
    if (std::fwrite(s.data(), 1, s.size(), f_) != s.size() || std::fflush(f_) != 0)
      throw Error(path_ + ": write failed");
  }

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

double nan_guard(double loss, int64_t step) {
  if (!std::isfinite(loss))
    throw Error("training diverged: loss is " + std::to_string(loss) + " at step " +
                std::to_string(step) + " (lower train.lr or enable train.clip)");
  return loss;
}

struct Data {
  std::string dir;  // folder with train.bin, val.bin, meta.json
  TokenFile train_file, val_file;
  std::unique_ptr<TokenLoader> train, val;
};

Data load_data(const Config& cfg) {
  Data d;
  d.dir = prepared_data_dir(cfg);
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

double eval_loss(Stage& stage, const TokenLoader& val, int batches, std::vector<int32_t>& x,
                 std::vector<int32_t>& y) {
  double sum = 0.0;
  int64_t count = 0;
  for (int i = 0; i < batches; ++i) {
    val.batch(i, x.data(), y.data());
    UnitContext ctx;
    ctx.training = false;
    stage.forward(0, nullptr, MicroBatch{x.data(), y.data()}, ctx);
    sum += ctx.loss_sum;
    count += ctx.loss_count;
  }
  return count ? sum / static_cast<double>(count) : 0.0;
}

}  // namespace

std::string prepared_data_dir(const Config& cfg) {
  if (!cfg.data.dir.empty()) return cfg.data.dir;
  if (cfg.data.input.empty()) throw Error("data.input or data.dir must be set");
  // data.input is tokenised once into <out.dir>/data and reused while input, tokenizer and
  // split settings stay the same.
  const std::string dir = cfg.out.dir + "/data";
  const auto tok = load_tokenizer(cfg.data.tokenizer);
  if (std::filesystem::exists(dir + "/meta.json") && std::filesystem::exists(dir + "/train.bin") &&
      std::filesystem::exists(dir + "/val.bin")) {
    try {
      const nlohmann::json m = read_meta(dir);
      if (m.value("input", "") == cfg.data.input && m.value("tokenizer", "") == tok->name() &&
          m.value("val_fraction", -1.0) == cfg.data.val_fraction &&
          m.value("split_seed", uint64_t{1} << 63) == cfg.data.split_seed)
        return dir;
    } catch (const Error&) {
      // A damaged meta.json is rebuilt below.
    }
  }
  prepare_corpus(cfg.data.input, *tok, dir, cfg.data.val_fraction, cfg.data.split_seed);
  return dir;
}

std::string tokenizer_spec(const Config& cfg) {
  if (cfg.data.dir.empty()) return cfg.data.tokenizer;
  const nlohmann::json m = read_meta(cfg.data.dir);
  if (!m.contains("tokenizer") || !m["tokenizer"].is_string())
    throw Error(cfg.data.dir + "/meta.json: no tokenizer field");
  return m["tokenizer"].get<std::string>();
}

TrainResult train(const Config& cfg, const TrainOptions& opt) {
  omp_set_num_threads(thread_count(cfg.train));
  const int B = cfg.train.batch_size, T = cfg.model.block_size;
  Data data = load_data(cfg);

  const int n_units = cfg.model.n_layer + 2;
  Stage stage(cfg.model, 0, n_units, B, 1);
  stage.set_bf16(cfg.train.bf16);
  AdamWHyper hyper{cfg.train.beta1, cfg.train.beta2, cfg.train.eps, cfg.train.weight_decay};
  AdamW adamw(stage.num_params(), hyper);
  TrainState st;
  make_dirs(cfg.out.dir);
  const std::string ckpt_dir = cfg.out.dir + "/checkpoint";
  if (opt.resume) {
    load_checkpoint(ckpt_dir, cfg, stage, &adamw, &st);
  } else {
    stage.init_params(cfg.model.seed);
  }
  MetricsLog metrics(cfg.out.dir + "/metrics.jsonl", opt.resume, st.step);
  Progress progress(cfg.train.steps, cfg.train.log_every, opt.quiet);
  {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "model: %zu parameters, %d layers, d=%d, %d heads, context %d, vocab %d | data: "
                  "%zu train / %zu val tokens | %d threads",
                  stage.num_params(), cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, T,
                  cfg.model.vocab_size, data.train_file.size(), data.val_file.size(),
                  omp_get_max_threads());
    progress.message(buf);
    if (opt.resume) progress.message("resumed from " + ckpt_dir + " at step " + std::to_string(st.step));
  }

  std::vector<int32_t> x(static_cast<size_t>(B) * T), y(static_cast<size_t>(B) * T);
  const float grad_scale = 1.0f / static_cast<float>(static_cast<size_t>(B) * T);
  TrainResult res;
  StopSignals signals;
  const int64_t end = opt.stop_at >= 0 ? std::min(opt.stop_at, cfg.train.steps) : cfg.train.steps;
  const auto run_start = std::chrono::steady_clock::now();
  int64_t run_tokens = 0;
  int64_t last_eval_step = -1;
  auto save = [&] {
    save_checkpoint(ckpt_dir, cfg, stage, &adamw, st);
    res.checkpoint = ckpt_dir;
  };
  auto evaluate = [&] {
    const double vl = eval_loss(stage, *data.val, cfg.train.eval_batches, x, y);
    res.val_loss = vl;
    res.val_ppl = std::exp(vl);
    last_eval_step = st.step;
    metrics.write({{"step", st.step}, {"tokens", st.tokens}, {"val_loss", vl}, {"val_ppl", res.val_ppl}});
    char buf[128];
    std::snprintf(buf, sizeof buf, "step %lld: val loss %.4f, val ppl %.2f",
                  static_cast<long long>(st.step), vl, res.val_ppl);
    progress.message(buf);
  };

  while (st.step < end) {
    const auto t0 = std::chrono::steady_clock::now();
    data.train->batch(st.data_position, x.data(), y.data());
    stage.zero_grads();
    UnitContext ctx;
    ctx.training = true;
    ctx.grad_scale = grad_scale;
    const MicroBatch mb{x.data(), y.data()};
    stage.forward(0, nullptr, mb, ctx);
    stage.backward(0, nullptr, mb, ctx);
    const double loss = nan_guard(ctx.loss_sum / static_cast<double>(ctx.loss_count), st.step);
    const double norm = std::sqrt(sum_squares(stage.grads(), stage.num_params()));
    const double lr = lr_at(st.step, cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps,
                            cfg.train.min_lr_ratio);
    adamw.step(stage.params(), stage.grads(), lr, clip_scale(norm, cfg.train.clip));
    st.step += 1;
    st.data_position += 1;
    st.tokens += static_cast<int64_t>(B) * T;
    run_tokens += static_cast<int64_t>(B) * T;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tps = static_cast<double>(B) * T / dt;
    res.last_loss = loss;
    metrics.write({{"step", st.step}, {"tokens", st.tokens}, {"loss", loss}, {"lr", lr},
                   {"grad_norm", norm}, {"tokens_per_s", tps}});
    progress.step(st.step, loss, tps, lr);

    if (cfg.train.eval_every > 0 && st.step % cfg.train.eval_every == 0) evaluate();
    const bool periodic = cfg.train.checkpoint_every > 0 && st.step % cfg.train.checkpoint_every == 0;
    if (periodic && st.step < end) save();
    if (signals.pending()) {
      progress.finish();
      save();
      throw Error("interrupted by signal " + std::to_string(signals.pending()) + " at step " +
                  std::to_string(st.step) + "; checkpoint saved to " + ckpt_dir +
                  " (continue with --resume)");
    }
  }
  progress.finish();
  // A finished run always ends with an evaluation; one stopped early (stop_at) leaves the
  // metrics exactly as an uninterrupted run has them at that step.
  if (cfg.train.eval_every > 0 && st.step == cfg.train.steps && last_eval_step != st.step)
    evaluate();
  save();
  const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
  res.steps = st.step;
  res.tokens_per_s = el > 0 ? static_cast<double>(run_tokens) / el : 0.0;
  return res;
}

EvalResult evaluate_checkpoint(const std::string& checkpoint_dir, const Config& cfg, int batches) {
  omp_set_num_threads(thread_count(cfg.train));
  Data data = load_data(cfg);
  Stage stage(cfg.model, 0, cfg.model.n_layer + 2, cfg.train.batch_size, 1);
  stage.set_bf16(cfg.train.bf16);
  load_checkpoint(checkpoint_dir, cfg, stage, nullptr, nullptr);
  std::vector<int32_t> x(stage.boundary_floats() / static_cast<size_t>(cfg.model.n_embd));
  std::vector<int32_t> y(x.size());
  EvalResult r;
  r.loss = eval_loss(stage, *data.val, batches, x, y);
  r.ppl = std::exp(r.loss);
  r.tokens = static_cast<int64_t>(batches) * static_cast<int64_t>(x.size());
  return r;
}

}  // namespace pipenag
