// pipenag: the command-line front end. Parses, dispatches, and turns every failure into one
// line on stderr and a non-zero exit status.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <new>
#include <string>
#include <vector>

#include "model/units.h"
#include "train/bench.h"
#include "train/checkpoint.h"
#include "train/config_file.h"
#include "train/sample.h"
#include "train/trainer.h"
#include "util/error.h"

using namespace pipenag;

namespace {

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

void print_bench_table(const std::vector<BenchResult>& rs, const BenchOptions& o) {
  std::printf("pipenag bench: %d layers, d=%d, %d heads, context %d, batch %d, %d threads, %d steps after %d warm-up\n",
              o.model.n_layer, o.model.n_embd, o.model.n_head, o.model.block_size, o.batch_size,
              o.threads, o.steps, o.warmup);
  std::printf("peak FP32 FMA rate measured now: %.1f GFLOP/s\n\n", rs.empty() ? 0.0 : rs[0].peak_gflops);
  std::printf("| vocab | dtype | params | tokens/s (mean) | tokens/s (median) | GFLOP/s | MFU |\n");
  std::printf("|------:|:-----:|-------:|----------------:|------------------:|--------:|----:|\n");
  for (const auto& r : rs)
    std::printf("| %d | %s | %.2fM | %.0f | %.0f | %.1f | %.1f%% |\n", r.vocab, r.dtype.c_str(),
                static_cast<double>(r.params) / 1e6, r.tokens_per_s, r.tokens_per_s_median,
                r.gflops, 100.0 * r.mfu);
}

}  // namespace

int main(int argc, char** argv) {
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
  train_cmd->add_option("--stop-at", topt.stop_at, "Stop with a checkpoint after this many updates");
  train_cmd->add_flag("--quiet,-q", topt.quiet, "No progress output");
  train_cmd->footer("Configuration keys (file sections or --set section.key=value):\n" +
                describe_config_keys());

  // eval
  auto* eval = app.add_subcommand("eval", "Validation loss and perplexity of a checkpoint");
  std::string eval_ckpt;
  int eval_batches = 0;
  std::vector<std::string> eval_overrides;
  eval->add_option("--checkpoint", eval_ckpt, "Checkpoint folder")->required();
  eval->add_option("--batches", eval_batches, "Validation batches (default: train.eval_batches)");
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

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  try {
    if (*train_cmd) {
      const Config cfg = load_config(config_path, overrides);
      const TrainResult r = train(cfg, topt);
      std::printf("done: %lld steps | train loss %.4f", static_cast<long long>(r.steps), r.last_loss);
      if (r.val_loss >= 0) std::printf(" | val loss %.4f | val ppl %.2f", r.val_loss, r.val_ppl);
      std::printf(" | %.0f tok/s overall | checkpoint %s\n", r.tokens_per_s, r.checkpoint.c_str());
    } else if (*eval) {
      Config cfg = read_checkpoint_config(eval_ckpt);
      for (const auto& o : eval_overrides) apply_override(cfg, o);
      validate(cfg);
      const EvalResult r = evaluate_checkpoint(eval_ckpt, cfg, eval_batches > 0 ? eval_batches : cfg.train.eval_batches);
      std::printf("val loss %.4f | val ppl %.2f | %lld tokens\n", r.loss, r.ppl, static_cast<long long>(r.tokens));
    } else if (*sample) {
      std::printf("%s\n", sample_text(sample_ckpt, sopt).c_str());
    } else if (*bench) {
      bopt.vocabs.clear();
      for (const auto& v : split_commas(vocabs)) bopt.vocabs.push_back(parse_int(v, "--vocab"));
      bopt.dtypes = split_commas(dtypes);
      if (bopt.model.n_embd % bopt.model.n_head != 0) throw Error("bench: --n-embd must be divisible by --n-head");
      const auto rs = run_bench(bopt);
      if (!bopt.json) print_bench_table(rs, bopt);
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "pipenag: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "pipenag: out of memory (try a smaller model or batch)\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pipenag: internal error: %s\n", e.what());
    return 2;
  }
  return 0;
}
