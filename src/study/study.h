// `pipenag study`: the paper's comparison as one command. A study file is an ordinary training
// config plus a [study] table naming a grid of methods x learning rates x seeds at one pipeline
// depth, and a depth sweep. Every run of the grid is an ordinary training run in its own folder
// (DIR/runs/<id>), started as a child `pipenag train` process: it can be inspected, evaluated or
// resumed on its own, a finished one is never redone, and an interrupted one resumes from its
// checkpoint. Within a depth every run has the same model, data, initial weights (per seed) and
// token budget; synchronous methods with M micro-batches per update get steps / M updates.
// The report (DIR/report) picks each method's best learning rate on the validation loss.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/config.h"

namespace pipenag::study {

// A named method of the grid that is a preset plus settings ("nesterov-nows-keep": nesterov-nows
// with pipeline.recompute=false).
struct Variant {
  std::string name, method;
  std::vector<std::string> sets;  // "section.key=value"
};

struct Grid {
  std::vector<std::string> methods;  // presets (`pipenag methods`) or variant names
  std::vector<Variant> variants;
  std::vector<double> lrs;
  std::vector<int64_t> seeds;              // each sets model.seed and train.seed
  int stages = 0;                          // the grid's depth P (0: pipeline.stages)
  std::vector<int> depths;                 // the depth sweep (may include `stages`)
  std::vector<std::string> depth_methods;  // methods of the depth sweep, each at its best lr
  int jobs = 0;                            // runs at once (0: one per core)
};

struct Spec {
  std::string path;  // the study file
  Config base;       // its training config (every run starts from it)
  Grid grid;
};

// Reads and checks a study file: Error with one line naming the problem (unknown method, empty
// grid, lr <= 0, a depth above model.n_layer, ...).
Spec load_spec(const std::string& path);

// One training run of the study.
struct Run {
  std::string id;       // folder name: <method>_lr<lr>_s<seed>_P<P>
  std::string method;   // grid name (preset or variant)
  double lr = 0;
  int64_t seed = 0;
  int stages = 0;
  bool sweep = false;   // part of the depth sweep (at the method's best lr)
  Config cfg;           // the whole training config of the run
  int64_t tokens_per_update = 0;
};

// The grid's runs (at Grid::stages), in the order they are started.
std::vector<Run> grid_runs(const Spec& spec, const std::string& dir);
// The depth sweep's runs other than the grid's depth, each method at best_lr[method].
std::vector<Run> sweep_runs(const Spec& spec, const std::string& dir, const std::map<std::string, double>& best_lr);

// What a finished run measured, read from its metrics.jsonl.
struct Result {
  std::string id, method;
  double lr = 0;
  int64_t seed = 0;
  int stages = 0;
  bool sweep = false;
  bool diverged = false;  // stopped by a non-finite loss: counts as infinitely bad
  int64_t updates = 0, tokens = 0;
  double train_loss = 0, val_loss = 0;  // train: mean over the last 5 % of the updates
  double wall_s = 0, tokens_per_s = 0;  // training time (evaluations excluded), summed over resumes
  std::vector<double> clipped;          // per stage: fraction of updates clipped
  std::vector<std::pair<int64_t, double>> curve;  // (tokens, val loss) of every evaluation
};
Result read_result(const Run& run, const std::string& run_dir, bool diverged);
std::string result_to_json(const Result& r);
Result result_from_json(const std::string& text, const std::string& what);

// Best learning rate per method at the grid's depth: the lowest mean final validation loss over
// the seeds (a diverged seed makes the mean infinite). Methods with no finished run are absent.
std::map<std::string, double> best_lrs(const std::vector<Result>& grid_results);

struct Options {
  std::string config, out_dir;
  std::string binary;   // the pipenag executable the runs start (default: this one)
  std::string gnuplot = "gnuplot";
  int jobs = -1;        // overrides study.jobs when >= 0
  bool quiet = false;
};

// Runs (or continues) the study and writes its report; returns the process exit code.
int run_study(const Options& opt);

// DIR/report: results.csv, summary.md, the gnuplot scripts and PNGs. Returns the files written;
// warnings (no gnuplot) go to `warnings`.
std::vector<std::string> write_report(const Spec& spec, const std::string& dir, const std::vector<Result>& results,
                                      const std::string& gnuplot, std::vector<std::string>& warnings);

}  // namespace pipenag::study
