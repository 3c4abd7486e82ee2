// The method presets through the pipenag binary: `pipenag methods`, exact resume at a drain
// point for the methods with per-stage state (nesterov, pipemare, nesterov-nows, spectrain), what
// their checkpoints hold, refusing to resume with another optimizer, and one error line for an
// unknown method.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <map>
#include <ostream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.h"
#include "train/methods.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::StartsWith;

namespace {

using namespace pipenag::testutil;

// `word` occurs in `text` as a whole word ("adamw" is not found inside "nadamw").
bool has_word(const std::string& text, const std::string& word) {
  const auto is_word_char = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '-' || c == '_';
  };
  for (size_t p = text.find(word); p != std::string::npos; p = text.find(word, p + 1)) {
    const bool left = p == 0 || !is_word_char(text[p - 1]);
    const size_t e = p + word.size();
    const bool right = e == text.size() || !is_word_char(text[e]);
    if (left && right) return true;
  }
  return false;
}

// The JSON header of a safetensors file: tensor name -> {dtype, shape, data_offsets}.
nlohmann::json safetensors_header(const std::string& bytes) {
  if (bytes.size() < 8) return nlohmann::json::object();
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  if (8 + n > bytes.size()) return nlohmann::json::object();
  return nlohmann::json::parse(bytes.substr(8, n));
}

// The F32 values of tensor `name`.
std::vector<float> safetensors_f32(const std::string& bytes, const std::string& name) {
  const nlohmann::json h = safetensors_header(bytes);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  const auto& t = h.at(name);
  EXPECT_EQ(t.at("dtype"), "F32");
  const uint64_t a = t.at("data_offsets")[0].get<uint64_t>(), b = t.at("data_offsets")[1].get<uint64_t>();
  std::vector<float> v((b - a) / 4);
  std::memcpy(v.data(), bytes.data() + 8 + n + a, b - a);
  return v;
}

class MethodsCli : public BinaryTest {
 protected:
  // A config file with `method = "<method>"` (none if empty) and P stages.
  std::string write_config(const std::string& name, const std::string& method, int P) {
    const fs::path p = dir_ / (name + ".toml");
    spit(p, (method.empty() ? std::string() : "method = \"" + method + "\"\n") + tiny_model_toml(4, 6, 3) +
                "[pipeline]\nstages = " + std::to_string(P) + "\nengine = \"threads\"\n");
    return p.string();
  }

  RunResult train(const std::string& config, const std::string& name, const std::string& extra) {
    const RunResult r = run("train -q --config " + config + " --set out.dir=" + (dir_ / name).string() + " " + extra);
    EXPECT_EQ(r.code, 0) << r.err;
    return r;
  }
  std::vector<nlohmann::json> lines_with(const fs::path& out, const char* key) {
    std::vector<nlohmann::json> v;
    for (auto& j : metrics(out))
      if (j.contains(key)) v.push_back(j);
    return v;
  }
};

// 1. `pipenag methods`
TEST_F(MethodsCli, MethodsCommandListsEveryPresetWithItsSettings) {
  const RunResult r = run("methods");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << r.err;
  std::vector<std::string> lines;
  std::istringstream in(r.out);
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  ASSERT_GE(pipenag::methods().size(), 8u);
  for (const auto& m : pipenag::methods()) {
    const std::string head = std::string(m.name) + ": ";
    size_t i = 0;
    while (i < lines.size() && lines[i].rfind(head, 0) != 0) ++i;
    ASSERT_LT(i, lines.size()) << "no line for " << m.name << " in:\n" << r.out;
    EXPECT_THAT(lines[i], HasSubstr(std::string(m.description)));
    // Its settings follow on the next line: every key with the value it ends up with (settings
    // apply in order, so a key listed twice takes its last value).
    ASSERT_LT(i + 1, lines.size());
    std::map<std::string, std::string> effective;
    for (const auto& s : m.settings) {
      const auto eq = s.find('=');
      effective[std::string(s.substr(0, eq))] = std::string(s.substr(eq + 1));
    }
    std::map<std::string, std::string> shown;  // key -> its last value on the line
    std::istringstream toks(lines[i + 1]);
    for (std::string t; toks >> t;) {
      const auto eq = t.find('=');
      if (eq != std::string::npos) shown[t.substr(0, eq)] = t.substr(eq + 1);
    }
    for (const auto& [k, v] : effective) {
      ASSERT_TRUE(shown.count(k)) << m.name << " does not show " << k << ": " << lines[i + 1];
      EXPECT_EQ(shown[k], v) << m.name << " " << k;
    }
  }
  for (const char* name : {"nesterov", "nesterov-nows", "pipemare", "spectrain", "pipedream", "gpipe"})
    EXPECT_THAT(r.out, HasSubstr(std::string(name) + ": "));
  // The paper's method with what makes it the paper's method.
  EXPECT_THAT(r.out, HasSubstr("optim.name=\"nadamw\""));
  EXPECT_THAT(r.out, HasSubstr("optim.beta1=0.99"));
  // Where presets and defaults differ from the reference code, said under the list.
  EXPECT_THAT(r.out, HasSubstr("differ from the paper's reference code"));
  for (const char* what : {"the reference sums them", "use 10", "14% of", "nesterov-nows-rho (rho = 0.5)",
                           "pipeline.recompute = true", "drains the pipeline once per 1000"})
    EXPECT_THAT(r.out, HasSubstr(what));
}

// 2. Stop at a drain point and resume == the uninterrupted run, per method.
struct MethodCase {
  const char* method;
  int stages;
};
void PrintTo(const MethodCase& c, std::ostream* os) { *os << c.method << " P=" << c.stages; }

class MethodResume : public MethodsCli, public ::testing::WithParamInterface<MethodCase> {};

// mu_t = beta1 (1 - 0.5 * 0.96^(t psi)) (PAPER.md section 2), product over t = 1..steps.
double nadam_mu_product(double beta1, double psi, int64_t steps) {
  double p = 1.0;
  for (int64_t t = 1; t <= steps; ++t) p *= beta1 * (1.0 - 0.5 * std::pow(0.96, static_cast<double>(t) * psi));
  return p;
}

TEST_P(MethodResume, StopAndResumeIsBitwiseAndTheCheckpointHoldsTheMethodState) {
  const MethodCase c = GetParam();
  const std::string method = c.method;
  const int N = 3;  // checkpoint and stop after 3 of 6 updates
  const std::string cfg = write_config("m", method, c.stages);
  const std::string every = "--set train.checkpoint_every=" + std::to_string(N);
  train(cfg, "full", every);
  train(cfg, "split", every + " --stop-at " + std::to_string(N));
  {
    const auto st = nlohmann::json::parse(slurp(dir_ / "split" / "checkpoint" / "state.json"));
    EXPECT_EQ(st["step"].get<int64_t>(), N);
    EXPECT_EQ(lines_with(dir_ / "split", "loss").size(), static_cast<size_t>(N));
  }
  train(cfg, "split", every + " --resume");

  const fs::path a = dir_ / "full" / "checkpoint", b = dir_ / "split" / "checkpoint";
  for (const char* f : {"model.safetensors", "optimizer.safetensors"}) {
    const std::string x = slurp(a / f), y = slurp(b / f);
    EXPECT_FALSE(x.empty()) << a / f;
    EXPECT_TRUE(x == y) << f << " differs between the uninterrupted and the resumed run";
  }
  const auto lf = lines_with(dir_ / "full", "loss"), ls = lines_with(dir_ / "split", "loss");
  ASSERT_EQ(lf.size(), 6u);
  ASSERT_EQ(ls.size(), 6u);
  for (size_t i = 0; i < lf.size(); ++i)
    for (const char* k : {"step", "loss", "lr", "tokens"}) EXPECT_EQ(lf[i][k], ls[i][k]) << "step line " << i << " " << k;
  const auto vf = lines_with(dir_ / "full", "val_loss"), vs = lines_with(dir_ / "split", "val_loss");
  ASSERT_EQ(vf.size(), 2u);
  ASSERT_EQ(vs.size(), 2u);
  for (size_t i = 0; i < vf.size(); ++i) EXPECT_EQ(vf[i]["val_loss"], vs[i]["val_loss"]) << i;

  // What the checkpoint holds.
  const auto st = nlohmann::json::parse(slurp(a / "state.json"));
  EXPECT_EQ(st["config"]["method"], method);
  EXPECT_THAT(slurp(a / "config.toml"), HasSubstr("method = \"" + method + "\""));
  const std::string opt = slurp(a / "optimizer.safetensors");
  const nlohmann::json h = safetensors_header(opt);
  std::set<std::string> delta, update, exp_avg;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string k = it.key();
    if (k.rfind("pipemare_delta.", 0) == 0) delta.insert(k.substr(std::strlen("pipemare_delta.")));
    if (k.rfind("spectrain_update.", 0) == 0) update.insert(k.substr(std::strlen("spectrain_update.")));
    if (k.rfind("exp_avg.", 0) == 0) exp_avg.insert(k.substr(std::strlen("exp_avg.")));
  }
  ASSERT_FALSE(exp_avg.empty());
  if (method == "pipemare" || method == "spectrain") {
    const std::set<std::string>& corr = method == "pipemare" ? delta : update;
    EXPECT_TRUE((method == "pipemare" ? update : delta).empty());
    // Stages with a delay carry the state, the last stage (tau = 0: the head) none.
    EXPECT_TRUE(corr.count("transformer.wte.weight")) << "stage 0 has a delay";
    EXPECT_FALSE(corr.count("lm_head.weight")) << "the last stage has no delay";
    for (const auto& k : corr) EXPECT_TRUE(exp_avg.count(k)) << k;
    EXPECT_LT(corr.size(), exp_avg.size());
    // It moved with the weights.
    const auto v = safetensors_f32(opt, std::string(method == "pipemare" ? "pipemare_delta." : "spectrain_update.") +
                                            "transformer.wte.weight");
    double s = 0;
    for (float x : v) s += std::abs(x);
    EXPECT_GT(s, 0.0);
  } else {
    EXPECT_TRUE(delta.empty());
    EXPECT_TRUE(update.empty());
  }
  if (method == "nesterov" || method == "nesterov-nows") {
    EXPECT_EQ(st["optimizer"], "nadamw");
    EXPECT_EQ(st["optimizer_step"].get<int64_t>(), 6);
    ASSERT_TRUE(st["optimizer_scalars"].is_array());
    ASSERT_EQ(st["optimizer_scalars"].size(), static_cast<size_t>(c.stages));
    // beta1: 0.99 for nesterov; nesterov-nows: beta1_k = 0.9 + tau_k (0.99 - 0.9) / P.
    for (int k = 0; k < c.stages; ++k) {
      const auto& sc = st["optimizer_scalars"][static_cast<size_t>(k)];
      ASSERT_TRUE(sc.contains("mu_product")) << sc.dump();
      const int tau = c.stages - 1 - k;
      const double beta1 = method == "nesterov" ? 0.99 : 0.9 + tau * (0.99 - 0.9) / c.stages;
      const double want = nadam_mu_product(beta1, 0.004, 6);
      // Kept in float precision, as torch keeps it.
      EXPECT_NEAR(sc["mu_product"].get<double>(), want, 1e-6 * want) << "stage " << k;
    }
  } else {
    EXPECT_EQ(st["optimizer"], "adamw");
  }
}

INSTANTIATE_TEST_SUITE_P(Methods, MethodResume,
                         ::testing::Values(MethodCase{"nesterov", 2}, MethodCase{"pipemare", 3},
                                           MethodCase{"nesterov-nows", 3}, MethodCase{"spectrain", 2}),
                         [](const ::testing::TestParamInfo<MethodCase>& i) {
                           std::string n = i.param.method;
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

// 3. Resuming with another optimizer is refused.
TEST_F(MethodsCli, ResumingWithAnotherOptimizerIsRefused) {
  const std::string cfg = write_config("m", "nesterov", 2);
  train(cfg, "out", "--set train.steps=2 --set train.eval_every=0");
  const fs::path ck = dir_ / "out" / "checkpoint";
  const std::string before = slurp(ck / "model.safetensors");
  ASSERT_FALSE(before.empty());
  const std::string resume =
      "train -q --config " + cfg + " --set out.dir=" + (dir_ / "out").string() +
      " --resume --set train.steps=4 --set train.eval_every=0";
  for (const std::string& other : {std::string("--set optim.name=adamw"), std::string("--set method=pipedream")}) {
    SCOPED_TRACE(other);
    const std::string e = expect_error(resume + " " + other);
    EXPECT_TRUE(has_word(e, "nadamw")) << e;
    EXPECT_TRUE(has_word(e, "adamw")) << e;
    EXPECT_THAT(e, HasSubstr("optim.name"));
  }
  {
    const std::string e = expect_error(resume + " --set optim.name=sgd --set optim.beta1=0.9");
    EXPECT_TRUE(has_word(e, "nadamw")) << e;
    EXPECT_TRUE(has_word(e, "sgd")) << e;
  }
  EXPECT_EQ(slurp(ck / "model.safetensors"), before);
  EXPECT_EQ(lines_with(dir_ / "out", "loss").size(), 2u);
  // The other way round: trained with adamw (pipedream), resumed as nesterov.
  const std::string pd = write_config("pd", "pipedream", 2);
  train(pd, "pdout", "--set train.steps=2 --set train.eval_every=0");
  const std::string e = expect_error("train -q --config " + pd + " --set out.dir=" + (dir_ / "pdout").string() +
                                     " --resume --set train.steps=4 --set method=nesterov");
  EXPECT_TRUE(has_word(e, "nadamw")) << e;
  EXPECT_TRUE(has_word(e, "adamw")) << e;
  // The same optimizer resumes.
  const RunResult ok = run(resume);
  EXPECT_EQ(ok.code, 0) << ok.err;
  EXPECT_EQ(lines_with(dir_ / "out", "loss").size(), 4u);
}

// PipeMare's delta is state beside the optimizer's: switching it on or off at a resume would
// start it from nothing or silently drop it, so the checkpoint's correction must match.
TEST_F(MethodsCli, ResumingWithAnotherWeightCorrectionIsRefused) {
  const std::string pd = write_config("pd", "pipedream", 2);
  train(pd, "pdout", "--set train.steps=2 --set train.eval_every=0");
  const std::string to_pm = expect_error("train -q --config " + pd + " --set out.dir=" +
                                         (dir_ / "pdout").string() +
                                         " --resume --set train.steps=4 --set method=pipemare");
  EXPECT_THAT(to_pm, HasSubstr("weight correction none"));
  EXPECT_THAT(to_pm, HasSubstr("pipemare"));
  const std::string pm = write_config("pm", "pipemare", 2);
  train(pm, "pmout", "--set train.steps=2 --set train.eval_every=0");
  const std::string to_pd = expect_error("train -q --config " + pm + " --set out.dir=" +
                                         (dir_ / "pmout").string() +
                                         " --resume --set train.steps=4 --set method=pipedream");
  EXPECT_THAT(to_pd, HasSubstr("weight correction pipemare"));
  EXPECT_THAT(to_pd, HasSubstr("this run uses none"));
}

// Global clipping through the trainer: with a clip far below the gradient norm, a 2-stage gpipe
// run with train.clip_global matches the single-stage run (up to the order in which the norm is
// summed), while per-stage clipping gives another model. SGD without momentum, so the clipping
// factor scales the steps directly.
TEST_F(MethodsCli, GlobalClippingMatchesTheSingleStageRun) {
  const std::string cfg = write_config("m", "gpipe", 2);
  const std::string sets =
      "--set optim.name=sgd --set optim.beta1=0.0 --set optim.weight_decay=0.0 --set train.lr=5.0 "
      "--set train.clip=0.001 --set train.steps=3 --set train.eval_every=0 --set pipeline.microbatches=2";
  train(cfg, "init", sets + " --set train.steps=1 --set train.lr=0.0 --set pipeline.stages=1");
  train(cfg, "one", sets + " --set pipeline.stages=1");
  train(cfg, "global", sets + " --set train.clip_global=true");
  train(cfg, "local", sets);
  const auto load = [&](const std::string& name) {
    const std::string bytes = slurp(dir_ / name / "checkpoint" / "model.safetensors");
    std::vector<float> all;
    const nlohmann::json h = safetensors_header(bytes);
    for (auto it = h.begin(); it != h.end(); ++it) {
      if (it.key() == "__metadata__") continue;
      const auto v = safetensors_f32(bytes, it.key());
      all.insert(all.end(), v.begin(), v.end());  // nlohmann's object is ordered by name
    }
    return all;
  };
  const auto w0 = load("init"), one = load("one"), global = load("global"), local = load("local");
  ASSERT_FALSE(one.empty());
  ASSERT_EQ(global.size(), one.size());
  ASSERT_EQ(local.size(), one.size());
  ASSERT_EQ(w0.size(), one.size());
  const auto dist = [](const std::vector<float>& a, const std::vector<float>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); ++i) s += (double(a[i]) - double(b[i])) * (double(a[i]) - double(b[i]));
    return std::sqrt(s);
  };
  const double moved = dist(one, w0);
  ASSERT_GT(moved, 0.0);
  EXPECT_LT(dist(global, one), 1e-6 * moved);
  EXPECT_GT(dist(local, one), 1e-2 * moved);
  // The same first loss: it is computed before any clipping.
  const auto lo = lines_with(dir_ / "one", "loss"), lg = lines_with(dir_ / "global", "loss");
  ASSERT_EQ(lo.size(), 3u);
  ASSERT_EQ(lg.size(), 3u);
  EXPECT_NEAR(lg[0]["loss"].get<double>(), lo[0]["loss"].get<double>(), 1e-6);
  // The P = 1 run's norm is far above the clip, so clipping did trigger.
  ASSERT_TRUE(lo[0].contains("grad_norm"));
  EXPECT_GT(lo[0]["grad_norm"].get<double>(), 0.01);
}

// 4. Unknown method: one line, non-zero exit, nothing trained.
TEST_F(MethodsCli, UnknownMethodIsOneErrorLine) {
  const std::string cfg = write_config("m", "", 2);
  for (const std::string& args : {"train -q --config " + cfg + " --set method=bogus",
                                  "train -q --config " + write_config("bad", "bogus", 2)}) {
    SCOPED_TRACE(args);
    const std::string e = expect_error(args);
    EXPECT_THAT(e, HasSubstr("unknown method 'bogus'"));
    for (const auto& m : pipenag::methods()) EXPECT_THAT(e, HasSubstr(std::string(m.name)));
  }
  EXPECT_THAT(expect_error("train -q --config " + write_config("bad", "bogus", 2)), HasSubstr("bad.toml"));
  spit(dir_ / "num.toml", "method = 3\n");
  EXPECT_THAT(expect_error("train -q --config " + (dir_ / "num.toml").string()), HasSubstr("method must be a string"));
  EXPECT_FALSE(fs::exists(dir_ / "out"));
}

}  // namespace
