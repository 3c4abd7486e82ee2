// The pipeline through the pipenag binary: exact resume at drain points, engines agreeing byte
// for byte, pipeline metrics and memory report, traces, the schedule command, and one clear error
// line for every kind of bad pipeline input.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <ostream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::StartsWith;

namespace {

using namespace pipenag::testutil;

class PipelineCli : public BinaryTest {
 protected:
  void SetUp() override {
    BinaryTest::SetUp();
    spit(dir_ / "pipe.toml", tiny_model_toml(4, 8, 4) +
                                 "[pipeline]\nstages = 2\nschedule = \"async-1f1b\"\nengine = \"threads\"\n");
  }

  // Trains with the test config plus `sets` into out.dir = dir_/name; asserts success.
  RunResult train(const std::string& name, const std::string& sets, const std::string& extra = "") {
    const RunResult r = run("train -q " + cfg() + " --set out.dir=" + (dir_ / name).string() + " " + sets +
                            " " + extra);
    EXPECT_EQ(r.code, 0) << r.err;
    return r;
  }
  std::string cfg() const { return "--config " + (dir_ / "pipe.toml").string(); }
  // The per-update lines (those with a training loss).
  std::vector<nlohmann::json> steps(const fs::path& out) {
    std::vector<nlohmann::json> v;
    for (auto& j : metrics(out))
      if (j.contains("loss")) v.push_back(j);
    return v;
  }
  void expect_same_checkpoint(const fs::path& a, const fs::path& b) {
    for (const char* f : {"model.safetensors", "optimizer.safetensors"}) {
      const std::string x = slurp(a / "checkpoint" / f), y = slurp(b / "checkpoint" / f);
      EXPECT_FALSE(x.empty()) << a / "checkpoint" / f;
      EXPECT_TRUE(x == y) << f << " differs between " << a << " and " << b;
    }
  }
  void expect_same_losses(const fs::path& a, const fs::path& b, size_t n) {
    const auto x = steps(a), y = steps(b);
    ASSERT_EQ(x.size(), n);
    ASSERT_EQ(y.size(), n);
    for (size_t i = 0; i < n; ++i)
      for (const char* k : {"step", "loss", "lr", "tokens"}) {
        EXPECT_EQ(x[i][k], y[i][k]) << "step line " << i << " key " << k;
      }
  }
};

// 1. Resume at a drain point equals the uninterrupted run.
struct ResumeCase {
  const char* schedule;
  int microbatches;
};

void PrintTo(const ResumeCase& c, std::ostream* os) { *os << c.schedule << " M=" << c.microbatches; }

class PipelineResume : public PipelineCli, public ::testing::WithParamInterface<ResumeCase> {};

TEST_P(PipelineResume, StopAtADrainPointAndResumeIsBitwise) {
  const ResumeCase c = GetParam();
  const std::string sets = std::string("--set pipeline.schedule=") + c.schedule +
                           " --set pipeline.microbatches=" + std::to_string(c.microbatches) +
                           " --set train.checkpoint_every=4";
  train("full", sets);
  train("split", sets, "--stop-at 4");
  const auto st = nlohmann::json::parse(slurp(dir_ / "split" / "checkpoint" / "state.json"));
  EXPECT_EQ(st["step"].get<int64_t>(), 4);
  EXPECT_EQ(steps(dir_ / "split").size(), 4u);
  train("split", sets, "--resume");
  expect_same_checkpoint(dir_ / "full", dir_ / "split");
  expect_same_losses(dir_ / "full", dir_ / "split", 8);
  // The evaluations agree too.
  std::vector<nlohmann::json> vf, vs;
  for (auto& j : metrics(dir_ / "full"))
    if (j.contains("val_loss")) vf.push_back(j);
  for (auto& j : metrics(dir_ / "split"))
    if (j.contains("val_loss")) vs.push_back(j);
  ASSERT_EQ(vf.size(), 2u);
  ASSERT_EQ(vs.size(), vf.size());
  for (size_t i = 0; i < vf.size(); ++i) EXPECT_EQ(vf[i]["val_loss"], vs[i]["val_loss"]) << i;
}

INSTANTIATE_TEST_SUITE_P(Schedules, PipelineResume,
                         ::testing::Values(ResumeCase{"async-1f1b", 1}, ResumeCase{"gpipe", 2}),
                         [](const ::testing::TestParamInfo<ResumeCase>& i) {
                           return std::string(i.param.schedule[0] == 'a' ? "async1f1b" : "gpipe");
                         });

// 2. The engine decides when, not what.
TEST_F(PipelineCli, SequentialAndThreadsEnginesWriteTheSameCheckpoint) {
  const std::string sets = "--set pipeline.stages=3 --set pipeline.schedule=async-1f1b --set train.steps=6";
  train("seq", sets + " --set pipeline.engine=sequential");
  train("thr", sets + " --set pipeline.engine=threads");
  expect_same_checkpoint(dir_ / "seq", dir_ / "thr");
  expect_same_losses(dir_ / "seq", dir_ / "thr", 6);
  // The segment lines say how their utilisation was obtained.
  std::set<std::string> kinds;
  for (const char* d : {"seq", "thr"})
    for (auto& j : metrics(dir_ / d))
      if (j.contains("utilization_kind")) kinds.insert(j["utilization_kind"].get<std::string>());
  EXPECT_EQ(kinds, (std::set<std::string>{"modelled", "measured"}));
}

// 3 and 4. Metrics, memory report and trace of a 3-stage run.
TEST_F(PipelineCli, MetricsMemoryReportAndTrace) {
  const int P = 3;
  const fs::path trace = dir_ / "trace.json";
  // Segments of 4 updates (evaluation every 4): long enough for stage 0's stash to reach
  // tau_0 = 2 versions (it needs 2 * tau_0 updates without a drain).
  train("out", "--set pipeline.stages=3 --set train.steps=8 --set train.eval_every=4",
        "--trace " + trace.string());
  const auto m = metrics(dir_ / "out");
  int step_lines = 0, segment_lines = 0;
  for (const auto& j : m) {
    EXPECT_TRUE(j.contains("tokens")) << j.dump();
    if (j.contains("loss")) {
      ++step_lines;
      ASSERT_TRUE(j.contains("utilization")) << j.dump();
      EXPECT_GE(j["utilization"].get<double>(), 0.0);
      EXPECT_LE(j["utilization"].get<double>(), 1.0);
    }
    if (j.contains("bubble")) {
      ++segment_lines;
      for (const char* k : {"utilization", "stage_busy_s", "stage_idle_s"}) ASSERT_TRUE(j.contains(k)) << k;
      EXPECT_NEAR(j["bubble"].get<double>(), 1.0 - j["utilization"].get<double>(), 1e-9);
      ASSERT_EQ(j["stage_busy_s"].size(), static_cast<size_t>(P));
      ASSERT_EQ(j["stage_idle_s"].size(), static_cast<size_t>(P));
      for (int k = 0; k < P; ++k) {
        EXPECT_GT(j["stage_busy_s"][k].get<double>(), 0.0);
        EXPECT_GE(j["stage_idle_s"][k].get<double>(), 0.0);
      }
    }
  }
  EXPECT_EQ(step_lines, 8);
  EXPECT_EQ(segment_lines, 2);  // two segments of 4 updates

  ASSERT_TRUE(fs::exists(dir_ / "out" / "memory.json"));
  const auto mem = nlohmann::json::parse(slurp(dir_ / "out" / "memory.json"));
  ASSERT_EQ(mem["stages"].size(), static_cast<size_t>(P));
  for (int k = 0; k < P; ++k) {
    const auto& s = mem["stages"][k];
    EXPECT_EQ(s["stage"].get<int>(), k);
    EXPECT_GT(s["weights"].get<int64_t>(), 0);
    EXPECT_EQ(s["gradients"], s["weights"]);
    EXPECT_EQ(s["optimizer"].get<int64_t>(), 2 * s["weights"].get<int64_t>());
    // Stashing on (the default) for async-1f1b: tau_k = P-1-k stashed versions.
    EXPECT_EQ(s["weight_versions"].get<int64_t>(), (P - 1 - k) * s["weights"].get<int64_t>()) << k;
    EXPECT_GT(s["activations"].get<int64_t>(), 0);
    int64_t sum = 0;  // every kind of memory listed adds up to the total
    for (auto it = s.begin(); it != s.end(); ++it)
      if (it.key() != "stage" && it.key() != "total") sum += it.value().get<int64_t>();
    EXPECT_EQ(s["total"].get<int64_t>(), sum);
  }

  // The trace: valid JSON, forward/backward/step events on every stage.
  ASSERT_TRUE(fs::exists(trace));
  const auto tj = nlohmann::json::parse(slurp(trace));
  ASSERT_TRUE(tj.contains("traceEvents"));
  std::vector<std::set<std::string>> cats(static_cast<size_t>(P));
  std::vector<int> forwards(static_cast<size_t>(P), 0);
  for (const auto& e : tj["traceEvents"]) {
    if (e["ph"] != "X") continue;
    const int tid = e["tid"].get<int>();
    ASSERT_GE(tid, 0);
    ASSERT_LT(tid, P);
    cats[static_cast<size_t>(tid)].insert(e["cat"].get<std::string>());
    if (e["cat"] == "forward") ++forwards[static_cast<size_t>(tid)];
    EXPECT_GE(e["dur"].get<double>(), 0.0);
  }
  for (int k = 0; k < P; ++k) {
    for (const char* c : {"forward", "backward", "step"})
      EXPECT_TRUE(cats[static_cast<size_t>(k)].count(c)) << "stage " << k << " has no " << c;
    EXPECT_EQ(forwards[static_cast<size_t>(k)], 8) << "stage " << k;  // one per update
  }

  const fs::path svg = dir_ / "trace.svg";
  const RunResult r = run("trace " + trace.string() + " --svg " + svg.string());
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("utilisation"));
  EXPECT_THAT(r.out, HasSubstr("| stage |"));
  for (int k = 0; k < P; ++k) EXPECT_THAT(r.out, HasSubstr("| " + std::to_string(k) + " |"));
  ASSERT_TRUE(fs::exists(svg));
  EXPECT_THAT(slurp(svg), StartsWith("<svg"));
  // A broken trace file is one error line.
  spit(dir_ / "bad.json", "{ nope");
  expect_error("trace " + (dir_ / "bad.json").string() + " --svg " + (dir_ / "bad.svg").string(), "bad.json");
}

// 5. The schedule command.
TEST_F(PipelineCli, ScheduleCommand) {
  const RunResult a = run("schedule --stages 4 --kind async-1f1b");
  ASSERT_EQ(a.code, 0) << a.err;
  for (int k = 0; k < 4; ++k)
    EXPECT_THAT(a.out, HasSubstr("stage " + std::to_string(k) + ": tau=" + std::to_string(3 - k))) << a.out;

  for (int M : {1, 4, 8}) {
    const RunResult g = run("schedule --stages 4 --kind gpipe --microbatches " + std::to_string(M));
    ASSERT_EQ(g.code, 0) << g.err;
    char want[64];
    std::snprintf(want, sizeof want, "utilisation %.1f%%", 100.0 * M / (M + 4 - 1));  // M/(M+P-1)
    EXPECT_THAT(g.out, HasSubstr(want)) << g.out;
    EXPECT_THAT(g.out, HasSubstr("stage 0: tau=0"));
  }
  EXPECT_THAT(run("schedule --stages 4 --kind gpipe --microbatches 4").out, HasSubstr("utilisation 57.1%"));

  const fs::path svg = dir_ / "sched.svg";
  const RunResult s = run("schedule --stages 3 --kind 1f1b --microbatches 3 --svg " + svg.string());
  ASSERT_EQ(s.code, 0) << s.err;
  ASSERT_TRUE(fs::exists(svg));
  EXPECT_THAT(slurp(svg), StartsWith("<svg"));

  expect_error("schedule --kind zigzag", "zigzag");
  expect_error("schedule --stages 0", "--stages");
  expect_error("schedule --kind gpipe --microbatches 0", "--microbatches");

  // Predictions: gpipe, 2 stages, 1 micro-batch, forward 100 ms, backward 200 ms: 600 ms an
  // update; a 50 ms link adds one forward and one backward crossing (100 ms an update).
  RunResult p = run("schedule --kind gpipe --stages 2 --microbatches 1 --updates 10 --stage-costs 100:200");
  ASSERT_EQ(p.code, 0) << p.err;
  EXPECT_THAT(p.out, HasSubstr("prediction: 10 updates in 6.000 s"));
  p = run("schedule --kind gpipe --stages 2 --microbatches 1 --updates 10 --stage-costs 100:200 --link-latency-ms 50");
  EXPECT_THAT(p.out, HasSubstr("prediction: 10 updates in 7.000 s"));
  // 1 MB at 8 Mbit/s takes 1 s a crossing.
  p = run("schedule --kind gpipe --stages 2 --microbatches 1 --updates 10 --stage-costs 100:200 "
          "--link-bandwidth-mbps 8 --message-mb 1");
  EXPECT_THAT(p.out, HasSubstr("prediction: 10 updates in 26.000 s"));
  expect_error("schedule --stages 3 --stage-costs 1:2,1:2", "2 entries for 3 stages");
  expect_error("schedule --stages 3 --stage-costs 1:x", "--stage-costs");
  expect_error("schedule --stages 3 --stage-costs 1:2 --link-latency-ms -5", "--link-latency-ms");
  expect_error("schedule --stages 3 --stage-costs 1:2 --link-bandwidth-mbps 1,2,3", "stage boundaries");
}

// 6. Bad pipeline inputs: one line, naming the problem.
TEST_F(PipelineCli, BadPipelineConfigs) {
  const std::string t = "train " + cfg();
  expect_error(t + " --set pipeline.stages=5", "pipeline.stages (5) is more than model.n_layer (4)");
  expect_error(t + " --set 'pipeline.partition=[1,1]'", "pipeline.partition sums to 2");
  expect_error(t + " --set 'pipeline.partition=[1,1,2]'", "pipeline.partition has 3 entries");
  expect_error(t + " --set 'pipeline.partition=[0,4]'", "pipeline.partition");
  expect_error(t + " --set 'pipeline.partition=[0,4]'", "at least one block");
  expect_error(t + " --set pipeline.microbatches=0", "pipeline.microbatches");
  expect_error(t + " --set pipeline.microbatches=2", "async-1f1b");
  expect_error(t + " --set pipeline.engine=mpi", "needs an MPI launcher");
  expect_error(t + " --set pipeline.extra_inflight=-1", "pipeline.extra_inflight must be between 0 and 10000000, got -1");
  expect_error(t + " --set pipeline.schedule=gpipe --set pipeline.extra_inflight=1", "applies to async-1f1b only");
  expect_error(t + " --set pipeline.schedule=async-1f1b --set pipeline.extra_inflight=1000000",
               "pipeline.extra_inflight = 1000000 needs about");
  expect_error(t + " --set pipeline.engine=foo", "foo");
  expect_error(t + " --set pipeline.schedule=zigzag", "zigzag");
  expect_error(t + " --set model.tie_embeddings=true", "tie_embeddings");
  expect_error(t + " --set pipeline.partition=balanced",
               "pipeline.partition must be an array of blocks per stage or \"auto\", got \"balanced\"");
  expect_error(t + " --set pipeline.partition=auto --set pipeline.stages=5",
               "pipeline.stages (5) is more than model.n_layer (4)");
  expect_error(t + " --set pipeline.stages=0", "pipeline.stages");
  // Nothing was trained by any of these.
  EXPECT_FALSE(fs::exists(dir_ / "out" / "checkpoint"));
}

// Another stage layout on resume reshards (issue 11): said, with the new delays; the run goes on.
TEST_F(PipelineCli, ResumingWithADifferentStageLayoutReshards) {
  train("out", "--set train.steps=2 --set train.eval_every=0");
  int steps_to = 2;
  for (const std::string& change : {std::string("--set 'pipeline.partition=[1,3]'"), std::string("--set pipeline.stages=4"),
                                    std::string("--set pipeline.stages=1")}) {
    steps_to += 2;
    const RunResult r = run("train " + cfg() + " --resume --set train.eval_every=0 --set train.steps=" +
                            std::to_string(steps_to) + " " + change);
    ASSERT_EQ(r.code, 0) << change << ": " << r.err;
    EXPECT_THAT(r.out + r.err, HasSubstr("resharded: ")) << change;
    EXPECT_THAT(r.out + r.err, HasSubstr("delays tau_k now")) << change;
  }
  EXPECT_EQ(steps(dir_ / "out").size(), 8u);
}

// 7. pipeline.partition = "auto": measures, says what it chose, records it; a resume keeps the
// checkpoint's cut, whatever the measurement would say now.
TEST_F(PipelineCli, AutoPartitionIsMeasuredPrintedAndKeptOnResume) {
  const RunResult r = run("train " + cfg() + " --set out.dir=" + (dir_ / "auto").string() +
                          " --set pipeline.partition=auto --set train.steps=2 --set train.eval_every=0");
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string all = r.out + r.err;
  EXPECT_THAT(all, HasSubstr("partition auto: blocks "));
  EXPECT_THAT(all, HasSubstr("measured stage costs"));
  const nlohmann::json state = nlohmann::json::parse(slurp(dir_ / "auto" / "checkpoint" / "state.json"));
  const auto blocks = state["pipeline"]["blocks_per_stage"].get<std::vector<int>>();
  ASSERT_EQ(blocks.size(), 2u);
  EXPECT_EQ(blocks[0] + blocks[1], 4);

  // A run with an explicit uneven cut, resumed with "auto": the checkpoint's cut is kept.
  train("pinned", "--set train.steps=2 --set train.eval_every=0 --set 'pipeline.partition=[1,3]'");
  const RunResult res = run("train " + cfg() + " --set out.dir=" + (dir_ / "pinned").string() +
                            " --resume --set pipeline.partition=auto --set train.steps=4 --set train.eval_every=0");
  ASSERT_EQ(res.code, 0) << res.err;
  EXPECT_THAT(res.out + res.err, HasSubstr("partition auto: blocks 1,3, the checkpoint's cut"));
  const nlohmann::json s2 = nlohmann::json::parse(slurp(dir_ / "pinned" / "checkpoint" / "state.json"));
  EXPECT_EQ(s2["pipeline"]["blocks_per_stage"], (std::vector<int>{1, 3}));
  EXPECT_EQ(steps(dir_ / "pinned").size(), 4u);
}

}  // namespace
