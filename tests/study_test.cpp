// `pipenag study`: a grid of ordinary runs with a report; killed and rerun it redoes nothing that
// had finished and gives the same report; bad study files and folders get one line.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <map>
#include <sstream>
#include <string>

#include "study/study.h"
#include "train/config_file.h"
#include "test_util.h"

namespace pipenag::testutil {
namespace {

using ::testing::HasSubstr;

class Study : public BinaryTest {
 protected:
  // A tiny grid: gpipe and nesterov x 3 learning rates x 1 seed at P = 2, and a depth sweep to
  // P = 4 for nesterov: 7 runs of 16 updates (gpipe: 4 of 4 micro-batches).
  std::string study_toml(const std::string& grid_extra = "", const std::string& study_lrs = "[1e-3, 3e-3, 1e-2]") const {
    return "[model]\nn_layer = 4\nn_embd = 32\nn_head = 2\nblock_size = 32\nvocab_size = 256\n"
           "[train]\nsteps = 16\nbatch_size = 4\nwarmup_steps = 2\neval_every = 8\neval_batches = 2\n"
           "[data]\ninput = \"" + (dir_ / "corpus").string() + "\"\nval_fraction = 0.2\n"
           "[study]\nmethods = [\"gpipe\", \"nesterov\"]\nlrs = " + study_lrs +
           "\nseeds = [1]\nstages = 2\ndepths = [2, 4]\ndepth_methods = [\"nesterov\"]\njobs = 1\n" + grid_extra;
  }
  // `toml` with its first `from` replaced by `to` (a test failure when `from` is not there).
  static std::string replaced(std::string toml, const std::string& from, const std::string& to) {
    const auto at = toml.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) toml.replace(at, from.size(), to);
    return toml;
  }
  std::string study(const fs::path& file, const fs::path& out, const std::string& extra = "") {
    return "study -q -c " + file.string() + " --out " + out.string() + " " + extra;
  }
  // results.csv without the timing columns (wall_s, tokens_per_s).
  static std::string timeless_csv(const std::string& csv) {
    std::istringstream in(csv);
    std::string out;
    for (std::string line; std::getline(in, line);) {
      std::vector<std::string> cols;
      std::stringstream ls(line);
      for (std::string c; std::getline(ls, c, ',');) cols.push_back(c);
      for (size_t i = 0; i < cols.size(); ++i)
        if (i != 11 && i != 12) out += cols[i] + ",";
      out += "\n";
    }
    return out;
  }
  // summary.md without its first paragraph (which states the training time).
  static std::string timeless_summary(const std::string& md) {
    std::istringstream in(md);
    std::string out;
    for (std::string line; std::getline(in, line);)
      if (line.rfind("Grid:", 0) != 0) out += line + "\n";
    return out;
  }
};

TEST_F(Study, KilledAndRerunRedoesNothingFinishedAndGivesTheSameReport) {
  spit(dir_ / "study.toml", study_toml());
  // The uninterrupted study.
  const RunResult a = run(study(dir_ / "study.toml", dir_ / "a"));
  ASSERT_EQ(a.code, 0) << a.err;
  const std::string csv_a = slurp(dir_ / "a/report/results.csv");
  EXPECT_EQ(std::count(csv_a.begin(), csv_a.end(), '\n'), 8) << csv_a;  // header + 6 grid runs + 1 sweep run
  EXPECT_THAT(csv_a, HasSubstr("nesterov_lr"));
  EXPECT_THAT(csv_a, HasSubstr("_P4,nesterov,"));
  // Equal tokens: gpipe (4 micro-batches per update) makes 4 updates, nesterov 16.
  EXPECT_THAT(csv_a, HasSubstr(",2,4,2048,"));
  EXPECT_THAT(csv_a, HasSubstr(",2,16,2048,"));
  const std::string summary_a = slurp(dir_ / "a/report/summary.md");
  EXPECT_THAT(summary_a, HasSubstr("| 1 |"));
  EXPECT_THAT(summary_a, HasSubstr("reference"));
  for (const char* f : {"curves.gp", "lr.gp", "depth.gp", "curves.dat"}) EXPECT_TRUE(fs::exists(dir_ / "a/report" / f)) << f;

  // The same study, killed with SIGKILL once two runs have finished, then rerun. While it runs,
  // a second study on its folder is refused.
  const std::string bin = PIPENAG_BINARY;
  const std::string cmd = "bash -c '" + bin + " " + study(dir_ / "study.toml", dir_ / "b") +
                          " & p=$!; while [ $(ls " + (dir_ / "b/results").string() +
                          " 2>/dev/null | wc -l) -lt 2 ]; do sleep 0.02; done; " + bin + " " +
                          study(dir_ / "study.toml", dir_ / "b") + " 2>" + (dir_ / "second.err").string() +
                          "; echo $? >" + (dir_ / "second.code").string() + "; kill -9 $p; wait $p; echo $?'";
  const RunResult killed = run_command(cmd, dir_);
  EXPECT_EQ(killed.out, "137\n") << killed.err;
  EXPECT_EQ(slurp(dir_ / "second.code"), "1\n");
  const std::string second = slurp(dir_ / "second.err");
  EXPECT_THAT(second, HasSubstr("in use by another pipenag process")) << second;
  EXPECT_EQ(std::count(second.begin(), second.end(), '\n'), 1) << second;
  std::map<std::string, std::pair<std::string, std::string>> finished;  // id -> (result, log)
  for (const auto& e : fs::directory_iterator(dir_ / "b/results")) {
    const std::string id = e.path().stem().string();
    finished[id] = {slurp(e.path()), slurp(dir_ / "b/logs" / (id + ".log"))};
  }
  ASSERT_GE(finished.size(), 2u);
  ASSERT_LT(finished.size(), 7u) << "the study finished before it was killed";
  // Its runs got SIGTERM from the dying study, checkpointed and stopped; the rerun waits for any
  // that still hold their folder.
  const RunResult b = run(study(dir_ / "study.toml", dir_ / "b"));
  ASSERT_EQ(b.code, 0) << b.err;
  for (const auto& [id, content] : finished) {
    EXPECT_EQ(slurp(dir_ / "b/results" / (id + ".json")), content.first) << id;
    EXPECT_EQ(slurp(dir_ / "b/logs" / (id + ".log")), content.second) << id << " was started again";
  }
  EXPECT_EQ(timeless_csv(slurp(dir_ / "b/report/results.csv")), timeless_csv(csv_a));
  EXPECT_EQ(timeless_summary(slurp(dir_ / "b/report/summary.md")), timeless_summary(summary_a));

  // A finished study run again starts nothing and writes the same report.
  const auto logs_before = slurp(dir_ / "b/logs" / "gpipe_lr0.001_s1_P2.log");
  const RunResult again = run(study(dir_ / "study.toml", dir_ / "b"));
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_EQ(slurp(dir_ / "b/logs" / "gpipe_lr0.001_s1_P2.log"), logs_before);
  EXPECT_EQ(timeless_csv(slurp(dir_ / "b/report/results.csv")), timeless_csv(csv_a));
  // Each run is an ordinary run: its checkpoint evaluates on its own.
  const RunResult ev = run("eval --checkpoint " + (dir_ / "b/runs/nesterov_lr0.003_s1_P2/checkpoint").string());
  EXPECT_EQ(ev.code, 0) << ev.err;
  EXPECT_THAT(ev.out, HasSubstr("val loss"));

  // Bad input against an existing study: one line, non-zero, the earlier results untouched.
  const std::string report_before = slurp(dir_ / "b/report/summary.md");
  spit(dir_ / "other.toml", study_toml("", "[1e-3, 3e-3, 2e-2]"));
  EXPECT_THAT(expect_error(study(dir_ / "other.toml", dir_ / "b")), HasSubstr("study.lrs"));
  spit(dir_ / "other.toml", replaced(study_toml(), "steps = 16", "steps = 17"));
  EXPECT_THAT(expect_error(study(dir_ / "other.toml", dir_ / "b")), HasSubstr("config.train.steps"));
  // A full disk while the report is written (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG).
  const RunResult full = run_command("bash -c \"trap '' XFSZ; ulimit -f 1; exec " + bin + " " +
                                         study(dir_ / "study.toml", dir_ / "b") + "\"",
                                     dir_);
  EXPECT_NE(full.code, 0);
  EXPECT_LT(full.code, 128);
  EXPECT_EQ(full.err.rfind("pipenag: ", 0), 0u) << full.err;
  EXPECT_EQ(std::count(full.err.begin(), full.err.end(), '\n'), 1) << full.err;
  EXPECT_THAT(full.err, HasSubstr("too large"));
  EXPECT_EQ(slurp(dir_ / "b/report/summary.md"), report_before);
  for (const auto& [id, content] : finished) EXPECT_EQ(slurp(dir_ / "b/results" / (id + ".json")), content.first);

  if (std::getenv("PIPENAG_SANITIZED")) return;  // CI time: the release run checks extending a study
  // A wider grid extends the study: only the new learning rate's runs start.
  spit(dir_ / "wider.toml", study_toml("", "[1e-3, 3e-3, 1e-2, 3e-4]"));
  const size_t logs_before_wider = std::distance(fs::directory_iterator(dir_ / "b/logs"), fs::directory_iterator{});
  const RunResult wider = run(study(dir_ / "wider.toml", dir_ / "b"));
  ASSERT_EQ(wider.code, 0) << wider.err;
  EXPECT_EQ(slurp(dir_ / "b/logs" / "gpipe_lr0.001_s1_P2.log"), logs_before);
  EXPECT_TRUE(fs::exists(dir_ / "b/results/gpipe_lr0.0003_s1_P2.json"));
  EXPECT_TRUE(fs::exists(dir_ / "b/results/nesterov_lr0.0003_s1_P2.json"));
  const size_t logs_after_wider = std::distance(fs::directory_iterator(dir_ / "b/logs"), fs::directory_iterator{});
  // Two new grid runs, and one more sweep run if nesterov's best learning rate moved.
  EXPECT_GE(logs_after_wider, logs_before_wider + 2);
  EXPECT_LE(logs_after_wider, logs_before_wider + 3);
  EXPECT_THAT(slurp(dir_ / "b/report/results.csv"), HasSubstr("gpipe_lr0.0003_s1_P2"));
}

// Regression (a CI failure): a run of a killed study still holds its folder and appends to the
// run's log after the new start failed on the lock; the study must still see the lock message,
// wait and retry, not stop on the other process's last line.
TEST_F(Study, RetriesARunWhoseFolderAnotherProcessHoldsWhileItWritesTheLog) {
  const std::string toml =
      replaced(replaced(study_toml("", "[1e-3]"), "methods = [\"gpipe\", \"nesterov\"]", "methods = [\"nesterov\"]"),
               "depths = [2, 4]\ndepth_methods = [\"nesterov\"]\n", "");
  ASSERT_FALSE(HasFailure());
  spit(dir_ / "one.toml", toml);
  const std::string id = "nesterov_lr0.001_s1_P2";
  const fs::path out = dir_ / "held";
  // The study once to its end, then its run made unfinished again.
  const RunResult first = run(study(dir_ / "one.toml", out));
  ASSERT_EQ(first.code, 0) << first.err;
  ASSERT_TRUE(fs::remove(out / "results" / (id + ".json")));
  const std::string log = (out / "logs" / (id + ".log")).string();
  // The holder: locks the run folder (the study starts once it holds it) and appends a line to
  // the run's log every 20 ms until the study's run has failed on the lock twice (each failure a
  // chance for the old misreading; at most 30 s), then for 0.5 s more.
  const std::string flag = (dir_ / "holding").string();
  const std::string noise = "echo 'pipenag: another process was here' >> " + log;
  spit(dir_ / "holder.sh", "touch " + flag + "\nfor i in $(seq 1500); do " + noise +
                               "; [ $(grep -c 'is in use by another' " + log +
                               ") -ge 2 ] && break; sleep 0.02; done\n" + "for i in $(seq 25); do " + noise +
                               "; sleep 0.02; done\n");
  // The study starts once the holder holds the lock (at most 30 s; the holder gone: exit 9).
  const std::string cmd = "bash -c 'flock " + (out / "runs" / id / "pipenag.lock").string() + " bash " +
                          (dir_ / "holder.sh").string() + " & h=$!; for i in $(seq 3000); do [ -e " + flag +
                          " ] && break; kill -0 $h 2>/dev/null || exit 9; sleep 0.01; done; " + PIPENAG_BINARY +
                          " " + study(dir_ / "one.toml", out) + "; echo $?; wait'";
  const RunResult r = run_command(cmd, dir_);
  EXPECT_EQ(r.out, "0\n") << r.err;
  EXPECT_TRUE(fs::exists(out / "results" / (id + ".json")));
  EXPECT_THAT(slurp(log), HasSubstr("is in use by another pipenag process"));
  EXPECT_THAT(slurp(log), HasSubstr("another process was here"));
}

TEST_F(Study, BadStudyFilesGetOneLine) {
  const auto bad = [&](const std::string& toml, const std::string& needle) {
    spit(dir_ / "bad.toml", toml);
    const std::string err = expect_error(study(dir_ / "bad.toml", dir_ / "out"), needle);
    EXPECT_FALSE(fs::exists(dir_ / "out/runs")) << err;
  };
  const std::string base = study_toml();
  const auto with = [&](const std::string& from, const std::string& to) { return replaced(base, from, to); };
  bad(with("[\"gpipe\", \"nesterov\"]", "[\"gpipe\", \"nesterov-fast\"]"), "unknown method 'nesterov-fast'");
  bad(with("methods = [\"gpipe\", \"nesterov\"]", "methods = []"), "study.methods is empty");
  bad(with("lrs = [1e-3, 3e-3, 1e-2]", "lrs = []"), "study.lrs is empty");
  bad(with("lrs = [1e-3, 3e-3, 1e-2]", "lrs = [1e-3, 0.0, 1e-2]"), "must be > 0");
  bad(with("lrs = [1e-3, 3e-3, 1e-2]", "lrs = [1e-3, -3e-3, 1e-2]"), "must be > 0");
  bad(with("depths = [2, 4]", "depths = [2, 8]"), "8 stages need at least 8 blocks, model.n_layer is 4");
  bad(with("stages = 2", "stages = 6"), "6 stages need at least 6 blocks");
  bad(with("depth_methods = [\"nesterov\"]", "depth_methods = [\"pipedream\"]"), "not in study.methods");
  bad(with("jobs = 1", "jobs = 1\nfoo = 2"), "unknown key study.foo");
  bad(with("jobs = 1", "jobs = 4096"), "study.jobs");
  bad(with("seeds = [1]", "seeds = [1, 1]"), "study.seeds lists a value twice");
  bad("[model]\nn_layer = 2\n", "no [study] table");
  bad(with("eval_every = 8", "eval_every = 0"), "train.eval_every must be > 0");
  bad(with("lrs = [1e-3, 3e-3, 1e-2]", "lrs = [1e-3, 1.0000001e-3, 1e-2]"), "appears twice");
  bad(with("jobs = 1", "jobs = 1\nvariants = { \"../x\" = { method = \"nesterov\" } }"), "may only use letters");
  bad(with("[train]", "[train]\nlr_typo = 1"), "lr_typo");
  // More runs at once than cores.
  spit(dir_ / "ok.toml", base);
  expect_error(study(dir_ / "ok.toml", dir_ / "out", "--jobs 100000"), "oversubscribe");
  EXPECT_FALSE(fs::exists(dir_ / "out/runs"));
}

// The shipped study and the paper's setup load and say what they should.
TEST(StudyConfigs, StudySmallAndPaper134m) {
  const study::Spec s = study::load_spec(std::string(PIPENAG_SOURCE_DIR) + "/configs/study-small.toml");
  EXPECT_EQ(s.grid.methods.size(), 10u);
  for (const char* m : {"gpipe", "pipedream", "pipedream-lr", "pipemare", "spectrain", "nesterov", "nesterov-nows",
                        "nesterov-nows-rho", "nesterov-eq10"})
    EXPECT_NE(std::find(s.grid.methods.begin(), s.grid.methods.end(), m), s.grid.methods.end()) << m;
  EXPECT_GE(s.grid.lrs.size(), 3u);
  EXPECT_GE(s.grid.seeds.size(), 2u);
  EXPECT_EQ(s.grid.stages, 8);
  EXPECT_EQ(s.grid.depths, (std::vector<int>{2, 4, 8, 16}));
  EXPECT_GE(s.base.model.n_layer, 16);
  EXPECT_GE(s.base.train.steps, 2000);
  const auto runs = study::grid_runs(s, "x");
  EXPECT_EQ(runs.size(), s.grid.methods.size() * s.grid.lrs.size() * s.grid.seeds.size());
  // Equal tokens: gpipe's updates and warm-up are divided by its 4 micro-batches.
  for (const auto& r : runs) {
    EXPECT_EQ(r.cfg.train.steps * r.tokens_per_update, s.base.train.steps * s.base.train.batch_size * s.base.model.block_size) << r.id;
    if (r.method == "gpipe") {
      EXPECT_EQ(r.cfg.train.steps, s.base.train.steps / 4);
      EXPECT_EQ(r.cfg.train.warmup_steps, s.base.train.warmup_steps / 4);
    }
    if (r.method == "nesterov-nows-keep") {
      EXPECT_FALSE(r.cfg.pipeline.recompute);
    }
    if (r.method == "nesterov-nows") {
      EXPECT_TRUE(r.cfg.pipeline.recompute);
    }
  }
  EXPECT_EQ(study::sweep_runs(s, "x", {{"gpipe", 1e-3}, {"pipedream", 1e-3}, {"nesterov", 1e-3}}).size(), 18u);

  const Config p = load_config(std::string(PIPENAG_SOURCE_DIR) + "/configs/paper-134m.toml", {});
  EXPECT_EQ(p.model.n_layer, 8);
  EXPECT_EQ(p.model.n_embd, 768);
  EXPECT_EQ(p.model.n_head, 12);
  EXPECT_EQ(p.model.block_size, 512);
  EXPECT_EQ(p.model.vocab_size, 50257);
  EXPECT_EQ(p.pipeline.stages, 8);
  EXPECT_EQ(p.pipeline.schedule, "async-1f1b");
  EXPECT_TRUE(p.pipeline.stash);
  EXPECT_EQ(p.optim.name, "nadamw");
  EXPECT_EQ(p.optim.beta1, 0.99);
  EXPECT_EQ(p.train.batch_size, 8);
  EXPECT_EQ(p.train.lr, 3e-4);
  EXPECT_EQ(p.train.warmup_steps, 3000);
  EXPECT_EQ(p.train.steps, 50000);
  EXPECT_EQ(p.train.min_lr_ratio, 0.1);
  EXPECT_EQ(p.train.clip, 10.0);
  EXPECT_FALSE(p.train.clip_global);
  EXPECT_EQ(p.optim.weight_decay, 0.01);
}

// A run's metrics with non-finite numbers (written as null) and a torn last line are read, not a crash.
TEST(StudyReport, NullNumbersAndTornLinesInMetricsAreRead) {
  const fs::path d = fresh_test_dir("study_metrics");
  spit(d / "metrics.jsonl",
       "{\"step\":1,\"tokens\":128,\"loss\":5.0,\"lr\":0.001,\"tokens_per_s\":1000.0}\n"
       "{\"step\":2,\"tokens\":256,\"loss\":null,\"lr\":0.001,\"tokens_per_s\":null}\n"
       "{\"step\":2,\"tokens\":256,\"stage_updates\":2,\"stage_clipped\":[1,null],\"stage_lr\":[0.001,0.001]}\n"
       "{\"step\":2,\"tokens\":256,\"val_loss\":null,\"val_ppl\":null}\n"
       "{\"step\":3,\"tok");
  study::Run run;
  run.id = "x";
  run.method = "nesterov";
  run.stages = 2;
  run.tokens_per_update = 128;
  const study::Result r = study::read_result(run, d.string(), false);
  EXPECT_EQ(r.updates, 2);
  ASSERT_EQ(r.curve.size(), 1u);
  EXPECT_TRUE(std::isinf(r.val_loss));
  ASSERT_EQ(r.clipped.size(), 2u);
  EXPECT_EQ(r.clipped[0], 0.5);
  EXPECT_EQ(r.clipped[1], 0.0);
  fs::remove_all(d);
}

// The report's statistics: best learning rate on the mean over seeds, a diverged seed loses.
TEST(StudyReport, BestLearningRateIsTheLowestMeanAndDivergenceLoses) {
  std::vector<study::Result> rs;
  const auto add = [&](const std::string& m, double lr, int64_t seed, double val, bool diverged = false) {
    study::Result r;
    r.method = m;
    r.lr = lr;
    r.seed = seed;
    r.val_loss = val;
    r.diverged = diverged;
    rs.push_back(r);
  };
  add("a", 1e-3, 1, 5.0);
  add("a", 1e-3, 2, 5.2);  // mean 5.1
  add("a", 3e-3, 1, 4.8);
  add("a", 3e-3, 2, 5.6);  // mean 5.2
  add("b", 1e-3, 1, 6.0);
  add("b", 3e-3, 1, 4.0);
  add("b", 3e-3, 2, 4.0, true);  // diverged: this lr cannot win
  const auto best = study::best_lrs(rs);
  EXPECT_EQ(best.at("a"), 1e-3);
  EXPECT_EQ(best.at("b"), 1e-3);
  // Results survive their JSON file exactly (a diverged loss as null).
  study::Result r = rs.back();
  r.id = "b_x";
  r.curve = {{512, 6.5}, {1024, 6.25}};
  r.clipped = {0.5, 0.25};
  r.val_loss = std::numeric_limits<double>::infinity();
  const study::Result back = study::result_from_json(study::result_to_json(r), "x");
  EXPECT_EQ(back.id, "b_x");
  EXPECT_TRUE(back.diverged);
  EXPECT_TRUE(std::isinf(back.val_loss));
  EXPECT_EQ(back.curve, r.curve);
  EXPECT_EQ(back.clipped, r.clipped);
  EXPECT_THAT(error_of([] { study::result_from_json("{\"id\": 3}", "results/x.json"); }),
              HasSubstr("results/x.json is damaged"));
}

}  // namespace
}  // namespace pipenag::testutil
