// Trustworthy runs (issue 10), as a hostile user tries them with the pipenag binary: one owner
// per run folder, no silent overwrite, stale temporaries, signals and closed pipes, damaged
// metrics, checkpoint integrity, stale or mixed token folders, bounds and the small gaps.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cmath>
#include <filesystem>
#include <limits>
#include <random>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/token_file.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

namespace {

using namespace pipenag;
using namespace pipenag::testutil;

class Trust : public BinaryTest {
 protected:
  void SetUp() override {
    BinaryTest::SetUp();
    spit(dir_ / "tiny.toml", tiny_model_toml(2, 8, 4));
  }
  std::string cfg() const { return "--config " + (dir_ / "tiny.toml").string(); }
  fs::path out() const { return dir_ / "out"; }
  int64_t checkpoint_step(const fs::path& out_dir) {
    return nlohmann::json::parse(slurp(out_dir / "checkpoint" / "state.json"))["step"].get<int64_t>();
  }
  // Starts `pipenag train` on the tiny config with a long run in the background; stderr goes to
  // <dir_>/bg.err.
  pid_t start_long_training(const std::vector<std::string>& extra = {}) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      const std::string err = (dir_ / "bg.err").string();
      if (!std::freopen(err.c_str(), "w", stderr)) ::_exit(126);
      const std::string config = (dir_ / "tiny.toml").string();
      std::vector<std::string> args = {PIPENAG_BINARY, "train", "-q", "--config", config, "--set",
                                       "train.steps=100000", "--set", "train.eval_every=0"};
      args.insert(args.end(), extra.begin(), extra.end());
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(PIPENAG_BINARY, argv.data());
      ::_exit(127);
    }
    return pid;
  }
  // Waits until the run in out() has logged `lines` metrics lines (true) or 30 s passed.
  bool wait_for_metrics(size_t lines) {
    for (int i = 0; i < 600; ++i) {
      if (fs::exists(out() / "metrics.jsonl") && metrics(out()).size() >= lines) return true;
      ::usleep(50000);
    }
    return false;
  }
  int stop(pid_t pid, int sig) {
    ::kill(pid, sig);
    int st = 0;
    ::waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  // The pid of a process that has exited (for temporaries of dead runs).
  static pid_t dead_pid() {
    const pid_t p = ::fork();
    if (p == 0) ::_exit(0);
    ::waitpid(p, nullptr, 0);
    return p;
  }
};

TEST_F(Trust, ASecondTrainerOnTheSameFolderFailsAtOnceNamingTheHolder) {
  const pid_t first = start_long_training();
  ASSERT_TRUE(wait_for_metrics(2));
  const std::string err = expect_error("train -q " + cfg(), "in use by another pipenag process");
  EXPECT_THAT(err, HasSubstr("pid " + std::to_string(first)));
  EXPECT_THAT(err, HasSubstr(out().string()));
  // The first run was not disturbed: it stops with its own checkpoint on SIGTERM.
  EXPECT_EQ(stop(first, SIGTERM), 1);
  EXPECT_THAT(slurp(dir_ / "bg.err"), HasSubstr("interrupted by signal"));
  EXPECT_EQ(static_cast<int64_t>(metrics(out()).size()), checkpoint_step(out()));
  // Once it is gone the folder is free again (the kernel dropped the lock).
  EXPECT_EQ(run("train -q " + cfg() + " --resume --set train.eval_every=0 --set train.steps=" +
                std::to_string(checkpoint_step(out()) + 1)).code, 0);
}

TEST_F(Trust, AFreshTrainNeverOverwritesAnEarlierRun) {
  ASSERT_EQ(run("train -q " + cfg()).code, 0);
  const std::string model = slurp(out() / "checkpoint" / "model.safetensors");
  const std::string log = slurp(out() / "metrics.jsonl");
  const std::string err = expect_error("train -q " + cfg() + " --set train.steps=3", "--resume");
  EXPECT_THAT(err, HasSubstr("--force"));
  EXPECT_THAT(err, HasSubstr("step 8"));
  EXPECT_EQ(slurp(out() / "checkpoint" / "model.safetensors"), model);
  EXPECT_EQ(slurp(out() / "metrics.jsonl"), log);
  expect_error("train -q " + cfg() + " --resume --force", "exclude each other");
  // --force starts over and keeps nothing of the old run.
  spit(out() / "metrics.jsonl.corrupt", "junk\n");
  const RunResult r = run("train " + cfg() + " --force --set train.steps=3 --set train.eval_every=0");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("--force: removed"));
  EXPECT_EQ(metrics(out()).size(), 3u);
  EXPECT_EQ(checkpoint_step(out()), 3);
  EXPECT_FALSE(fs::exists(out() / "metrics.jsonl.corrupt"));
}

TEST_F(Trust, TemporariesOfDeadRunsAreRemovedAndLiveOnesKept) {
  ASSERT_EQ(run("train -q " + cfg() + " --stop-at 4").code, 0);
  const std::string dead = std::to_string(dead_pid()), live = std::to_string(::getpid());
  fs::create_directories(out() / ("checkpoint.tmp." + dead));
  spit(out() / ("checkpoint.tmp." + dead) / "model.safetensors", std::string(1000, 'x'));
  spit(out() / ("metrics.jsonl.tmp." + dead), "x");
  spit(out() / "data" / ("train.bin.tmp." + dead), "x");
  fs::create_directories(out() / ("checkpoint.tmp." + live));
  // Names pipenag does not write, and pids no process can have, belong to the user.
  spit(out() / ("notes.tmp." + dead), "mine");
  fs::create_directories(out() / "results.tmp.0");
  spit(out() / "metrics.jsonl.tmp.99999999", "x");
  // A refused run removes nothing.
  expect_error("train -q " + cfg(), "--resume");
  EXPECT_TRUE(fs::exists(out() / ("checkpoint.tmp." + dead)));
  const RunResult r = run("train " + cfg() + " --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("removed 3 temporaries"));
  EXPECT_FALSE(fs::exists(out() / ("checkpoint.tmp." + dead)));
  EXPECT_FALSE(fs::exists(out() / ("metrics.jsonl.tmp." + dead)));
  EXPECT_FALSE(fs::exists(out() / "data" / ("train.bin.tmp." + dead)));
  EXPECT_TRUE(fs::exists(out() / ("checkpoint.tmp." + live)));
  EXPECT_TRUE(fs::exists(out() / ("notes.tmp." + dead)));
  EXPECT_TRUE(fs::exists(out() / "results.tmp.0"));
  EXPECT_TRUE(fs::exists(out() / "metrics.jsonl.tmp.99999999"));
}

TEST_F(Trust, SighupSavesACheckpointLikeSigint) {
  const pid_t pid = start_long_training();
  ASSERT_TRUE(wait_for_metrics(3));
  EXPECT_EQ(stop(pid, SIGHUP), 1);
  EXPECT_THAT(slurp(dir_ / "bg.err"), HasSubstr("interrupted by signal " + std::to_string(SIGHUP)));
  EXPECT_GE(checkpoint_step(out()), 3);
  EXPECT_EQ(static_cast<int64_t>(metrics(out()).size()), checkpoint_step(out()));
}

TEST_F(Trust, AClosedPipeDoesNotKillTraining) {
  // Progress goes to a reader that leaves after one line; the run must still finish and save.
  const std::string cmd = "bash -c '" + std::string(PIPENAG_BINARY) + " train " + cfg() +
                          " --set train.log_every=1 2>&1 | head -1 >/dev/null; echo ${PIPESTATUS[0]} > " +
                          (dir_ / "status.txt").string() + "'";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  EXPECT_EQ(slurp(dir_ / "status.txt"), "0\n");
  EXPECT_EQ(checkpoint_step(out()), 8);
  EXPECT_EQ(metrics(out()).back().value("val_loss", -1.0) > 0, true);
}

TEST_F(Trust, ADamagedMetricsLineIsQuarantinedAndTheRestKept) {
  ASSERT_EQ(run("train -q " + cfg() + " --stop-at 6").code, 0);
  std::string log = slurp(out() / "metrics.jsonl");
  const size_t second = log.find('\n') + 1;
  log.insert(second, "{\"step\": 2, \"loss\": 1.2\x01garbage\n");
  spit(out() / "metrics.jsonl", log);
  const RunResult r = run("train " + cfg() + " --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("1 damaged line moved to"));
  EXPECT_THAT(slurp(out() / "metrics.jsonl.corrupt"), HasSubstr("garbage"));
  int steps = 0;
  for (const auto& j : metrics(out())) steps += j.contains("loss") ? 1 : 0;
  EXPECT_EQ(steps, 8);  // steps 3..6 after the bad line were kept, 7..8 added
}

// state.json with its checksum recomputed after an edit (XXH64 of the dump without "checksum").
nlohmann::json reseal(nlohmann::json state) {
  state.erase("checksum");
  const std::string text = state.dump();
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(xxhash64(text.data(), text.size())));
  state["checksum"] = buf;
  return state;
}

// Rewrites a checkpoint's model.safetensors with one weight set to `value`, keeping the file and
// state.json consistent (step and checksum), as a run that diverged would have written it.
void poison_weights(const fs::path& ck, float value) {
  const SafetensorsFile f = SafetensorsFile::open((ck / "model.safetensors").string());
  std::vector<std::vector<float>> data;
  SafetensorsWriter w;
  for (const auto& name : f.names()) {
    const TensorInfo& t = f.info(name);
    const float* p = static_cast<const float*>(f.data(name));
    data.emplace_back(p, p + t.numel);
  }
  data[0][0] = value;
  size_t i = 0;
  for (const auto& name : f.names()) w.add(name, Dtype::F32, f.info(name).shape, data[i++].data());
  for (const auto& [k, v] : f.metadata())
    if (k != "data_xxh64") w.set_metadata(k, v);
  const std::string sum = w.data_checksum();
  w.set_metadata("data_xxh64", sum);
  w.write((ck / "model.safetensors").string());
  auto state = nlohmann::json::parse(slurp(ck / "state.json"));
  state["files"]["model.safetensors"]["data_xxh64"] = sum;
  spit(ck / "state.json", reseal(state).dump(2));
}

TEST_F(Trust, CheckpointFilesAreVerifiedAndNonFiniteWeightsRefused) {
  ASSERT_EQ(run("train -q " + cfg()).code, 0);
  ASSERT_EQ(run("train -q " + cfg() + " --set out.dir=" + (dir_ / "early").string() + " --stop-at 2").code, 0);
  const fs::path ck = out() / "checkpoint";
  const std::string good = slurp(ck / "model.safetensors"), good_state = slurp(ck / "state.json");
  // One flipped bit in the tensor data (the last byte of the file is data).
  std::string bad = good;
  bad[bad.size() - 3] = static_cast<char>(bad[bad.size() - 3] ^ 0x10);
  spit(ck / "model.safetensors", bad);
  expect_error("eval --checkpoint " + ck.string(), "damaged");
  expect_error("train -q " + cfg() + " --resume --set train.steps=9", "damaged");
  // The model file of another step.
  fs::copy_file(dir_ / "early" / "checkpoint" / "model.safetensors", ck / "model.safetensors",
                fs::copy_options::overwrite_existing);
  expect_error("eval --checkpoint " + ck.string(), "belongs to step 2");
  // The optimizer file of another step.
  spit(ck / "model.safetensors", good);
  const std::string opt = slurp(ck / "optimizer.safetensors");
  fs::copy_file(dir_ / "early" / "checkpoint" / "optimizer.safetensors", ck / "optimizer.safetensors",
                fs::copy_options::overwrite_existing);
  expect_error("train -q " + cfg() + " --resume --set train.steps=9", "optimizer.safetensors");
  spit(ck / "optimizer.safetensors", opt);
  // NaN and infinite weights with consistent checksums: eval and sample refuse them.
  poison_weights(ck, std::numeric_limits<float>::quiet_NaN());
  expect_error("eval --checkpoint " + ck.string(), "non-finite");
  expect_error("sample --checkpoint " + ck.string() + " --tokens 5", "non-finite");
  poison_weights(ck, std::numeric_limits<float>::infinity());
  expect_error("eval --checkpoint " + ck.string(), "non-finite");
  spit(ck / "model.safetensors", good);
  // state.json edited by hand (a field no tensor checksum covers) or with a hostile record.
  auto edited = nlohmann::json::parse(good_state);
  edited["data_position"] = 3;
  spit(ck / "state.json", edited.dump(2));
  expect_error("train -q " + cfg() + " --resume --set train.steps=9", "edited");
  edited = nlohmann::json::parse(good_state);
  edited["files"]["model.safetensors"] = 5;
  spit(ck / "state.json", reseal(edited).dump(2));
  expect_error("eval --checkpoint " + ck.string(), "model.safetensors");
  spit(ck / "state.json", good_state);
  const RunResult ev = run("eval --checkpoint " + ck.string());
  EXPECT_EQ(ev.code, 0) << ev.err;
}

TEST_F(Trust, MixedOrStaleTokenFoldersAreNeverUsedSilently) {
  // Two preparations of the corpus; train.bin of one next to meta.json of the other.
  ASSERT_EQ(run("prepare --input " + (dir_ / "corpus").string() + " --out " + (dir_ / "a").string()).code, 0);
  ASSERT_EQ(run("prepare --input " + (dir_ / "corpus").string() + " --out " + (dir_ / "b").string() +
                " --val-fraction 0.4").code, 0);
  // A model trained on b samples with b's meta.json alone (the token files need not be there).
  ASSERT_EQ(run("train -q " + cfg() + " --set data.dir=" + (dir_ / "b").string() + " --set out.dir=" +
                (dir_ / "onb").string() + " --set train.steps=2").code, 0);
  fs::rename(dir_ / "b" / "val.bin", dir_ / "val.bin.away");
  fs::rename(dir_ / "b" / "train.bin", dir_ / "train.bin.away");
  const RunResult smp = run("sample --tokens 3 --checkpoint " + (dir_ / "onb" / "checkpoint").string());
  EXPECT_EQ(smp.code, 0) << smp.err;
  fs::rename(dir_ / "val.bin.away", dir_ / "b" / "val.bin");
  fs::rename(dir_ / "train.bin.away", dir_ / "b" / "train.bin");
  fs::copy_file(dir_ / "b" / "train.bin", dir_ / "a" / "train.bin", fs::copy_options::overwrite_existing);
  const std::string err = expect_error("train -q " + cfg() + " --set data.dir=" + (dir_ / "a").string(), "train.bin");
  EXPECT_THAT(err, HasSubstr("meta.json"));
  // sample checks the pair too when the token files are there.
  fs::copy_file(dir_ / "a" / "meta.json", dir_ / "b" / "meta.json", fs::copy_options::overwrite_existing);
  expect_error("sample --tokens 3 --checkpoint " + (dir_ / "onb" / "checkpoint").string(), "meta.json");
  // The out.dir cache follows the corpus: an added document and an edited one are noticed.
  ASSERT_EQ(run("train -q " + cfg() + " --stop-at 1").code, 0);
  const size_t before = nlohmann::json::parse(slurp(out() / "data" / "meta.json"))["train"]["tokens"].get<size_t>() +
                        nlohmann::json::parse(slurp(out() / "data" / "meta.json"))["val"]["tokens"].get<size_t>();
  spit(dir_ / "corpus" / "doc9.txt", std::string(3000, 'z'));
  RunResult r = run("train " + cfg() + " --force --stop-at 1");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("re-tokenising"));
  EXPECT_THAT(r.err, HasSubstr("doc9.txt added"));
  const auto meta = nlohmann::json::parse(slurp(out() / "data" / "meta.json"));
  EXPECT_EQ(meta["train"]["tokens"].get<size_t>() + meta["val"]["tokens"].get<size_t>(), before + 3000);  // the byte tokenizer has no separator token
  // Same size, new content, new mtime.
  std::string doc = slurp(dir_ / "corpus" / "doc0.txt");
  doc[10] = doc[10] == 'a' ? 'b' : 'a';
  ::usleep(20000);
  spit(dir_ / "corpus" / "doc0.txt", doc);
  r = run("train " + cfg() + " --force --stop-at 1");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("doc0.txt changed"));
  // Nothing changed: the cache is used as it is.
  r = run("train " + cfg() + " --force --stop-at 1");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, Not(HasSubstr("re-tokenising")));
  // A damaged cache (token file of another preparation) is rebuilt, saying so.
  fs::copy_file(dir_ / "b" / "val.bin", out() / "data" / "val.bin", fs::copy_options::overwrite_existing);
  r = run("train " + cfg() + " --force --stop-at 1");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("re-tokenising"));
  EXPECT_THAT(r.err, HasSubstr("val.bin"));
}

TEST_F(Trust, ResumeRefusesWhatWouldMakeItAnotherRunAndSaysWhatChanges) {
  ASSERT_EQ(run("train -q " + cfg() + " --stop-at 4").code, 0);
  expect_error("train -q " + cfg() + " --resume --set train.batch_size=2", "train.batch_size");
  expect_error("train -q " + cfg() + " --resume --set data.order=shuffled", "data.order");
  expect_error("train -q " + cfg() + " --resume --set data.val_fraction=0.3", "data.val_fraction");
  expect_error("train -q " + cfg() + " --resume --set train.steps=3", "beyond train.steps = 3");
  expect_error("train -q " + cfg() + " --resume --stop-at 4", "--stop-at 4 is not after the checkpoint's step 4");
  const RunResult r = run("train " + cfg() + " --resume --set train.lr=1e-3");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("train.lr changed: 0.003 -> 0.001"));
  // A finished run resumed: nothing is done and nothing is written.
  const std::string log = slurp(out() / "metrics.jsonl");
  const RunResult again = run("train " + cfg() + " --resume --set train.lr=1e-3");
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_THAT(again.out, HasSubstr("nothing to do"));
  EXPECT_EQ(slurp(out() / "metrics.jsonl"), log);
}

TEST_F(Trust, BoundsAndSmallGaps) {
  expect_error("train -q " + cfg() + " --stop-at -3", "--stop-at");
  expect_error("train -q --config /dev/zero", "/dev/zero");
  expect_error("schedule --stages 100000", "--stages");
  expect_error("schedule --microbatches 100000000", "--microbatches");
  expect_error("schedule --updates 0", "--updates");
  expect_error("schedule --stages 1000 --updates 1000000000", "too large");
  fs::create_directories(dir_ / "loop");
  fs::create_symlink("b.txt", dir_ / "loop" / "a.txt");
  fs::create_symlink("a.txt", dir_ / "loop" / "b.txt");
  const std::string loop = expect_error("train -q " + cfg() + " --set data.input=" + (dir_ / "loop").string(), "symbolic links");
  EXPECT_THAT(loop, Not(HasSubstr("internal error")));
  expect_error("train -q " + cfg() + " --set data.input=/dev/zero", "not a regular file");
  // Threads beyond the cores are capped with a note.
  const RunResult t = run("train " + cfg() + " --set train.threads=100000 --set train.steps=2 --set train.eval_every=0");
  ASSERT_EQ(t.code, 0) << t.err;
  EXPECT_THAT(t.err, HasSubstr("train.threads = 100000 is more than the"));
  const std::string ck = (out() / "checkpoint").string();
  expect_error("eval --checkpoint " + ck + " --batches -1", "--batches");
  // --batches 0: the whole validation split.
  const RunResult whole = run("eval --checkpoint " + ck + " --batches 0");
  EXPECT_EQ(whole.code, 0) << whole.err;
  EXPECT_THAT(whole.out, HasSubstr("val loss"));
  expect_error("sample --checkpoint " + ck + " --temperature nan", "--temperature");
  expect_error("sample --checkpoint " + ck + " --tokens 2000000000", "--tokens");
  spit(dir_ / "trace.json", "{\"traceEvents\": []}");
  expect_error("trace " + (dir_ / "trace.json").string() + " --svg " + (dir_ / "t.svg").string() + " --from nan", "--from");
  // Sampling streams: a reader that stops after a few bytes stops a huge request quickly.
  const auto t0 = std::chrono::steady_clock::now();
  const std::string cmd = std::string(PIPENAG_BINARY) + " sample --checkpoint " + ck +
                          " --tokens 5000000 | head -c 20 > " + (dir_ / "head.txt").string();
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 60.0);
  EXPECT_EQ(slurp(dir_ / "head.txt").size(), 20u);
}

TEST_F(Trust, DivergenceNamesTheStepAndTheClipSetting) {
  const std::string with_clip =
      expect_error("train -q " + cfg() + " --set train.lr=1e6 --set train.warmup_steps=0 --set train.clip=1.0", "diverged");
  EXPECT_THAT(with_clip, HasSubstr("already on"));
  const std::string without = expect_error(
      "train -q " + cfg() + " --force --set train.lr=1e6 --set train.warmup_steps=0 --set train.clip=0", "diverged");
  EXPECT_THAT(without, HasSubstr("set train.clip"));
  // The step named is the one whose loss is not finite: the metrics hold every step before it.
  const size_t at = without.find("at step ");
  ASSERT_NE(at, std::string::npos);
  const int64_t step = std::stoll(without.substr(at + 8));
  int64_t logged = 0;
  for (const auto& j : metrics(out())) logged += j.contains("loss") ? 1 : 0;
  EXPECT_EQ(logged, step - 1);
}

TEST_F(Trust, ATruncatedVocabBpeIsRefused) {
  ASSERT_EQ(run("tokenizer train --vocab-size 300 --input " + (dir_ / "corpus").string() + " --out " +
                (dir_ / "bpe").string()).code, 0);
  std::string merges = slurp(dir_ / "bpe" / "vocab.bpe");
  merges.resize(merges.rfind('\n', merges.size() - 2) + 1);  // drop the last merge line
  spit(dir_ / "bpe" / "vocab.bpe", merges);
  const std::string cmd = "tokenizer encode --tokenizer " + (dir_ / "bpe").string() + " < " + (dir_ / "tiny.toml").string();
  expect_error(cmd, "made by no merge");
}

}  // namespace

namespace {

// Evaluations, checkpoints and interruptions inside a pipeline's flow (issue 10, item 4): none
// of them drains the pipeline, so none of them changes a bit of what the run computes.
struct FlowCase {
  std::string schedule;
  bool stash, recompute;
};

class FlowExactness : public Trust, public ::testing::WithParamInterface<FlowCase> {
 protected:
  std::string sets(int steps) const {
    const FlowCase& c = GetParam();
    return " --set model.n_layer=4 --set pipeline.stages=3 --set pipeline.engine=threads --set pipeline.schedule=" +
           c.schedule + " --set pipeline.microbatches=" + (c.schedule == "async-1f1b" ? "1" : "2") + " --set pipeline.stash=" + (c.stash ? "true" : "false") +
           " --set pipeline.recompute=" + (c.recompute ? "true" : "false") +
           " --set train.steps=" + std::to_string(steps) + " --set train.warmup_steps=3";
  }
  void train_into(const std::string& name, const std::string& extra) {
    const RunResult r = run("train -q " + cfg() + sets(steps_) + " --set out.dir=" + (dir_ / name).string() + " " + extra);
    ASSERT_EQ(r.code, 0) << name << ": " << r.err;
  }
  std::vector<double> losses(const std::string& name) {
    std::vector<double> v;
    for (const auto& j : metrics(dir_ / name))
      if (j.contains("loss")) v.push_back(j["loss"].get<double>());
    return v;
  }
  void expect_same_run(const std::string& a, const std::string& b) {
    EXPECT_EQ(losses(a), losses(b)) << a << " vs " << b;
    EXPECT_EQ(losses(a).size(), static_cast<size_t>(steps_));
    EXPECT_TRUE(slurp(dir_ / a / "checkpoint" / "model.safetensors") ==
                slurp(dir_ / b / "checkpoint" / "model.safetensors")) << a << " vs " << b;
    EXPECT_TRUE(slurp(dir_ / a / "checkpoint" / "optimizer.safetensors") ==
                slurp(dir_ / b / "checkpoint" / "optimizer.safetensors")) << a << " vs " << b;
  }
  int steps_ = 12;
};

TEST_P(FlowExactness, EvaluationsCheckpointsAndStopsChangeNoBit) {
  train_into("plain", "--set train.eval_every=0 --set train.checkpoint_every=0");
  // Evaluations every 7 updates and checkpoints every 5: the same training.
  train_into("evals", "--set train.eval_every=7 --set train.checkpoint_every=5");
  expect_same_run("plain", "evals");
  int evals = 0;
  for (const auto& j : metrics(dir_ / "evals")) evals += j.contains("val_loss") ? 1 : 0;
  EXPECT_EQ(evals, 2);  // at 7 and at the end
  // Stopped at 5 (mid-flow: micro-batches in flight) and resumed.
  train_into("split", "--set train.eval_every=0 --stop-at 5");
  EXPECT_EQ(nlohmann::json::parse(slurp(dir_ / "split" / "checkpoint" / "state.json"))["step"], 5);
  // async-1f1b pauses with micro-batches in flight (stages 0 and 1) and an activation in transit
  // on each boundary; the synchronous schedules pause at a flush, with nothing in flight.
  EXPECT_EQ(fs::exists(dir_ / "split" / "checkpoint" / "flow.safetensors"), GetParam().schedule == "async-1f1b");
  train_into("split", "--set train.eval_every=0 --resume");
  expect_same_run("plain", "split");
  // Stopped twice, the second time with a checkpoint_every cut in between.
  train_into("twice", "--set train.eval_every=0 --stop-at 3");
  train_into("twice", "--set train.eval_every=0 --set train.checkpoint_every=4 --stop-at 9 --resume");
  train_into("twice", "--set train.eval_every=0 --resume");
  expect_same_run("plain", "twice");
  // Stopped in the last updates (micro-batches in flight that a longer schedule would keep in
  // flight differently) and then extended: the old schedule runs to its end first, so the first
  // 12 updates are those of the uninterrupted 12-update run.
  train_into("extend", "--set train.eval_every=0 --stop-at 11");
  const RunResult r = run("train " + cfg() + sets(16) + " --set out.dir=" + (dir_ / "extend").string() +
                          " --set train.eval_every=0 --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  if (GetParam().schedule == "async-1f1b") {
    EXPECT_THAT(r.err, HasSubstr("finishing the checkpoint's schedule (to step 12)"));
  }
  std::vector<double> first12 = losses("extend");
  ASSERT_EQ(first12.size(), 16u);
  first12.resize(12);
  // The lr schedule of the last updates depends on train.steps, so only the first 11 (done before
  // the change) must agree exactly.
  const std::vector<double> plain = losses("plain");
  for (size_t i = 0; i < 11; ++i) EXPECT_EQ(first12[i], plain[i]) << i;
}

TEST_P(FlowExactness, SigintAtAnyUpdateThenResumeIsTheUninterruptedRun) {
  // Under the sanitizers (5-10x slower) one interruption of a shorter run keeps CI in budget.
  const bool sanitized = std::getenv("PIPENAG_SANITIZED") != nullptr;
  steps_ = sanitized ? 40 : 120;
  train_into("plain", "--set train.eval_every=0");
  int interrupted = 0;
  for (size_t wait_lines : sanitized ? std::vector<size_t>{3} : std::vector<size_t>{2, 9}) {
    const std::string name = "cut" + std::to_string(wait_lines);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      const std::string err = (dir_ / (name + ".err")).string();
      if (!std::freopen(err.c_str(), "w", stderr)) ::_exit(126);
      const std::string cmd = std::string(PIPENAG_BINARY) + " train -q " + cfg() + sets(steps_) +
                              " --set train.eval_every=0 --set out.dir=" + (dir_ / name).string();
      ::execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    for (int i = 0; i < 600; ++i) {
      if (fs::exists(dir_ / name / "metrics.jsonl") && metrics(dir_ / name).size() >= wait_lines) break;
      ::usleep(20000);
    }
    ::kill(pid, SIGINT);
    int st = 0;
    ::waitpid(pid, &st, 0);
    ASSERT_TRUE(WIFEXITED(st));
    if (WEXITSTATUS(st) == 0) continue;  // finished before the signal: nothing to test
    EXPECT_EQ(WEXITSTATUS(st), 1) << slurp(dir_ / (name + ".err"));
    ++interrupted;
    const int64_t at = checkpoint_step(dir_ / name);
    EXPECT_GT(at, 0);
    EXPECT_LT(at, steps_);
    train_into(name, "--set train.eval_every=0 --resume");
    expect_same_run("plain", name);
  }
  EXPECT_GE(interrupted, 1) << "every run finished before its signal";
}

// kill -9 at random instants of an async run that checkpoints every update (mid-flow, with
// micro-batches in flight), each time resumed: the chain ends exactly where the uninterrupted run
// does, and no temporary is left behind.
TEST_F(Trust, KillNineAtRandomInstantsThenResumeIsTheUninterruptedRun) {
  const bool sanitized = std::getenv("PIPENAG_SANITIZED") != nullptr;
  const std::string sets = cfg() + " --set model.n_layer=4 --set pipeline.stages=3 --set pipeline.engine=threads"
                           " --set pipeline.schedule=async-1f1b --set train.steps=60 --set train.eval_every=0"
                           " --set train.checkpoint_every=1";
  ASSERT_EQ(run("train -q " + sets + " --set out.dir=" + (dir_ / "ref").string()).code, 0);
  std::mt19937 rng(12345);
  int kills = 0;
  bool resume = false;
  for (int round = 0; round < 50; ++round) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      const std::string cmd = std::string(PIPENAG_BINARY) + " train -q " + sets + (resume ? " --resume" : "") +
                              " > /dev/null 2>&1";
      ::execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    ::usleep(static_cast<useconds_t>(std::uniform_int_distribution<int>(50, sanitized ? 2000 : 500)(rng)) * 1000);
    const bool killed = ::kill(pid, SIGKILL) == 0;
    int st = 0;
    ::waitpid(pid, &st, 0);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) break;  // finished before the kill
    ASSERT_TRUE(killed && WIFSIGNALED(st)) << "round " << round << " status " << st;
    ++kills;
    resume = fs::exists(out() / "checkpoint" / "state.json");
  }
  EXPECT_GE(kills, 1);
  EXPECT_EQ(checkpoint_step(out()), 60);
  EXPECT_EQ(slurp(out() / "checkpoint" / "model.safetensors"), slurp(dir_ / "ref" / "checkpoint" / "model.safetensors"));
  EXPECT_EQ(slurp(out() / "checkpoint" / "optimizer.safetensors"),
            slurp(dir_ / "ref" / "checkpoint" / "optimizer.safetensors"));
  std::vector<double> a, b;
  for (const auto& j : metrics(out())) if (j.contains("loss")) a.push_back(j["loss"].get<double>());
  for (const auto& j : metrics(dir_ / "ref")) if (j.contains("loss")) b.push_back(j["loss"].get<double>());
  EXPECT_EQ(a, b);
  for (const auto& e : fs::directory_iterator(out()))
    EXPECT_THAT(e.path().filename().string(), Not(HasSubstr(".tmp."))) << e.path();
}

INSTANTIATE_TEST_SUITE_P(
    Schedules, FlowExactness,
    ::testing::Values(FlowCase{"async-1f1b", true, false}, FlowCase{"async-1f1b", false, false},
                      FlowCase{"async-1f1b", true, true}, FlowCase{"async-1f1b", false, true},
                      FlowCase{"gpipe", true, false}, FlowCase{"1f1b", true, true}),
    [](const ::testing::TestParamInfo<FlowCase>& i) {
      std::string n = i.param.schedule == "async-1f1b" ? "async1f1b" : i.param.schedule == "1f1b" ? "onefoneb" : "gpipe";
      return n + (i.param.stash ? "_stash" : "_nostash") + (i.param.recompute ? "_recompute" : "");
    });

}  // namespace
