// Runs that outgrow one layout or one network (issue 11), on every engine: resharding a
// checkpoint onto another stage count or partition moves every tensor by name; emulated link
// latency, bandwidth and slow stages change when things happen, never a bit of the result; bad
// settings are one line each.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "test_util.h"
#include "train/checkpoint.h"
#include "train/config_file.h"
#include "pipeline/schedule.h"
#include "train/trainer.h"
#include "util/error.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;

namespace {

using namespace pipenag;
using namespace pipenag::testutil;

class Network : public BinaryTest {
 protected:
  void SetUp() override {
    BinaryTest::SetUp();
    spit(dir_ / "tiny.toml", tiny_model_toml(4, 12, 6) + "[pipeline]\nstages = 2\nschedule = \"async-1f1b\"\n");
  }
  std::string cfg() const { return "--config " + (dir_ / "tiny.toml").string(); }
  static std::map<std::string, std::string> tensors(const fs::path& file) {
    std::map<std::string, std::string> out;
    const SafetensorsFile f = SafetensorsFile::open(file.string());
    for (const auto& n : f.names())
      out[n] = std::string(static_cast<const char*>(f.data(n)), f.info(n).byte_size);
    return out;
  }
};

TEST_F(Network, ReshardingMovesWeightsAndOptimizerStateByName) {
  const fs::path out = dir_ / "r";
  ASSERT_EQ(run("train -q " + cfg() + " --set pipeline.engine=threads --stop-at 5 --set out.dir=" + out.string()).code, 0);
  const fs::path ck = out / "checkpoint";
  const auto model = tensors(ck / "model.safetensors"), optim = tensors(ck / "optimizer.safetensors");
  for (int P : {4, 3, 1}) {
    Config c = read_checkpoint_config(ck.string());
    c.pipeline.stages = P;
    c.pipeline.partition = Partition();
    validate(c);
    auto workers = make_workers(c);
    std::vector<StagePart> parts;
    for (auto& w : workers) parts.push_back({&w->stage(), &w->optimizer(), w->correction_state(), w.get()});
    TrainState st;
    FlowState flow;
    load_checkpoint(ck.string(), c, parts, &st, &flow);
    EXPECT_EQ(st.step, 5);
    EXPECT_FALSE(flow.mid_flow) << "a resharded pipeline refills";
    EXPECT_THAT(flow.reshard, HasSubstr("2 stages with blocks [2, 2] -> " + std::to_string(P)));
    size_t checked = 0;
    for (auto& w : workers) {
      const auto states = w->optimizer().state_tensors();
      ASSERT_FALSE(states.empty());
      for (const auto& p : w->stage().param_table()) {
        const std::string got(reinterpret_cast<const char*>(w->stage().params() + p.offset), p.numel * sizeof(float));
        EXPECT_TRUE(got == model.at(p.name)) << "P=" << P << ": " << p.name;
        for (const auto& [state, buf] : states) {
          const std::string g(reinterpret_cast<const char*>(buf->data() + p.offset), p.numel * sizeof(float));
          EXPECT_TRUE(g == optim.at(state + "." + p.name)) << "P=" << P << ": " << state << "." << p.name;
        }
        ++checked;
      }
    }
    EXPECT_EQ(checked, model.size()) << "every tensor lands on exactly one new stage";
  }
  // Through the CLI: 2 -> 4 stages (sequential engine), then 4 -> 1, each reporting the delays.
  RunResult r = run("train " + cfg() + " --resume --set pipeline.stages=4 --set pipeline.engine=sequential --set train.steps=9 "
                    "--set out.dir=" + out.string());
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out + r.err, HasSubstr("resharded: 2 stages with blocks [2, 2] -> 4 with [1, 1, 1, 1]"));
  EXPECT_THAT(r.out + r.err, HasSubstr("delays tau_k now 3, 2, 1, 0"));
  r = run("train " + cfg() + " --resume --set pipeline.stages=1 --set train.steps=12 --set out.dir=" + out.string());
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out + r.err, HasSubstr("4 stages with blocks [1, 1, 1, 1] -> 1 with [4]"));
  EXPECT_THAT(r.out, HasSubstr("done: 12 steps"));
}

TEST_F(Network, EmulatedLinksAndSlowStagesChangeTimingNeverBits) {
  const auto timed = [&](const std::string& args) {
    const auto t0 = std::chrono::steady_clock::now();
    const RunResult r = run(args);
    EXPECT_EQ(r.code, 0) << args << ": " << r.err;
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  const std::string plain = (dir_ / "plain").string(), slow = (dir_ / "slow").string(), seq = (dir_ / "seq").string();
  timed("train -q " + cfg() + " --set pipeline.engine=threads --set out.dir=" + plain);
  // 30 ms per message: with two micro-batches in flight on stage 0, each round trip (a forward
  // there, its gradient back: 2 x 30 ms) completes two updates, so 12 take at least 12 x 30 ms.
  const double t = timed("train -q " + cfg() +
                         " --set pipeline.engine=threads --set pipeline.link_latency_ms=30 "
                         "--set pipeline.link_bandwidth_mbps=[100] --set pipeline.stage_slowdown=[1,2] --set out.dir=" + slow);
  EXPECT_GT(t, 12 * 0.030) << "the emulated latency did not delay the run";
  // The sequential engine delays messages on its modelled timeline only (no real waiting), so a
  // whole second per message costs nothing here.
  timed("train -q " + cfg() + " --set pipeline.engine=sequential --set pipeline.link_latency_ms=1000 --set out.dir=" + seq);
  const auto a = tensors(fs::path(plain) / "checkpoint" / "model.safetensors");
  for (const std::string& other : {slow, seq}) {
    const auto b = tensors(fs::path(other) / "checkpoint" / "model.safetensors");
    ASSERT_EQ(a.size(), b.size());
    for (const auto& [name, bytes] : a) EXPECT_TRUE(bytes == b.at(name)) << other << ": " << name;
    EXPECT_EQ(tensors(fs::path(plain) / "checkpoint" / "optimizer.safetensors"),
              tensors(fs::path(other) / "checkpoint" / "optimizer.safetensors"));
  }
  // The modelled utilisation of the sequential engine sees the latency.
  double util_plain = -1, util_seq = -1;
  for (const auto& j : metrics(plain)) if (j.contains("bubble")) util_plain = j["utilization"];
  for (const auto& j : metrics(seq)) if (j.contains("bubble")) util_seq = j["utilization"];
  EXPECT_GT(util_plain, 0);
  EXPECT_LT(util_seq, 0.2) << "1 s links idle the stages (modelled) whatever the speed of this machine";
}

TEST_F(Network, BadEmulationSettingsAreOneLine) {
  expect_error("train " + cfg() + " --set pipeline.link_latency_ms=-1", "pipeline.link_latency_ms must be >= 0, got -1");
  expect_error("train " + cfg() + " --set pipeline.link_bandwidth_mbps=[-5]", "pipeline.link_bandwidth_mbps must be >= 0");
  expect_error("train " + cfg() + " --set pipeline.stage_slowdown=0.5", "pipeline.stage_slowdown must be >= 1, got 0.5");
  expect_error("train " + cfg() + " --set pipeline.stage_slowdown=[1,2,3]",
               "pipeline.stage_slowdown has 3 values: give one, or one per stage (2 with pipeline.stages = 2)");
  expect_error("train " + cfg() + " --set pipeline.link_latency_ms=[1,2]",
               "pipeline.link_latency_ms has 2 values: give one, or one per stage boundary (1");
  expect_error("train " + cfg() + " --set pipeline.peer_timeout_s=0", "pipeline.peer_timeout_s must be > 0");
  expect_error("train " + cfg() + " --set pipeline.link_latency_ms=[]", "must not be an empty array");
  expect_error("train " + cfg() + " --set pipeline.link_latency_ms=fast", "must be a number or an array of numbers");
}

}  // namespace

namespace {

using namespace pipenag;

// pipeline.extra_inflight = E: 1+E micro-batches in flight across every boundary of async-1f1b,
// so every backward enters an update tau_k = (P-1-k)(1+E) updates after its forward's weights.
TEST(ExtraInflight, RaisesEveryStagesDelayAndSlotsByE) {
  for (int P : {2, 3}) {
    for (int E : {0, 1, 3}) {
      const Schedule s = make_schedule(ScheduleKind::Async1F1B, P, 1, 24, E);
      validate_schedule(s);
      const Versions v = schedule_versions(s);
      const std::vector<int> slots = max_in_flight(s);
      for (int k = 0; k < P; ++k) {
        const int tau = (P - 1 - k) * (1 + E);
        EXPECT_EQ(stage_delay(ScheduleKind::Async1F1B, P, k, E), tau);
        EXPECT_EQ(slots[static_cast<size_t>(k)], tau + 1) << "P=" << P << " E=" << E << " k=" << k;
        for (int64_t mb = (P - 1) * (1 + E) + 1; mb < 24 - (P - 1) * (1 + E) - 1; ++mb)
          EXPECT_EQ(v.backward[static_cast<size_t>(k)][static_cast<size_t>(mb)] -
                        v.forward[static_cast<size_t>(k)][static_cast<size_t>(mb)],
                    tau)
              << "P=" << P << " E=" << E << " k=" << k << " mb=" << mb;
      }
    }
  }
  EXPECT_THROW(make_schedule(ScheduleKind::GPipe, 2, 2, 4, 1), Error);
}

}  // namespace
