// The pipenag binary as a user runs it: training, resume, evaluation, sampling, and one clear
// error line with a non-zero exit for every kind of bad input.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::StartsWith;

namespace {

using namespace pipenag::testutil;

class Cli : public BinaryTest {
 protected:
  void SetUp() override {
    BinaryTest::SetUp();
    spit(dir_ / "tiny.toml", tiny_model_toml(2, 8, 4));
  }
  std::string cfg() const { return "--config " + (dir_ / "tiny.toml").string(); }
};

TEST_F(Cli, TrainsWritesMetricsAndCheckpoint) {
  const RunResult r = run("train -q " + cfg());
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("done: 8 steps"));
  const auto m = metrics(dir_ / "out");
  int steps = 0, evals = 0;
  for (const auto& j : m) {
    if (j.contains("loss")) {
      ++steps;
      for (const char* k : {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens"})
        EXPECT_TRUE(j.contains(k)) << k;
    }
    if (j.contains("val_loss")) {
      ++evals;
      EXPECT_NEAR(j["val_ppl"].get<double>(), std::exp(j["val_loss"].get<double>()), 1e-9);
    }
  }
  EXPECT_EQ(steps, 8);
  EXPECT_EQ(evals, 2);
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "state.json", "config.toml"})
    EXPECT_TRUE(fs::exists(dir_ / "out" / "checkpoint" / f)) << f;
  // No temporary files left behind.
  for (const auto& e : fs::directory_iterator(dir_ / "out"))
    EXPECT_THAT(e.path().filename().string(), ::testing::Not(HasSubstr(".tmp"))) << e.path();

  const RunResult ev = run("eval --checkpoint " + (dir_ / "out" / "checkpoint").string() + " --batches 2");
  ASSERT_EQ(ev.code, 0) << ev.err;
  EXPECT_THAT(ev.out, HasSubstr("val loss"));
  const RunResult s = run("sample --checkpoint " + (dir_ / "out" / "checkpoint").string() +
                    " --prompt 'the union' --tokens 20 --seed 3");
  ASSERT_EQ(s.code, 0) << s.err;
  EXPECT_THAT(s.out, StartsWith("the union"));
  EXPECT_EQ(s.out.size(), std::string("the union").size() + 20 + 1);
}

// The fp32 products are one FMA chain per element on every instruction set (src/kernels/gemm.h),
// and the bf16 ones do not depend on the thread count: a run gives the same bytes whichever
// kernels the CPU picks, with one thread per stage or two threads for one stage.
TEST_F(Cli, KernelChoiceAndThreadCountDoNotChangeABit) {
  std::vector<std::string> isas = {"generic"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back("avx2");
  if (__builtin_cpu_supports("avx512f")) isas.push_back("avx512");
  std::string first;
  for (const std::string& isa : isas)
    for (const char* engine : {"threads", "sequential"}) {
      const fs::path out = dir_ / ("out_" + isa + "_" + engine);
      const RunResult r = run_command(
          "PIPENAG_ISA=" + isa + " " + PIPENAG_BINARY + " train -q " + cfg() + " --set out.dir=" +
              out.string() + " --set pipeline.stages=2 --set pipeline.schedule=async-1f1b" +
              " --set pipeline.engine=" + engine + " --set train.steps=4 --set train.eval_every=0",
          dir_);
      ASSERT_EQ(r.code, 0) << isa << " " << engine << ": " << r.err;
      const std::string bytes = slurp(out / "checkpoint" / "model.safetensors");
      ASSERT_FALSE(bytes.empty());
      if (first.empty()) first = bytes;
      EXPECT_TRUE(bytes == first) << isa << " " << engine << " differs from " << isas[0] << " threads";
    }
  // bf16 (whatever backend this CPU has): the engines, and so the thread counts, agree too.
  std::string bf;
  for (const char* engine : {"threads", "sequential"}) {
    const fs::path out = dir_ / (std::string("bf16_") + engine);
    const RunResult r = run("train -q " + cfg() + " --set out.dir=" + out.string() +
                            " --set train.bf16=true --set pipeline.stages=2 --set pipeline.engine=" +
                            engine + " --set train.steps=4 --set train.eval_every=0");
    ASSERT_EQ(r.code, 0) << r.err;
    const std::string bytes = slurp(out / "checkpoint" / "model.safetensors");
    if (bf.empty()) bf = bytes;
    EXPECT_TRUE(bytes == bf) << "bf16 " << engine;
  }
  EXPECT_FALSE(bf == first);  // it really ran in bf16
}

TEST_F(Cli, BadKernelEnvironmentIsOneLine) {
  for (const char* env : {"PIPENAG_ISA=avx1024", "PIPENAG_BF16=fp8"}) {
    const RunResult r = run_command(std::string(env) + " " + PIPENAG_BINARY + " train " + cfg(), dir_);
    EXPECT_EQ(r.code, 1) << env;
    EXPECT_THAT(r.err, StartsWith("pipenag: unknown ")) << env;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  EXPECT_FALSE(fs::exists(dir_ / "out" / "checkpoint"));
}

TEST_F(Cli, ResumeIsBitIdenticalToUninterruptedRun) {
  ASSERT_EQ(run("train -q " + cfg() + " --set out.dir=" + (dir_ / "full").string()).code, 0);
  const RunResult a = run("train -q " + cfg() + " --set out.dir=" + (dir_ / "split").string() + " --stop-at 4");
  ASSERT_EQ(a.code, 0) << a.err;
  const RunResult b = run("train -q " + cfg() + " --set out.dir=" + (dir_ / "split").string() + " --resume");
  ASSERT_EQ(b.code, 0) << b.err;
  const auto full = metrics(dir_ / "full"), split = metrics(dir_ / "split");
  ASSERT_EQ(full.size(), split.size());
  for (size_t i = 0; i < full.size(); ++i) {
    for (const char* k : {"step", "loss", "grad_norm", "lr", "val_loss", "tokens"})
      if (full[i].contains(k)) {
        EXPECT_EQ(full[i][k], split[i][k]) << "line " << i << " " << k;
      }
  }
  EXPECT_EQ(slurp(dir_ / "full" / "checkpoint" / "model.safetensors"),
            slurp(dir_ / "split" / "checkpoint" / "model.safetensors"));
  EXPECT_EQ(slurp(dir_ / "full" / "checkpoint" / "optimizer.safetensors"),
            slurp(dir_ / "split" / "checkpoint" / "optimizer.safetensors"));
}

TEST_F(Cli, BadConfigInputs) {
  spit(dir_ / "bad.toml", "[model\nn_layer = 2\n");
  expect_error("train --config " + (dir_ / "bad.toml").string(), "bad.toml");
  expect_error("train " + cfg() + " --set model.n_embed=4", "unknown key 'model.n_embed'");
  expect_error("train " + cfg() + " --set model.n_layer=\\\"two\\\"", "model.n_layer");
  expect_error("train " + cfg() + " --set model.n_embd=30 --set model.n_head=4", "divisible");
  expect_error("train " + cfg() + " --set train.lr=-1", "train.lr");
  expect_error("train " + cfg() + " --set model.vocab_size=65", "vocab");
  expect_error("train " + cfg() + " --set model.block_size=100000", "sequence length 100001 is longer than the training split");
  const RunResult r = run("train --config " + (dir_ / "nope.toml").string());
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.err, HasSubstr("nope.toml"));
}

TEST_F(Cli, BadDataInputs) {
  expect_error("train " + cfg() + " --set data.input=" + (dir_ / "missing").string(), "missing");
  fs::create_directories(dir_ / "empty");
  expect_error("train " + cfg() + " --set data.input=" + (dir_ / "empty").string(), "no .txt files");
  spit(dir_ / "empty.txt", "");
  expect_error("train " + cfg() + " --set data.input=" + (dir_ / "empty.txt").string(), "empty");
}

TEST_F(Cli, BadCheckpoints) {
  ASSERT_EQ(run("train -q " + cfg()).code, 0);
  const fs::path ck = dir_ / "out" / "checkpoint";
  const std::string good = slurp(ck / "model.safetensors");

  // A different architecture.
  expect_error("train " + cfg() + " --resume --set model.n_layer=3", "different architecture");
  // Truncated weights.
  spit(ck / "model.safetensors", good.substr(0, good.size() / 2));
  expect_error("train " + cfg() + " --resume", "model.safetensors");
  expect_error("eval --checkpoint " + ck.string(), "model.safetensors");
  // Garbage header.
  spit(ck / "model.safetensors", std::string(64, '\xff'));
  expect_error("train " + cfg() + " --resume", "model.safetensors");
  spit(ck / "model.safetensors", good);
  // Corrupt state.
  const std::string state = slurp(ck / "state.json");
  spit(ck / "state.json", "{ not json");
  expect_error("train " + cfg() + " --resume", "state.json");
  spit(ck / "state.json", state);
  // Missing checkpoint.
  expect_error("train " + cfg() + " --resume --set out.dir=" + (dir_ / "none").string(), "checkpoint");
  expect_error("sample --checkpoint " + (dir_ / "none").string(), "none");
  // Bad sampling options.
  expect_error("sample --checkpoint " + ck.string() + " --temperature -1", "temperature");
  // The failed resumes left the checkpoint as it was.
  EXPECT_EQ(slurp(ck / "model.safetensors"), good);
}

TEST_F(Cli, InterruptSavesACheckpointThatResumes) {
  const fs::path out = dir_ / "out";
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const std::string err = (dir_ / "stderr.txt").string();
    std::freopen(err.c_str(), "w", stderr);
    const std::string config = (dir_ / "tiny.toml").string();
    ::execl(PIPENAG_BINARY, PIPENAG_BINARY, "train", "-q", "--config", config.c_str(), "--set",
            "train.steps=100000", "--set", "train.eval_every=0", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait until a few steps are logged, then interrupt like Ctrl-C.
  for (int i = 0; i < 600; ++i) {
    if (fs::exists(out / "metrics.jsonl") && metrics(out).size() >= 3) break;
    ::usleep(50000);
  }
  ::kill(pid, SIGINT);
  int st = 0;
  ::waitpid(pid, &st, 0);
  ASSERT_TRUE(WIFEXITED(st));
  EXPECT_EQ(WEXITSTATUS(st), 1);
  EXPECT_THAT(slurp(dir_ / "stderr.txt"), HasSubstr("interrupted"));
  const auto j = nlohmann::json::parse(slurp(out / "checkpoint" / "state.json"));
  const int64_t step = j["step"].get<int64_t>();
  EXPECT_GE(step, 3);
  EXPECT_EQ(static_cast<int64_t>(metrics(out).size()), step);  // every finished step was logged
  const RunResult r = run("train -q " + cfg() + " --resume --set train.steps=" + std::to_string(step + 2) +
                    " --set train.eval_every=0");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(static_cast<int64_t>(metrics(out).size()), step + 2);
}

TEST_F(Cli, PrepareThenTrainOnTokenFilesWithShuffledOrderResumesExactly) {
  const fs::path data = dir_ / "prepared";
  const RunResult p = run("prepare --tokenizer byte --input " + (dir_ / "corpus").string() +
                          " --out " + data.string() + " --val-fraction 0.2");
  ASSERT_EQ(p.code, 0) << p.err;
  EXPECT_THAT(p.out, HasSubstr("5 documents"));
  for (const char* f : {"train.bin", "val.bin", "meta.json"}) EXPECT_TRUE(fs::exists(data / f)) << f;
  const std::string common = "train -q " + cfg() + " --set data.dir=" + data.string() +
                             " --set data.order=shuffled";
  ASSERT_EQ(run(common + " --set out.dir=" + (dir_ / "full").string()).code, 0);
  ASSERT_EQ(run(common + " --set out.dir=" + (dir_ / "split").string() + " --stop-at 3").code, 0);
  ASSERT_EQ(run(common + " --set out.dir=" + (dir_ / "split").string() + " --resume").code, 0);
  const auto full = metrics(dir_ / "full"), split = metrics(dir_ / "split");
  ASSERT_EQ(full.size(), split.size());
  for (size_t i = 0; i < full.size(); ++i)
    if (full[i].contains("loss")) {
      EXPECT_EQ(full[i]["loss"], split[i]["loss"]) << i;
    }
  // Shuffled batches differ from sequential ones.
  ASSERT_EQ(run("train -q " + cfg() + " --set data.dir=" + data.string() + " --set out.dir=" +
                (dir_ / "seq").string()).code, 0);
  EXPECT_NE(metrics(dir_ / "seq")[0]["loss"], full[0]["loss"]);
  // A damaged token file is refused with its name.
  std::string bin = slurp(data / "train.bin");
  bin[bin.size() - 1] ^= 0x01;
  spit(data / "train.bin", bin);
  expect_error(common + " --set out.dir=" + (dir_ / "bad").string(), "train.bin");
  spit(data / "train.bin", "PNAG");
  expect_error(common + " --set out.dir=" + (dir_ / "bad").string(), "train.bin");
  expect_error("train " + cfg() + " --set data.dir=" + (dir_ / "nowhere").string(), "nowhere");
  expect_error("train " + cfg() + " --set data.order=random", "data.order");
}

TEST_F(Cli, TokenizerCommands) {
  spit(dir_ / "text.txt", "Hello world, it's a test.");
  RunResult e = run("tokenizer encode --tokenizer byte < " + (dir_ / "text.txt").string());
  ASSERT_EQ(e.code, 0) << e.err;
  EXPECT_EQ(e.out, "72 101 108 108 111 32 119 111 114 108 100 44 32 105 116 39 115 32 97 32 116 101 115 116 46\n");
  spit(dir_ / "ids.txt", e.out);
  RunResult d = run("tokenizer decode --tokenizer byte < " + (dir_ / "ids.txt").string());
  ASSERT_EQ(d.code, 0) << d.err;
  EXPECT_EQ(d.out, "Hello world, it's a test.");
  spit(dir_ / "bad_ids.txt", "72 x 9");
  expect_error("tokenizer decode --tokenizer byte < " + (dir_ / "bad_ids.txt").string(), "'x' is not a token id");
  spit(dir_ / "big_ids.txt", "72 256");
  expect_error("tokenizer decode --tokenizer byte < " + (dir_ / "big_ids.txt").string(), "256");
  expect_error("tokenizer encode --tokenizer " + (dir_ / "missing_tok").string() + " < " +
                   (dir_ / "text.txt").string(), "missing_tok");

  // Train a small BPE, then use it for encode/decode and for training.
  const fs::path bpe = dir_ / "bpe";
  const RunResult t = run("tokenizer train --vocab-size 300 --input " + (dir_ / "corpus").string() +
                          " --out " + bpe.string());
  ASSERT_EQ(t.code, 0) << t.err;
  EXPECT_TRUE(fs::exists(bpe / "encoder.json"));
  EXPECT_TRUE(fs::exists(bpe / "vocab.bpe"));
  spit(dir_ / "words.txt", "the union of the people");
  e = run("tokenizer encode --tokenizer " + bpe.string() + " < " + (dir_ / "words.txt").string());
  ASSERT_EQ(e.code, 0) << e.err;
  const auto n_ids = std::count(e.out.begin(), e.out.end(), ' ') + 1;
  EXPECT_LT(n_ids, 23);  // fewer tokens than bytes
  spit(dir_ / "ids.txt", e.out);
  d = run("tokenizer decode --tokenizer " + bpe.string() + " < " + (dir_ / "ids.txt").string());
  EXPECT_EQ(d.out, "the union of the people");
  const RunResult tr = run("train -q " + cfg() + " --set data.tokenizer=" + bpe.string() +
                           " --set model.vocab_size=300 --set out.dir=" + (dir_ / "bpeout").string());
  ASSERT_EQ(tr.code, 0) << tr.err;
  const RunResult s = run("sample --checkpoint " + (dir_ / "bpeout" / "checkpoint").string() +
                          " --prompt 'the union' --tokens 5");
  ASSERT_EQ(s.code, 0) << s.err;
  EXPECT_THAT(s.out, StartsWith("the union"));
  expect_error("tokenizer train --vocab-size 10 --input " + (dir_ / "corpus").string() + " --out " +
                   (dir_ / "bpe2").string(), "vocab");
}

TEST_F(Cli, HelpListsCommandsAndKeys) {
  const RunResult r = run("--help");
  EXPECT_EQ(r.code, 0);
  for (const char* c : {"train", "eval", "sample", "bench"}) EXPECT_THAT(r.out, HasSubstr(c));
  const RunResult t = run("train --help");
  EXPECT_EQ(t.code, 0);
  for (const char* k : {"model.n_layer", "train.lr", "train.warmup_steps", "data.input", "out.dir"})
    EXPECT_THAT(t.out, HasSubstr(k));
  const RunResult u = run("frobnicate");
  EXPECT_NE(u.code, 0);
}

}  // namespace
