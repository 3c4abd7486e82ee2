// pipenag: the command-line front end. Parses, dispatches, and turns every failure into one
// line on stderr and a non-zero exit status.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <iostream>
#include <cerrno>
#include <climits>
#include <csignal>
#include <cmath>
#include <filesystem>
#include <cstdint>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "data/prepare.h"
#include "data/text_corpus.h"
#include "data/tokenizer.h"
#include "io/atomic_file.h"
#include "kernels/kernels.h"
#include "kernels/matmul_bf16.h"
#include "lab/delaylab.h"
#include "model/units.h"
#include "pipeline/schedule.h"
#include "pipeline/timeline_svg.h"
#include "comm/mpi.h"
#include "train/bench.h"
#include "train/checkpoint.h"
#include "train/config_file.h"
#include "study/study.h"
#include "train/methods.h"
#include "train/sample.h"
#include "train/trainer.h"
#include "util/error.h"

using namespace pipenag;

namespace {

constexpr int kMaxEvalBatches = 1'000'000;
constexpr int kMaxScheduleStages = 1024;
constexpr int kMaxScheduleMicrobatches = 65536;
constexpr double kMaxScheduleActions = 1e6;

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t b = 0;
  while (b <= s.size()) {
    const size_t e = s.find(',', b);
    out.push_back(s.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) break;
    b = e + 1;
  }
  return out;
}

int parse_int(const std::string& s, const std::string& what) {
  try {
    size_t pos = 0;
    const int v = std::stoi(s, &pos);
    if (pos != s.size()) throw std::invalid_argument(s);
    return v;
  } catch (const std::exception&) {
    throw Error(what + ": '" + s + "' is not an integer");
  }
}

std::string read_stdin() {
  std::ostringstream ss;
  ss << std::cin.rdbuf();
  return ss.str();
}

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  std::istringstream in(text);
  std::string word;
  while (in >> word) {
    try {
      size_t pos = 0;
      const long long v = std::stoll(word, &pos);
      if (pos != word.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(word);
      ids.push_back(static_cast<int32_t>(v));
    } catch (const std::exception&) {
      throw Error("decode: '" + word + "' is not a token id (expected non-negative integers)");
    }
  }
  return ids;
}

// PIPENAG_ISA (the fp32 GEMM's instruction set) and PIPENAG_BF16 (the bf16 backend) are read
// once, here: a word that names nothing fails at once with one line; a set this CPU lacks falls
// back to what it has, with a note on stderr.
void check_kernel_environment() {
  if (const char* isa = std::getenv("PIPENAG_ISA")) {
    try {
      const std::string note = kernels::set_gemm_isa(isa);
      if (!note.empty()) std::fprintf(stderr, "pipenag: note: %s\n", note.c_str());
    } catch (const std::invalid_argument& e) {
      throw Error(e.what());
    }
  }
  if (const char* b = std::getenv("PIPENAG_BF16")) {
    const std::string want = b;
    if (!want.empty() && want != "auto" && want != "avx512bf16" && want != "onednn" && want != "emulated")
      throw Error("unknown bf16 backend '" + want + "' in PIPENAG_BF16 (auto | avx512bf16 | onednn | emulated)");
    std::string note;
    kernels::Bf16Linear::bf16_backend(&note);
    if (!note.empty()) std::fprintf(stderr, "pipenag: note: %s\n", note.c_str());
  }
}

// A non-negative finite number, or Error naming the option.
double parse_number(const std::string& text, const std::string& what) {
  try {
    size_t pos = 0;
    const double v = std::stod(text, &pos);
    if (pos != text.size() || !std::isfinite(v) || v < 0) throw std::invalid_argument(text);
    return v;
  } catch (const std::exception&) {
    throw Error(what + ": '" + text + "' is not a number >= 0");
  }
}

std::vector<double> parse_numbers(const std::string& list, const std::string& what, double scale) {
  std::vector<double> out;
  for (const auto& item : split_commas(list)) out.push_back(scale * parse_number(item, what));
  return out;
}

// `pipenag schedule --stage-costs ...`: the schedule's timeline with those costs and links, as
// throughput and utilisation (what a deployment would get, before buying it).
std::string predict_text(const Schedule& s, const std::string& costs, const std::string& latency,
                         const std::string& bandwidth, double message_mb) {
  const size_t P = static_cast<size_t>(s.stages);
  std::vector<double> f, b, st;
  for (const auto& item : split_commas(costs)) {
    std::vector<std::string> parts;
    size_t at = 0;
    for (;;) {
      const size_t c = item.find(':', at);
      parts.push_back(item.substr(at, c == std::string::npos ? std::string::npos : c - at));
      if (c == std::string::npos) break;
      at = c + 1;
    }
    if (parts.size() < 2 || parts.size() > 3)
      throw Error("--stage-costs: '" + item + "' is not forward:backward[:step] (milliseconds)");
    f.push_back(1e-3 * parse_number(parts[0], "--stage-costs"));
    b.push_back(1e-3 * parse_number(parts[1], "--stage-costs"));
    st.push_back(parts.size() == 3 ? 1e-3 * parse_number(parts[2], "--stage-costs") : 0.0);
  }
  if (f.size() == 1) {
    f.assign(P, f[0]);
    b.assign(P, b[0]);
    st.assign(P, st[0]);
  }
  if (f.size() != P)
    throw Error("--stage-costs has " + std::to_string(f.size()) + " entries for " + std::to_string(P) + " stages");
  if (!std::isfinite(message_mb) || message_mb < 0) throw Error("--message-mb must be a number >= 0");
  Links links;
  links.latency_s = parse_numbers(latency, "--link-latency-ms", 1e-3);
  links.bandwidth_bytes_s = parse_numbers(bandwidth, "--link-bandwidth-mbps", 1e6 / 8);
  links.message_bytes = message_mb * 1e6;
  for (const auto* v : {&links.latency_s, &links.bandwidth_bytes_s})
    if (v->size() != 1 && v->size() + 1 != P)
      throw Error("a link option has " + std::to_string(v->size()) + " values for " + std::to_string(P - 1) +
                  " stage boundaries (give one, or one per boundary)");
  const Timeline t = simulate(s, f, b, st, links);
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "\nprediction: %lld updates in %.3f s = %.2f updates/s, %.2f micro-batches/s, utilisation %.1f%%\n",
                static_cast<long long>(s.updates), t.makespan, t.makespan > 0 ? s.updates / t.makespan : 0.0,
                t.makespan > 0 ? static_cast<double>(s.num_microbatches()) / t.makespan : 0.0, 100.0 * t.utilization());
  return buf;
}

void print_bench_table(const std::vector<BenchResult>& rs, const BenchOptions& o) {
  std::printf("pipenag bench: %d layers, d=%d, %d heads, context %d, batch %d, %d threads, %d steps after %d warm-up\n",
              o.model.n_layer, o.model.n_embd, o.model.n_head, o.model.block_size, o.batch_size,
              o.threads, o.steps, o.warmup);
  std::printf("peak FP32 FMA rate measured now: %.1f GFLOP/s\n\n", rs.empty() ? 0.0 : rs[0].peak_gflops);
  std::printf("| vocab | dtype | products | params | tokens/s (mean) | tokens/s (median) | GFLOP/s | MFU |\n");
  std::printf("|------:|:-----:|:---------|-------:|----------------:|------------------:|--------:|----:|\n");
  for (const auto& r : rs)
    std::printf("| %d | %s | %s | %.2fM | %.0f | %.0f | %.1f | %.1f%% |\n", r.vocab, r.dtype.c_str(),
                r.kernels.c_str(), static_cast<double>(r.params) / 1e6, r.tokens_per_s,
                r.tokens_per_s_median, r.gflops, 100.0 * r.mfu);
  for (const auto& r : rs) {
    if (r.profile_names.empty()) continue;
    double step = 0;
    for (double t : r.profile_seconds) step += t;
    std::printf("\nwhere the time goes, vocab %d, %s (ms per step, share):\n", r.vocab, r.dtype.c_str());
    std::printf("| work | ms | share |\n|:-----|---:|------:|\n");
    for (size_t i = 0; i < r.profile_names.size(); ++i)
      std::printf("| %s | %.1f | %.1f%% |\n", r.profile_names[i].c_str(), 1e3 * r.profile_seconds[i],
                  100.0 * r.profile_seconds[i] / step);
  }
}

}  // namespace

// A failure on one rank of an mpi run: the others may be waiting for it, so the job is aborted
// (they stop at once instead of after pipeline.peer_timeout_s).
int end_mpi_on_failure(int code) {
  if (mpi::initialized()) {
    std::fflush(stderr);
    mpi::abort(code);
  }
  return code;
}

int main(int argc, char** argv) {
  // An mpi run ends MPI on every normal return (after an abort nothing returns).
  struct EndMpi {
    ~EndMpi() { mpi::finalize(); }
  } end_mpi;
  CLI::App app{"pipenag: pipeline-parallel GPT training on CPUs, with the Nesterov method for "
               "asynchronous pipelines"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "pipenag 0.1.0");

  // train
  auto* train_cmd = app.add_subcommand("train", "Train a model from a TOML config (keys listed below)");
  std::string config_path;
  std::vector<std::string> overrides;
  TrainOptions topt;
  train_cmd->add_option("--config,-c", config_path, "TOML configuration file")->check(CLI::ExistingFile);
  train_cmd->add_option("--set", overrides, "Override a config key: section.key=value (repeatable)");
  train_cmd->add_flag("--resume", topt.resume, "Continue from <out.dir>/checkpoint");
  train_cmd->add_flag("--force", topt.force, "Start over in an out.dir that holds an earlier run, deleting its checkpoint and metrics");
  train_cmd->add_option("--stop-at", topt.stop_at, "Stop with a checkpoint after this many updates");
  train_cmd->add_flag("--quiet,-q", topt.quiet, "No progress output");
  train_cmd->add_option("--trace", topt.trace, "Write a Chrome trace-event JSON of every stage's forwards, backwards, steps and waits (Perfetto, chrome://tracing)");
  train_cmd->footer("Configuration keys (file sections or --set section.key=value):\n" +
                describe_config_keys());

  // eval
  auto* eval = app.add_subcommand("eval", "Validation loss and perplexity of a checkpoint");
  std::string eval_ckpt;
  int eval_batches = -1;
  std::vector<std::string> eval_overrides;
  eval->add_option("--checkpoint", eval_ckpt, "Checkpoint folder")->required();
  eval->add_option("--batches", eval_batches, "Validation batches, spread over the split; 0: all of it (default: train.eval_batches)");
  eval->add_option("--set", eval_overrides, "Override a key of the checkpoint's config (e.g. data.input=...)");

  // sample
  auto* sample = app.add_subcommand("sample", "Generate text from a checkpoint");
  std::string sample_ckpt;
  SampleOptions sopt;
  sample->add_option("--checkpoint", sample_ckpt, "Checkpoint folder")->required();
  sample->add_option("--prompt", sopt.prompt, "Text to continue");
  sample->add_option("--tokens", sopt.max_new_tokens, "Tokens to generate")->capture_default_str();
  sample->add_option("--temperature", sopt.temperature, "Sampling temperature (0: greedy)")->capture_default_str();
  sample->add_option("--top-k", sopt.top_k, "Sample among the k most likely tokens (0: all)")->capture_default_str();
  sample->add_option("--seed", sopt.seed, "Random seed")->capture_default_str();

  // prepare
  auto* prepare = app.add_subcommand("prepare", "Tokenise a corpus into train.bin / val.bin / meta.json");
  std::string prep_tok = "byte", prep_input, prep_out;
  double prep_val = 0.1;
  uint64_t prep_seed = 0;
  prepare->add_option("--tokenizer", prep_tok, "byte | gpt2 | tokenizer folder or tokenizer.json")->capture_default_str();
  prepare->add_option("--input", prep_input, "Text file or folder of .txt files (one file = one document)")->required();
  prepare->add_option("--out", prep_out, "Output folder")->required();
  prepare->add_option("--val-fraction", prep_val, "Fraction of documents held out")->capture_default_str();
  prepare->add_option("--split-seed", prep_seed, "Seed of the document split")->capture_default_str();

  // tokenizer
  auto* tokcmd = app.add_subcommand("tokenizer", "Encode, decode, or train a byte-level BPE tokenizer");
  tokcmd->require_subcommand(1);
  std::string tok_spec = "gpt2";
  auto* tok_encode = tokcmd->add_subcommand("encode", "stdin text -> token ids, space-separated, one line");
  tok_encode->add_option("--tokenizer", tok_spec, "byte | gpt2 | tokenizer folder or tokenizer.json")->capture_default_str();
  auto* tok_decode = tokcmd->add_subcommand("decode", "stdin token ids -> text");
  tok_decode->add_option("--tokenizer", tok_spec, "byte | gpt2 | tokenizer folder or tokenizer.json")->capture_default_str();
  auto* tok_train = tokcmd->add_subcommand("train", "Learn a byte-level BPE (GPT-2 pre-tokenisation, GPT-2 file format)");
  int tok_vocab = 4096;
  std::string tok_input, tok_out;
  tok_train->add_option("--vocab-size", tok_vocab, "Vocabulary size (256 bytes + merges + <|endoftext|>)")->capture_default_str();
  tok_train->add_option("--input", tok_input, "Text file or folder of .txt files")->required();
  tok_train->add_option("--out", tok_out, "Folder for encoder.json and vocab.bpe")->required();

  // schedule
  auto* sched_cmd = app.add_subcommand("schedule", "Print a pipeline schedule: per-stage actions, delays and timeline");
  int sched_stages = 4, sched_mb = 4, sched_extra = 0;
  int64_t sched_updates = 0;
  std::string sched_kind = "async-1f1b", sched_svg;
  sched_cmd->add_option("--stages", sched_stages, "Pipeline stages P")->capture_default_str();
  sched_cmd->add_option("--kind", sched_kind, "gpipe | 1f1b | async-1f1b")->capture_default_str();
  sched_cmd->add_option("--microbatches", sched_mb, "Micro-batches per update (gpipe, 1f1b)")->capture_default_str();
  sched_cmd->add_option("--updates", sched_updates, "Updates to lay out (default: 2 for gpipe/1f1b, 2P for async-1f1b)");
  sched_cmd->add_option("--extra-inflight", sched_extra, "async-1f1b: E more micro-batches in flight per stage (pipeline.extra_inflight)")->capture_default_str();
  sched_cmd->add_option("--svg", sched_svg, "Also draw the timeline as an SVG picture here");
  std::string sched_costs, sched_latency = "0", sched_bandwidth = "0";
  double sched_message_mb = 0;
  sched_cmd->add_option("--stage-costs", sched_costs, "Predict: forward:backward[:step] ms per micro-batch, one for all stages or one per stage, comma-separated (e.g. 120:240,130:260)");
  sched_cmd->add_option("--link-latency-ms", sched_latency, "Predict: link latency in ms, one value or one per stage boundary")->capture_default_str();
  sched_cmd->add_option("--link-bandwidth-mbps", sched_bandwidth, "Predict: link bandwidth in Mbit/s, one value or one per boundary (0: infinite)")->capture_default_str();
  sched_cmd->add_option("--message-mb", sched_message_mb, "Predict: megabytes per message (one activation: 4 x batch x context x width bytes)")->capture_default_str();

  // trace
  auto* trace_cmd = app.add_subcommand("trace", "Draw a trace written by `train --trace` as an SVG timeline, with per-stage utilisation");
  std::string trace_in, trace_svg;
  double trace_from = 0, trace_to = -1;
  trace_cmd->add_option("trace", trace_in, "Trace JSON file")->required();
  trace_cmd->add_option("--svg", trace_svg, "Output SVG file")->required();
  trace_cmd->add_option("--from", trace_from, "Start of the window, seconds")->capture_default_str();
  trace_cmd->add_option("--to", trace_to, "End of the window, seconds (default: the end)");
  int trace_skip = 0;
  trace_cmd->add_option("--skip-updates", trace_skip, "Steady state: drop the first and last K updates of the last stage (pipeline fill and drain)");

  // bench
  auto* bench = app.add_subcommand("bench", "Speed of one training step: tokens/s, GFLOP/s, MFU");
  BenchOptions bopt;
  std::string vocabs = "65,50304", dtypes = "fp32";
  bench->add_option("--vocab", vocabs, "Comma-separated vocabulary sizes")->capture_default_str();
  bench->add_option("--dtype", dtypes, "Comma-separated: fp32, bf16")->capture_default_str();
  bench->add_option("--steps", bopt.steps, "Measured steps")->capture_default_str();
  bench->add_option("--warmup", bopt.warmup, "Unmeasured steps first")->capture_default_str();
  bench->add_option("--threads", bopt.threads, "Threads")->capture_default_str();
  bench->add_option("--batch-size", bopt.batch_size, "Sequences per step")->capture_default_str();
  bench->add_option("--n-layer", bopt.model.n_layer)->capture_default_str();
  bench->add_option("--n-embd", bopt.model.n_embd)->capture_default_str();
  bench->add_option("--n-head", bopt.model.n_head)->capture_default_str();
  bench->add_option("--block-size", bopt.model.block_size)->capture_default_str();
  bench->add_flag("--json", bopt.json, "One JSON object per configuration, nothing else");
  bench->add_flag("--profile", bopt.profile, "Also time each kind of work (GEMMs, attention, layernorm, ..., optimizer) per step");

  // methods
  // study
  study::Options study_opt;
  auto* study_cmd = app.add_subcommand(
      "study", "Run a grid of methods x learning rates x seeds (x pipeline depths), each an ordinary resumable run, "
               "and write DIR/report (results.csv, summary.md, plots)");
  study_cmd->add_option("-c,--config", study_opt.config, "Study file: a training config plus a [study] table")
      ->required()
      ->check(CLI::ExistingFile);
  study_cmd->add_option("--out", study_opt.out_dir, "Study folder (runs, results, report); rerun to continue")
      ->required();
  study_cmd->add_option("--jobs", study_opt.jobs, "Runs at once, one core each (default: study.jobs)");
  study_cmd->add_flag("-q,--quiet", study_opt.quiet, "No progress or summary output");
  auto* methods_cmd = app.add_subcommand("methods", "List the method presets (method = \"<name>\" or --set method=<name>) and what each sets");

  // delaylab
  auto* delaylab = app.add_subcommand("delaylab", "Delayed-gradient convex testbed: GD, heavy ball, NAG and Eq. 10 with a fixed gradient delay (table, CSV, PNG)");
  lab::DelayLabOptions dlopt;
  std::string dl_taus = "0,1,2,4,8";
  delaylab->add_option("--problem", dlopt.problem, "quadratic | logistic | both")->capture_default_str();
  delaylab->add_option("--taus", dl_taus, "Comma-separated gradient delays")->capture_default_str();
  delaylab->add_option("--iters", dlopt.iters, "Iteration budget per run")->capture_default_str();
  delaylab->add_option("--eta-scale", dlopt.eta_scale, "Step size eta = scale / L")->capture_default_str();
  delaylab->add_option("--gamma", dlopt.gamma, "Constant momentum gamma")->capture_default_str();
  delaylab->add_flag("--gamma-theory", dlopt.gamma_theory, "Use gamma_t = max(0, (t-2)/t) instead of --gamma");
  delaylab->add_option("--out", dlopt.out_dir, "Output folder: curves.csv, table.md, delaylab.gp, delaylab.png")->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  try {
    check_kernel_environment();
    if (*train_cmd) {
      if (train_cmd->count("--stop-at") && topt.stop_at < 0)
        throw Error("--stop-at must be >= 0, got " + std::to_string(topt.stop_at));
      // A reader of the output that goes away (`| head`) must not kill a training run or its
      // final line: writes fail with EPIPE instead, and the run goes on.
      std::signal(SIGPIPE, SIG_IGN);
      const Config cfg = load_config(config_path, overrides);
      const TrainResult r = train(cfg, topt);
      if (mpi::rank() != 0) return 0;  // rank 0 reports for the whole pipeline
      if (r.already_finished) {
        std::printf("done: the run in %s had already reached train.steps = %lld; nothing to do "
                    "(raise train.steps to continue it) | checkpoint %s\n",
                    cfg.out.dir.c_str(), static_cast<long long>(r.steps), r.checkpoint.c_str());
        return 0;
      }
      std::printf("done: %lld steps | train loss %.4f", static_cast<long long>(r.steps), r.last_loss);
      if (r.val_loss >= 0) std::printf(" | val loss %.4f | val ppl %.2f", r.val_loss, r.val_ppl);
      std::printf(" | %.0f tok/s overall | checkpoint %s\n", r.tokens_per_s, r.checkpoint.c_str());
    } else if (*eval) {
      Config cfg = read_checkpoint_config(eval_ckpt);
      for (const auto& o : eval_overrides) apply_override(cfg, o);
      validate(cfg);
      if (eval->count("--batches") && (eval_batches < 0 || eval_batches > kMaxEvalBatches))
        throw Error("--batches must be between 0 (the whole split) and " + std::to_string(kMaxEvalBatches) + ", got " +
                    std::to_string(eval_batches));
      const EvalResult r = evaluate_checkpoint(eval_ckpt, cfg, eval->count("--batches") ? eval_batches : cfg.train.eval_batches);
      std::printf("val loss %.4f | val ppl %.2f | %lld tokens\n", r.loss, r.ppl, static_cast<long long>(r.tokens));
    } else if (*sample) {
      // Streamed token by token: a reader that stops (`| head`) ends the sampling quietly.
      std::signal(SIGPIPE, SIG_IGN);
      sample_stream(sample_ckpt, sopt, [](const std::string& piece) {
        return std::fwrite(piece.data(), 1, piece.size(), stdout) == piece.size() && std::fflush(stdout) == 0;
      });
      if (std::printf("\n") < 0 && errno == EPIPE) return 0;
    } else if (*prepare) {
      const auto tok = load_tokenizer(prep_tok);
      const PrepareStats st = prepare_corpus(prep_input, *tok, prep_out, prep_val, prep_seed);
      std::printf("prepared %s with %s (vocab %d): %zu documents | train %zu documents, %zu tokens | "
                  "val %zu documents, %zu tokens | %s\n",
                  prep_input.c_str(), st.tokenizer.c_str(), st.vocab_size, st.documents, st.train_docs,
                  st.train_tokens, st.val_docs, st.val_tokens, st.meta_path.c_str());
    } else if (*tok_encode) {
      const auto tok = load_tokenizer(tok_spec);
      const auto ids = tok->encode(read_stdin());
      std::string line;
      for (size_t i = 0; i < ids.size(); ++i) {
        if (i) line += ' ';
        line += std::to_string(ids[i]);
      }
      std::printf("%s\n", line.c_str());
    } else if (*tok_decode) {
      const auto tok = load_tokenizer(tok_spec);
      const auto ids = parse_ids(read_stdin());
      const std::string text = tok->decode(ids.data(), ids.size());
      std::fwrite(text.data(), 1, text.size(), stdout);
    } else if (*tok_train) {
      std::vector<std::string> texts;
      for (auto& d : read_documents(tok_input)) texts.push_back(std::move(d.text));
      train_bpe(texts, tok_vocab, tok_out);
      std::printf("trained a %d-token BPE on %zu documents: %s/encoder.json, %s/vocab.bpe\n",
                  tok_vocab, texts.size(), tok_out.c_str(), tok_out.c_str());
    } else if (*study_cmd) {
      return study::run_study(study_opt);
    } else if (*methods_cmd) {
      std::printf("%s", describe_methods().c_str());
    } else if (*sched_cmd) {
      const ScheduleKind kind = parse_schedule_kind(sched_kind);
      if (sched_stages < 1 || sched_stages > kMaxScheduleStages)
        throw Error("--stages must be between 1 and " + std::to_string(kMaxScheduleStages) + ", got " +
                    std::to_string(sched_stages));
      if (sched_mb < 1 || sched_mb > kMaxScheduleMicrobatches)
        throw Error("--microbatches must be between 1 and " + std::to_string(kMaxScheduleMicrobatches) +
                    ", got " + std::to_string(sched_mb));
      if (sched_extra < 0 || sched_extra > kMaxScheduleMicrobatches)
        throw Error("--extra-inflight must be between 0 and " + std::to_string(kMaxScheduleMicrobatches) + ", got " +
                    std::to_string(sched_extra));
      if (sched_cmd->count("--updates") && sched_updates < 1)
        throw Error("--updates must be >= 1, got " + std::to_string(sched_updates));
      const int64_t updates = sched_updates > 0 ? sched_updates
                              : kind == ScheduleKind::Async1F1B ? 2 * (sched_stages + sched_extra) : 2;
      // The listing and the timeline grow with stages x micro-batches x updates.
      const double actions = static_cast<double>(sched_stages) *
                             static_cast<double>(kind == ScheduleKind::Async1F1B ? 1 : sched_mb) *
                             static_cast<double>(updates);
      if (actions > kMaxScheduleActions)
        throw Error("schedule of " + std::to_string(sched_stages) + " stages x " + std::to_string(updates) +
                    " updates" + (kind == ScheduleKind::Async1F1B ? std::string() : " x " + std::to_string(sched_mb) + " micro-batches") +
                    " is too large to print (at most " + std::to_string(static_cast<long long>(kMaxScheduleActions)) +
                    " stage-micro-batches)");
      const Schedule s = make_schedule(kind, sched_stages, sched_mb, updates, sched_extra);
      validate_schedule(s);
      // Bad prediction options fail before anything is printed.
      const std::string prediction =
          sched_costs.empty() ? std::string()
                              : predict_text(s, sched_costs, sched_latency, sched_bandwidth, sched_message_mb);
      std::printf("%s%s", describe_schedule(s).c_str(), prediction.c_str());
      if (!sched_svg.empty()) {
        write_file_atomic(sched_svg, schedule_svg(s));
        std::printf("timeline picture: %s\n", sched_svg.c_str());
      }
    } else if (*trace_cmd) {
      if (!std::isfinite(trace_from) || trace_from < 0) throw Error("--from must be a number >= 0 (seconds)");
      if (!std::isfinite(trace_to)) throw Error("--to must be a number (seconds)");
      const TraceSummary t = render_trace(trace_in, trace_svg, trace_from, trace_to, trace_skip);
      std::printf("%s", t.text.c_str());
    } else if (*delaylab) {
      dlopt.taus = lab::parse_taus(dl_taus);
      const lab::DelayLabReport r = lab::run_delaylab(dlopt);
      std::printf("%s\n", r.table.c_str());
      for (const auto& f : r.files) std::printf("wrote %s\n", f.c_str());
      for (const auto& w : r.warnings) std::fprintf(stderr, "pipenag: warning: %s\n", w.c_str());
    } else if (*bench) {
      bopt.vocabs.clear();
      for (const auto& v : split_commas(vocabs)) bopt.vocabs.push_back(parse_int(v, "--vocab"));
      bopt.dtypes = split_commas(dtypes);
      if (bopt.model.n_embd % bopt.model.n_head != 0) throw Error("bench: --n-embd must be divisible by --n-head");
      const auto rs = run_bench(bopt);
      if (!bopt.json) print_bench_table(rs, bopt);
    }
  } catch (const mpi::AgreedError& e) {
    // Every rank stops with this line; each can end MPI on its own.
    std::fprintf(stderr, "pipenag: %s\n", e.what());
    mpi::finalize();
    return 1;
  } catch (const Error& e) {
    std::fprintf(stderr, "pipenag: %s\n", e.what());
    return end_mpi_on_failure(1);
  } catch (const std::filesystem::filesystem_error& e) {
    std::fprintf(stderr, "pipenag: %s\n", e.what());
    return end_mpi_on_failure(1);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "pipenag: out of memory (try a smaller model or batch)\n");
    return end_mpi_on_failure(1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pipenag: internal error: %s\n", e.what());
    return end_mpi_on_failure(2);
  }
  return 0;
}
