// The study's report: results.csv (one row per run), summary.md (each method at its best learning
// rate, mean +- standard deviation over seeds, the paired difference to gpipe, a ranking, the depth
// sweep) and gnuplot scripts with their PNGs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "io/atomic_file.h"
#include "pipeline/stage_worker.h"
#include "train/config_file.h"
#include "study/study.h"
#include "util/error.h"
#include "util/gnuplot.h"

namespace pipenag::study {
namespace fs = std::filesystem;
namespace {

struct Stats {
  int n = 0;
  double mean = std::numeric_limits<double>::infinity(), sd = 0, min = 0, max = 0;
};

Stats stats(const std::vector<double>& v) {
  Stats s;
  s.n = static_cast<int>(v.size());
  if (v.empty()) return s;
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / s.n;
  double ss = 0;
  for (double x : v) ss += (x - s.mean) * (x - s.mean);
  s.sd = s.n > 1 ? std::sqrt(ss / (s.n - 1)) : 0;
  s.min = *std::min_element(v.begin(), v.end());
  s.max = *std::max_element(v.begin(), v.end());
  if (!std::isfinite(s.mean)) s.sd = 0;
  return s;
}

std::string f(const char* format, double v) {
  if (!std::isfinite(v)) return "diverged";
  char b[64];
  std::snprintf(b, sizeof b, format, v);
  return b;
}

std::string g(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", v);
  return b;
}

std::string csv_number(double v) {
  if (!std::isfinite(v)) return "inf";
  char b[32];
  std::snprintf(b, sizeof b, "%.6f", v);
  return b;
}

// Results of `method` at learning rate lr and depth P, by seed.
std::map<int64_t, const Result*> by_seed(const std::vector<Result>& rs, const std::string& method, double lr, int P) {
  std::map<int64_t, const Result*> out;
  for (const auto& r : rs)
    if (r.method == method && r.lr == lr && r.stages == P) out[r.seed] = &r;
  return out;
}

std::vector<double> val_losses(const std::map<int64_t, const Result*>& m) {
  std::vector<double> v;
  for (const auto& [s, r] : m) v.push_back(r->val_loss);
  return v;
}

// The difference to the reference, seed by seed (same seed: same initial weights and data).
Stats paired_difference(const std::map<int64_t, const Result*>& a, const std::map<int64_t, const Result*>& ref) {
  std::vector<double> d;
  for (const auto& [s, r] : a) {
    auto it = ref.find(s);
    // Both diverged: no difference to report.
    if (it != ref.end() && (std::isfinite(r->val_loss) || std::isfinite(it->second->val_loss)))
      d.push_back(r->val_loss - it->second->val_loss);
  }
  return stats(d);
}

std::string verdict(const Stats& d) {
  if (d.n == 0) return "";
  if (!std::isfinite(d.mean)) return d.mean > 0 ? "worse (diverged)" : "better";
  if (d.n < 2) return d.mean < 0 ? "lower (1 seed: no spread)" : "higher (1 seed: no spread)";
  if (std::fabs(d.mean) <= d.sd) return "tie";
  return d.mean < 0 ? "better" : "worse";
}

std::string pm(const Stats& s, const char* format = "%.4f") {
  if (s.n == 0) return "";
  if (!std::isfinite(s.mean)) return "diverged";
  return f(format, s.mean) + " ± " + f(format, s.sd);
}

std::string signed_pm(const Stats& s) {
  if (s.n == 0) return "";
  if (!std::isfinite(s.mean)) return "diverged";
  return f("%+.4f", s.mean) + " ± " + f("%.4f", s.sd);
}

std::vector<std::string> methods_in_order(const Spec& spec) { return spec.grid.methods; }

// The learning rate each method's report rows use.
std::map<std::string, double> chosen(const std::vector<Result>& rs) { return best_lrs(rs); }

// Mean, min and max of the validation curves of `runs` (aligned by evaluation index).
std::string curve_block(const std::map<int64_t, const Result*>& runs) {
  std::ostringstream o;
  size_t n = std::numeric_limits<size_t>::max();
  for (const auto& [s, r] : runs) n = std::min(n, r->curve.size());
  if (runs.empty()) n = 0;
  for (size_t i = 0; i < n; ++i) {
    std::vector<double> v;
    int64_t tokens = 0;
    for (const auto& [s, r] : runs) {
      v.push_back(r->curve[i].second);
      tokens = r->curve[i].first;
    }
    const Stats st = stats(v);
    if (!std::isfinite(st.mean)) continue;
    o << tokens << " " << st.mean << " " << st.min << " " << st.max << "\n";
  }
  return o.str();
}

// Twelve distinguishable colours (gnuplot's default cycle repeats after eight).
std::string colour(int i) {
  static const char* c[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                            "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aec7e8"};
  return std::string("rgb \"") + c[i % 12] + "\"";
}

std::string gp_header(const std::string& title, const std::string& xl, const std::string& yl) {
  return "# Run in this folder: gnuplot -e \"outfile='x.png'\" <this script>\n"
         "if (!exists(\"outfile\")) outfile = \"plot.png\"\n"
         "set terminal pngcairo size 1100,650 noenhanced font \",10\"\n"
         "set output outfile\n"
         "set title " + quote_gp(title) + "\nset xlabel " + quote_gp(xl) + "\nset ylabel " + quote_gp(yl) +
         "\nset grid\nset key outside right top\n";
}

// A run's per-stage learning rate and NAdamW momentum mu_t = beta1_k (1 - 0.5 * 0.96^(t psi)) at
// about 200 updates, from its config through the functions the stages use.
std::string stage_series(const std::string& dir, const Result& r, int& stages) {
  const Config c = load_config((fs::path(dir) / "configs" / (r.id + ".toml")).string(), {});
  const int P = c.pipeline.stages;
  stages = P;
  const bool nadam = c.optim.name == "nadamw";
  std::ostringstream o;
  const int64_t every = std::max<int64_t>(1, c.train.steps / 200);
  for (int64_t t = 0; t < c.train.steps; t += every) {
    o << t + 1;
    for (int k = 0; k < P; ++k) o << " " << stage_lr_at(c, (P - 1 - k) * (1 + c.pipeline.extra_inflight), t);
    for (int k = 0; k < P; ++k) {
      const double b = stage_beta1_at(c, (P - 1 - k) * (1 + c.pipeline.extra_inflight), P);
      o << " " << (nadam ? b * (1.0 - 0.5 * std::pow(0.96, static_cast<double>(t + 1) * c.optim.momentum_decay)) : b);
    }
    o << "\n";
  }
  return o.str();
}

}  // namespace

std::vector<std::string> write_report(const Spec& spec, const std::string& dir, const std::vector<Result>& results,
                                      const std::string& gnuplot, std::vector<std::string>& warnings) {
  const fs::path rep = fs::path(dir) / "report";
  make_dirs(rep.string());
  std::vector<std::string> files;
  const auto put = [&](const std::string& name, const std::string& bytes) {
    write_file_atomic((rep / name).string(), bytes);
    files.push_back((rep / name).string());
  };
  const int P = spec.grid.stages;

  // results.csv
  {
    std::ostringstream o;
    o << "id,method,lr,seed,stages,updates,tokens,train_loss,train_ppl,val_loss,val_ppl,wall_s,tokens_per_s,"
         "diverged,clipped_per_stage\n";
    for (const auto& r : results) {
      std::string clipped;
      for (size_t k = 0; k < r.clipped.size(); ++k) clipped += (k ? ";" : "") + f("%.4f", r.clipped[k]);
      o << r.id << "," << r.method << "," << g(r.lr) << "," << r.seed << "," << r.stages << "," << r.updates << ","
        << r.tokens << "," << csv_number(r.train_loss) << "," << csv_number(std::exp(r.train_loss)) << ","
        << csv_number(r.val_loss) << "," << csv_number(std::exp(r.val_loss)) << "," << f("%.1f", r.wall_s) << ","
        << f("%.0f", r.tokens_per_s) << "," << (r.diverged ? "true" : "false") << "," << clipped << "\n";
    }
    put("results.csv", o.str());
  }

  std::vector<Result> grid_results;
  for (const auto& r : results)
    if (r.stages == P && !r.sweep) grid_results.push_back(r);
  const auto best = chosen(grid_results);
  const bool has_gpipe = best.count("gpipe") > 0;
  const auto ref = has_gpipe ? by_seed(grid_results, "gpipe", best.at("gpipe"), P) : std::map<int64_t, const Result*>{};

  // summary.md
  std::ostringstream s;
  double total_wall = 0;
  for (const auto& r : results) total_wall += r.wall_s;
  s << "# Study " << spec.path << "\n\n";
  s << "Grid: " << spec.grid.methods.size() << " methods x " << spec.grid.lrs.size() << " learning rates x "
    << spec.grid.seeds.size() << " seeds at P = " << P;
  if (!spec.grid.depths.empty()) {
    s << "; depth sweep P in {";
    for (size_t i = 0; i < spec.grid.depths.size(); ++i) s << (i ? ", " : "") << spec.grid.depths[i];
    s << "} for";
    for (const auto& m : spec.grid.depth_methods) s << " " << m;
    s << " at their best learning rate";
  }
  s << ". Model: " << spec.base.model.n_layer << " blocks, d = " << spec.base.model.n_embd << ", context "
    << spec.base.model.block_size << ", micro-batch " << spec.base.train.batch_size << ". " << results.size()
    << " runs, " << f("%.0f", total_wall) << " s of training in all (evaluations excluded).\n\n";
  s << "Each method gets the learning rate with the lowest mean final validation loss over the seeds. "
       "The difference to gpipe is taken seed by seed (the same initial weights and data), reported as mean ± "
       "standard deviation over seeds; a difference no larger than its spread is a tie.\n\n";

  struct Row {
    std::string method;
    double lr;
    Stats val, diff;
    const Result* any;
    std::vector<double> clipped;
  };
  std::vector<Row> rows;
  for (const auto& m : methods_in_order(spec)) {
    auto it = best.find(m);
    if (it == best.end()) continue;
    const auto runs = by_seed(grid_results, m, it->second, P);
    Row row{m, it->second, stats(val_losses(runs)), paired_difference(runs, ref), runs.begin()->second, {}};
    row.clipped.assign(static_cast<size_t>(P), 0.0);
    for (const auto& [seed, r] : runs)
      for (size_t k = 0; k < r->clipped.size() && k < row.clipped.size(); ++k)
        row.clipped[k] += r->clipped[k] / static_cast<double>(runs.size());
    rows.push_back(row);
  }
  std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.val.mean < b.val.mean; });
  s << "## Methods at P = " << P << ", each at its best learning rate (ranked)\n\n";
  s << "| rank | method | best lr | val loss (mean ± sd) | val ppl | vs gpipe (paired) | verdict | seeds | updates | "
       "tokens | clipped % per stage |\n|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---|\n";
  int rank = 0;
  bool any_edge = false;
  for (const auto& r : rows) {
    std::string clipped;
    for (size_t k = 0; k < r.clipped.size(); ++k) clipped += (k ? " " : "") + f("%.0f", 100 * r.clipped[k]);
    const bool is_ref = r.method == "gpipe";
    const bool edge = spec.grid.lrs.size() > 1 && (r.lr == *std::min_element(spec.grid.lrs.begin(), spec.grid.lrs.end()) ||
                                                   r.lr == *std::max_element(spec.grid.lrs.begin(), spec.grid.lrs.end()));
    any_edge = any_edge || edge;
    s << "| " << ++rank << " | " << r.method << " | " << g(r.lr) << (edge ? " (edge)" : "") << " | " << pm(r.val) << " | "
      << f("%.2f", std::exp(r.val.mean)) << " | " << (is_ref ? "reference" : signed_pm(r.diff)) << " | "
      << (is_ref ? "" : verdict(r.diff)) << " | " << r.val.n << " | " << r.any->updates << " | " << r.any->tokens
      << " | " << clipped << " |\n";
  }
  if (any_edge) s << "\n(edge): the best learning rate is at an end of the grid; a wider grid may find a better one.\n";
  s << "\n## Learning-rate grid at P = " << P << ": mean final validation loss over seeds\n\n| method |";
  for (double lr : spec.grid.lrs) s << " lr " << g(lr) << " |";
  s << "\n|---|";
  for (size_t i = 0; i < spec.grid.lrs.size(); ++i) s << "---:|";
  s << "\n";
  for (const auto& m : methods_in_order(spec)) {
    s << "| " << m << " |";
    for (double lr : spec.grid.lrs) {
      const Stats st = stats(val_losses(by_seed(grid_results, m, lr, P)));
      const bool chosen_lr = best.count(m) && best.at(m) == lr;
      s << " " << (st.n ? (chosen_lr ? "**" + pm(st) + "**" : pm(st)) : std::string("-")) << " |";
    }
    s << "\n";
  }

  std::vector<int> depths = spec.grid.depths;
  std::sort(depths.begin(), depths.end());
  if (!depths.empty()) {
    s << "\n## Depth sweep: final validation loss against pipeline depth P (each method at its best lr from the "
         "grid)\n\n| method |";
    for (int d : depths) s << " P = " << d << " |";
    s << "\n|---|";
    for (size_t i = 0; i < depths.size(); ++i) s << "---:|";
    s << "\n";
    const auto depth_runs = [&](const std::string& m, int d) {
      return best.count(m) ? by_seed(results, m, best.at(m), d) : std::map<int64_t, const Result*>{};
    };
    for (const auto& m : spec.grid.depth_methods) {
      s << "| " << m << " |";
      for (int d : depths) s << " " << pm(stats(val_losses(depth_runs(m, d)))) << " |";
      s << "\n";
    }
    if (has_gpipe) {
      for (const auto& m : spec.grid.depth_methods) {
        if (m == "gpipe") continue;
        s << "| " << m << " - gpipe |";
        for (int d : depths) {
          const Stats dd = paired_difference(depth_runs(m, d), depth_runs("gpipe", d));
          s << " " << signed_pm(dd) << (dd.n ? " (" + verdict(dd) + ")" : "") << " |";
        }
        s << "\n";
      }
    }
  }
  s << "\nEvery row of results.csv is one run (DIR/runs/<id>: its config, metrics.jsonl and checkpoint).\n";
  put("summary.md", s.str());

  // Plots: data files and scripts, then PNGs.
  std::vector<std::pair<std::string, std::string>> scripts;  // script, png
  {
    std::ostringstream data, gp;
    gp << gp_header("Validation loss against training tokens (P = " + std::to_string(P) +
                        ", each method at its best lr; band: min-max over seeds)",
                    "training tokens", "validation loss");
    gp << "set yrange [*:*]\nplot \\\n";
    int i = 0;
    for (const auto& r : rows) {
      // gnuplot counts only blocks with data: a method without a finite point gets none.
      const std::string block = curve_block(by_seed(grid_results, r.method, r.lr, P));
      if (block.empty()) continue;
      data << "# " << r.method << " lr " << g(r.lr) << "\n" << block << "\n\n";
      gp << (i ? ", \\\n" : "") << "  'curves.dat' index " << i << " using 1:3:4 with filledcurves lc " << colour(i)
         << " fs transparent solid 0.15 notitle, \\\n  'curves.dat' index " << i << " using 1:2 with lines lw 2 lc "
         << colour(i) << " title " << quote_gp(r.method + " (lr " + g(r.lr) + ")");
      ++i;
    }
    gp << "\n";
    if (i > 0) {
      put("curves.dat", data.str());
      put("curves.gp", gp.str());
      scripts.emplace_back("curves.gp", "val_loss_vs_tokens.png");
    }
  }
  {
    std::ostringstream data, gp;
    gp << gp_header("Final validation loss against learning rate (P = " + std::to_string(P) +
                        "; mean, bars min-max over seeds)",
                    "peak learning rate", "final validation loss");
    gp << "set logscale x\nset offsets graph 0.05, graph 0.05, 0, 0\nplot \\\n";
    int i = 0;
    for (const auto& m : methods_in_order(spec)) {
      std::ostringstream block;
      for (double lr : spec.grid.lrs) {
        const Stats st = stats(val_losses(by_seed(grid_results, m, lr, P)));
        if (st.n && std::isfinite(st.mean)) block << lr << " " << st.mean << " " << st.min << " " << st.max << "\n";
      }
      if (block.str().empty()) continue;
      data << "# " << m << "\n" << block.str() << "\n\n";
      gp << (i ? ", \\\n" : "") << "  'lr.dat' index " << i << " using 1:2:3:4 with yerrorlines lw 2 lc " << colour(i)
         << " title " << quote_gp(m);
      ++i;
    }
    gp << "\n";
    if (i > 0) {
      put("lr.dat", data.str());
      put("lr.gp", gp.str());
      scripts.emplace_back("lr.gp", "val_loss_vs_lr.png");
    }
  }
  if (!depths.empty()) {
    std::ostringstream data, gp;
    gp << gp_header("Final validation loss against pipeline depth (each method at its best lr; bars min-max "
                    "over seeds)",
                    "pipeline stages P", "final validation loss");
    gp << "set logscale x 2\nset xtics (";
    for (size_t i = 0; i < depths.size(); ++i) gp << (i ? ", " : "") << depths[i];
    gp << ")\nset offsets graph 0.05, graph 0.05, 0, 0\nplot \\\n";
    int i = 0;
    for (const auto& m : spec.grid.depth_methods) {
      std::ostringstream block;
      for (int d : depths) {
        const Stats st = stats(val_losses(best.count(m) ? by_seed(results, m, best.at(m), d)
                                                        : std::map<int64_t, const Result*>{}));
        if (st.n && std::isfinite(st.mean)) block << d << " " << st.mean << " " << st.min << " " << st.max << "\n";
      }
      if (block.str().empty()) continue;
      data << "# " << m << "\n" << block.str() << "\n\n";
      gp << (i ? ", \\\n" : "") << "  'depth.dat' index " << i << " using 1:2:3:4 with yerrorlines lw 2 lc " << colour(i)
         << " title " << quote_gp(m);
      ++i;
    }
    gp << "\n";
    if (i > 0) {
      put("depth.dat", data.str());
      put("depth.gp", gp.str());
      scripts.emplace_back("depth.gp", "val_loss_vs_depth.png");
    }
  }
  for (const std::string m : {"nesterov-nows"}) {
    auto it = best.find(m);
    if (it == best.end()) continue;
    const auto runs = by_seed(grid_results, m, it->second, P);
    int stages = 0;
    const std::string series = stage_series(dir, *runs.begin()->second, stages);
    if (series.empty()) continue;
    std::ostringstream gp;
    gp << gp_header(m + " (lr " + g(it->second) + "): learning rate per stage", "update", "learning rate");
    gp << "set key inside top right\nset multiplot layout 1,2\nplot for [k=0:" << stages - 1
       << "] 'stages.dat' using 1:(column(k+2)) with lines lw 2 title sprintf('stage %d', k)\n"
       << "set title 'NAdamW momentum per stage: mu_t = beta1_k (1 - 0.5 * 0.96^(t psi))'\nset ylabel 'momentum'\n"
       << "plot for [k=0:" << stages - 1 << "] 'stages.dat' using 1:(column(k+2+" << stages
       << ")) with lines lw 2 title sprintf('stage %d', k)\nunset multiplot\n";
    put("stages.dat", "# update, learning rate of stages 0..P-1, momentum of stages 0..P-1\n" + series);
    put("stages.gp", gp.str());
    scripts.emplace_back("stages.gp", "nesterov_nows_stages.png");
  }
  for (const auto& [script, png] : scripts) {
    const std::string why = render_gnuplot(gnuplot, rep.string(), script, png);
    if (why.empty()) {
      files.push_back((rep / png).string());
    } else {
      warnings.push_back("no " + png + ": " + why + " (the data and " + script + " are written)");
      if (why.find("not found") != std::string::npos) break;
    }
  }
  return files;
}

}  // namespace pipenag::study
