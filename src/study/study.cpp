#include "study/study.h"

#include <sys/prctl.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <type_traits>
#include <toml++/toml.h>

#include "io/atomic_file.h"
#include "train/config_file.h"
#include "train/methods.h"
#include "train/run_folder.h"
#include "util/error.h"

namespace pipenag::study {
namespace fs = std::filesystem;
namespace {

constexpr std::size_t kMaxStudyBytes = 1 << 20;
constexpr int kMaxRuns = 10000;
// A run folder another process holds (a killed study's run saving its checkpoint): retries, 1 s apart.
constexpr int kLockRetries = 300;
// What a run says when another process holds its folder (RunFolderLock).
constexpr const char* kLockHeld = "is in use by another pipenag process";

std::string fmt_lr(double lr) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", lr);
  return b;
}

// The values of an array of `what` ("numbers": any number; else exactly T), or Error naming the key.
template <typename T>
std::vector<T> list_of(const toml::node& n, const std::string& key, const char* what) {
  const auto* a = n.as_array();
  if (!a) throw Error("study." + key + " must be an array of " + what);
  std::vector<T> out;
  for (const auto& e : *a) {
    std::optional<T> v;
    if constexpr (std::is_same_v<T, double>) v = e.value<double>();
    else v = e.value_exact<T>();
    if (!v) throw Error("study." + key + " must be an array of " + what);
    out.push_back(*v);
  }
  return out;
}
std::vector<double> numbers(const toml::node& n, const std::string& key) { return list_of<double>(n, key, "numbers"); }
std::vector<int64_t> integers(const toml::node& n, const std::string& key) {
  return list_of<int64_t>(n, key, "integers");
}
std::vector<std::string> strings(const toml::node& n, const std::string& key) {
  return list_of<std::string>(n, key, "strings");
}

template <typename T>
void no_duplicates(const std::vector<T>& v, const std::string& key) {
  std::set<T> seen;
  for (const auto& x : v)
    if (!seen.insert(x).second) throw Error("study." + key + " lists a value twice");
}

const Variant* find_variant(const Grid& g, const std::string& name) {
  for (const auto& v : g.variants)
    if (v.name == name) return &v;
  return nullptr;
}

// The settings a grid method applies: its preset, then the variant's own.
std::vector<std::string> method_sets(const Grid& g, const std::string& name) {
  if (const Variant* v = find_variant(g, name)) {
    std::vector<std::string> s = {"method=" + v->method};
    s.insert(s.end(), v->sets.begin(), v->sets.end());
    return s;
  }
  find_method(name);  // Error naming the known methods
  return {"method=" + name};
}

Grid parse_grid(const toml::table& t, const Config& base) {
  Grid g;
  static const std::set<std::string> known = {"methods", "variants", "lrs", "seeds", "stages",
                                              "depths", "depth_methods", "jobs"};
  for (const auto& [k, v] : t)
    if (!known.count(std::string(k.str())))
      throw Error("unknown key study." + std::string(k.str()) +
                  " (known: methods, variants, lrs, seeds, stages, depths, depth_methods, jobs)");
  if (const auto* v = t.get("variants")) {
    const auto* vt = v->as_table();
    if (!vt) throw Error("study.variants must be a table: name = { method = \"...\", set = [\"key=value\"] }");
    for (const auto& [name, def] : *vt) {
      const auto* d = def.as_table();
      const std::string n(name.str());
      if (!d || !d->get("method") || !d->get("method")->is_string())
        throw Error("study.variants." + n + " needs method = \"<preset>\"");
      Variant var{n, *d->get("method")->value<std::string>(), {}};
      for (const auto& [dk, dv] : *d)
        if (dk.str() != "method" && dk.str() != "set")
          throw Error("unknown key study.variants." + n + "." + std::string(dk.str()) + " (known: method, set)");
      if (const auto* s = d->get("set")) var.sets = strings(*s, "variants." + n + ".set");
      find_method(var.method);
      g.variants.push_back(var);
    }
  }
  if (const auto* v = t.get("methods")) g.methods = strings(*v, "methods");
  if (const auto* v = t.get("lrs")) g.lrs = numbers(*v, "lrs");
  if (const auto* v = t.get("seeds")) g.seeds = integers(*v, "seeds");
  else g.seeds = {static_cast<int64_t>(base.model.seed)};
  if (const auto* v = t.get("stages")) {
    auto s = v->value_exact<int64_t>();
    if (!s) throw Error("study.stages must be an integer");
    if (*s < 1 || *s > 1024) throw Error("study.stages must be between 1 and 1024, got " + std::to_string(*s));
    g.stages = static_cast<int>(*s);
  } else {
    g.stages = base.pipeline.stages;
  }
  if (const auto* v = t.get("depths"))
    for (int64_t d : integers(*v, "depths")) {
      if (d < 1 || d > 1024) throw Error("study.depths: a depth must be between 1 and 1024, got " + std::to_string(d));
      g.depths.push_back(static_cast<int>(d));
    }
  if (const auto* v = t.get("depth_methods")) g.depth_methods = strings(*v, "depth_methods");
  if (const auto* v = t.get("jobs")) {
    auto j = v->value_exact<int64_t>();
    if (!j || *j < 0 || *j > 256) throw Error("study.jobs must be an integer between 0 (one per core) and 256");
    g.jobs = static_cast<int>(*j);
  }

  if (g.methods.empty()) throw Error("study.methods is empty: the grid has no runs");
  if (g.lrs.empty()) throw Error("study.lrs is empty: the grid has no runs");
  if (g.seeds.empty()) throw Error("study.seeds is empty: the grid has no runs");
  for (int64_t seed : g.seeds)
    if (seed < 0) throw Error("study.seeds: a seed must be >= 0, got " + std::to_string(seed));
  for (double lr : g.lrs)
    if (!(lr > 0) || !std::isfinite(lr)) throw Error("study.lrs: a learning rate must be > 0, got " + fmt_lr(lr));
  for (const auto& v : g.variants)
    if (v.name.empty() || v.name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") !=
                              std::string::npos || v.name[0] == '.')
      throw Error("study.variants: a name may only use letters, digits, '.', '_' and '-' (it names folders)");
  no_duplicates(g.methods, "methods");
  no_duplicates(g.lrs, "lrs");
  no_duplicates(g.seeds, "seeds");
  no_duplicates(g.depths, "depths");
  no_duplicates(g.depth_methods, "depth_methods");
  for (size_t i = 0; i < g.lrs.size(); ++i)
    for (size_t j = i + 1; j < g.lrs.size(); ++j)
      if (fmt_lr(g.lrs[i]) == fmt_lr(g.lrs[j]))
        throw Error("study.lrs: " + fmt_lr(g.lrs[i]) + " appears twice at 6 significant digits (run folders are named by it)");
  for (const auto& m : g.methods) method_sets(g, m);
  for (const auto& m : g.depth_methods) {
    if (std::find(g.methods.begin(), g.methods.end(), m) == g.methods.end())
      throw Error("study.depth_methods: '" + m + "' is not in study.methods (its learning rate comes from the grid)");
  }
  if (base.train.eval_every <= 0)
    throw Error("train.eval_every must be > 0 in a study: runs are compared on their validation loss");
  if (!g.depths.empty() && g.depth_methods.empty())
    throw Error("study.depths needs study.depth_methods (which methods the depth sweep runs)");
  for (int d : g.depths)
    if (d > base.model.n_layer)
      throw Error("study.depths: " + std::to_string(d) + " stages need at least " + std::to_string(d) +
                  " blocks, model.n_layer is " + std::to_string(base.model.n_layer));
  if (g.stages > base.model.n_layer)
    throw Error("study.stages: " + std::to_string(g.stages) + " stages need at least " + std::to_string(g.stages) +
                " blocks, model.n_layer is " + std::to_string(base.model.n_layer));
  return g;
}

// The grid's identity: what the runs' results depend on (not jobs).
nlohmann::json fingerprint(const Spec& s) {
  nlohmann::json variants = nlohmann::json::object();
  for (const auto& v : s.grid.variants) variants[v.name] = {{"method", v.method}, {"set", v.sets}};
  nlohmann::json cfg = config_to_json(s.base);
  return {{"study",
           {{"methods", s.grid.methods},
            {"variants", variants},
            {"lrs", s.grid.lrs},
            {"seeds", s.grid.seeds},
            {"stages", s.grid.stages},
            {"depths", s.grid.depths},
            {"depth_methods", s.grid.depth_methods}}},
          {"config", cfg}};
}

// The first key (dotted path) whose value differs, with both values; "" when equal.
std::string first_difference(const nlohmann::json& there, const nlohmann::json& here, const std::string& path) {
  if (there.is_object() && here.is_object()) {
    std::set<std::string> keys;
    for (auto it = there.begin(); it != there.end(); ++it) keys.insert(it.key());
    for (auto it = here.begin(); it != here.end(); ++it) keys.insert(it.key());
    for (const auto& k : keys) {
      const std::string p = path.empty() ? k : path + "." + k;
      if (!there.contains(k)) return p + " is new here";
      if (!here.contains(k)) return p + " is missing here";
      std::string d = first_difference(there[k], here[k], p);
      if (!d.empty()) return d;
    }
    return "";
  }
  if (there == here) return "";
  return path + " is " + there.dump() + " there, " + here.dump() + " here";
}

// True when `here` is `there` with more values in some of the grid's lists: the same config,
// depth, variants (of the names both have) and a superset of every list.
bool extends(const nlohmann::json& there, const nlohmann::json& here) {
  try {
    if (there.at("config") != here.at("config")) return false;
    const auto& a = there.at("study");
    const auto& b = here.at("study");
    if (a.at("stages") != b.at("stages")) return false;
    for (const char* list : {"methods", "lrs", "seeds", "depths", "depth_methods"})
      for (const auto& v : a.at(list))
        if (std::find(b.at(list).begin(), b.at(list).end(), v) == b.at(list).end()) return false;
    for (auto it = a.at("variants").begin(); it != a.at("variants").end(); ++it)
      if (b.at("variants").contains(it.key()) && b.at("variants").at(it.key()) != it.value()) return false;
    return true;
  } catch (const nlohmann::json::exception&) {
    return false;
  }
}

Config run_config(const Spec& spec, const std::string& dir, const std::string& method, double lr, int64_t seed,
                  int P) {
  Config c = spec.base;
  std::vector<std::string> sets = method_sets(spec.grid, method);
  for (const auto& s : sets) apply_override(c, s);
  // Equal tokens: M micro-batches per update take steps / M updates (and warm-up, cadences).
  const int M = c.pipeline.schedule == "async-1f1b" ? 1 : c.pipeline.microbatches;
  const auto per_update = [&](int64_t v) { return v > 0 ? std::max<int64_t>(1, v / M) : v; };
  c.train.steps = per_update(c.train.steps);
  c.train.warmup_steps = c.train.warmup_steps / M;
  c.train.eval_every = per_update(c.train.eval_every);
  c.train.checkpoint_every = per_update(c.train.checkpoint_every > 0 ? c.train.checkpoint_every
                                                                     : spec.base.train.eval_every);
  c.optim.lr_reschedule_steps = c.optim.lr_reschedule_steps / M;
  c.train.lr = lr;
  c.model.seed = static_cast<uint64_t>(seed);
  c.train.seed = static_cast<uint64_t>(seed);
  c.pipeline.stages = P;
  c.pipeline.partition = Partition();  // the default split, for every depth
  // One core per run: `jobs` runs share the machine without oversubscribing it (the engines
  // give the same bits, so the sequential one loses nothing but wall time).
  c.pipeline.engine = "sequential";
  c.train.threads = 1;
  c.data.dir = (fs::path(dir) / "data").string();
  c.out.dir = (fs::path(dir) / "runs" / "x").string();
  validate(c);
  return c;
}

Run make_run(const Spec& spec, const std::string& dir, const std::string& method, double lr, int64_t seed, int P,
             bool sweep) {
  Run r;
  r.method = method;
  r.lr = lr;
  r.seed = seed;
  r.stages = P;
  r.sweep = sweep;
  r.id = method + "_lr" + fmt_lr(lr) + "_s" + std::to_string(seed) + "_P" + std::to_string(P);
  r.cfg = run_config(spec, dir, method, lr, seed, P);
  r.cfg.out.dir = (fs::path(dir) / "runs" / r.id).string();
  const int M = r.cfg.pipeline.schedule == "async-1f1b" ? 1 : r.cfg.pipeline.microbatches;
  r.tokens_per_update = static_cast<int64_t>(M) * r.cfg.train.batch_size * r.cfg.model.block_size;
  return r;
}

}  // namespace

Spec load_spec(const std::string& path) {
  const std::string text = read_file(path, kMaxStudyBytes);
  toml::table root;
  try {
    root = toml::parse(text, path);
  } catch (const toml::parse_error& e) {
    std::string d(e.description());
    std::replace(d.begin(), d.end(), '\n', ' ');
    throw Error(path + ":" + std::to_string(e.source().begin.line) + ":" + std::to_string(e.source().begin.column) +
                ": " + d);
  }
  const toml::node* st = root.get("study");
  if (!st || !st->is_table()) throw Error(path + ": no [study] table (methods, lrs, seeds, ...): not a study file");
  const toml::table study_table = *st->as_table();
  root.erase("study");
  std::ostringstream rest;
  rest << root;
  Spec s;
  s.path = path;
  s.base = parse_config(rest.str(), path, {});
  try {
    s.grid = parse_grid(study_table, s.base);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
  // Every run's config must be valid before anything starts.
  for (const auto& m : s.grid.methods) {
    try {
      run_config(s, "check", m, s.grid.lrs.front(), s.grid.seeds.front(), s.grid.stages);
      for (int d : s.grid.depths)
        if (std::find(s.grid.depth_methods.begin(), s.grid.depth_methods.end(), m) != s.grid.depth_methods.end())
          run_config(s, "check", m, s.grid.lrs.front(), s.grid.seeds.front(), d);
    } catch (const Error& e) {
      throw Error(path + ": method " + m + ": " + e.what());
    }
  }
  const size_t n = s.grid.methods.size() * s.grid.lrs.size() * s.grid.seeds.size() +
                   s.grid.depth_methods.size() * s.grid.depths.size() * s.grid.seeds.size();
  if (n > kMaxRuns) throw Error(path + ": the grid has " + std::to_string(n) + " runs, more than " +
                                std::to_string(kMaxRuns));
  return s;
}

std::vector<Run> grid_runs(const Spec& spec, const std::string& dir) {
  std::vector<Run> out;
  // Depth-sweep methods first, so the sweep can start as early as possible.
  std::vector<std::string> order = spec.grid.depth_methods;
  for (const auto& m : spec.grid.methods)
    if (std::find(order.begin(), order.end(), m) == order.end()) order.push_back(m);
  for (const auto& m : order)
    for (double lr : spec.grid.lrs)
      for (int64_t seed : spec.grid.seeds) out.push_back(make_run(spec, dir, m, lr, seed, spec.grid.stages, false));
  return out;
}

std::vector<Run> sweep_runs(const Spec& spec, const std::string& dir, const std::map<std::string, double>& best_lr) {
  std::vector<Run> out;
  for (int P : spec.grid.depths) {
    if (P == spec.grid.stages) continue;
    for (const auto& m : spec.grid.depth_methods) {
      auto it = best_lr.find(m);
      if (it == best_lr.end()) continue;
      for (int64_t seed : spec.grid.seeds) out.push_back(make_run(spec, dir, m, it->second, seed, P, true));
    }
  }
  return out;
}

namespace {
// A number of a metrics line; null (how a NaN or infinity is written) or anything else: +inf.
double number(const nlohmann::json& j, const char* key) {
  const auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : std::numeric_limits<double>::infinity();
}
}  // namespace

Result read_result(const Run& run, const std::string& run_dir, bool diverged) {
  Result r;
  r.id = run.id;
  r.method = run.method;
  r.lr = run.lr;
  r.seed = run.seed;
  r.stages = run.stages;
  r.sweep = run.sweep;
  r.diverged = diverged;
  const int P = run.stages;
  std::vector<double> losses;
  std::vector<int64_t> clipped(static_cast<size_t>(P), 0);
  int64_t stage_updates = 0, seg_updates = 0;
  double per_update_wall = 0;  // one stage writes no segment lines: the updates' own times
  std::ifstream in(run_dir + "/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      continue;  // a torn last line of a killed run
    }
    if (!j.is_object() || !j.contains("step")) continue;
    if (j.contains("val_loss")) {
      r.curve.emplace_back(static_cast<int64_t>(number(j, "tokens")), number(j, "val_loss"));
    } else if (j.contains("loss")) {
      losses.push_back(number(j, "loss"));
      const double tps = number(j, "tokens_per_s");
      if (std::isfinite(tps) && tps > 0) per_update_wall += static_cast<double>(run.tokens_per_update) / tps;
      // One stage: each update's own line has its gradient norm (before clipping).
      if (P == 1 && j.contains("grad_norm")) {
        ++stage_updates;
        if (run.cfg.train.clip > 0 && number(j, "grad_norm") > run.cfg.train.clip) ++clipped[0];
      }
    } else if (j.contains("segment_wall_s")) {
      const double w = number(j, "segment_wall_s"), n = number(j, "segment_updates");
      if (std::isfinite(w) && std::isfinite(n)) {
        r.wall_s += w;
        seg_updates += static_cast<int64_t>(n);
      }
    } else if (j.contains("stage_clipped")) {
      const double n = number(j, "stage_updates");
      const auto& c = j["stage_clipped"];
      if (std::isfinite(n) && c.is_array()) {
        stage_updates += static_cast<int64_t>(n);
        for (size_t k = 0; k < clipped.size() && k < c.size(); ++k)
          if (c[k].is_number_integer()) clipped[k] += c[k].get<int64_t>();
      }
    }
  }
  r.updates = static_cast<int64_t>(losses.size());
  r.tokens = r.updates * run.tokens_per_update;
  const size_t tail = std::max<size_t>(1, losses.size() / 20);
  double sum = 0;
  for (size_t i = losses.size() - std::min(tail, losses.size()); i < losses.size(); ++i) sum += losses[i];
  r.train_loss = losses.empty() ? std::numeric_limits<double>::infinity() : sum / static_cast<double>(std::min(tail, losses.size()));
  r.val_loss = r.curve.empty() ? std::numeric_limits<double>::infinity() : r.curve.back().second;
  if (diverged) r.val_loss = r.train_loss = std::numeric_limits<double>::infinity();
  if (seg_updates == 0) {
    r.wall_s = per_update_wall;
    seg_updates = r.updates;
  }
  r.tokens_per_s = r.wall_s > 0 ? static_cast<double>(seg_updates * run.tokens_per_update) / r.wall_s : 0;
  for (int64_t c : clipped)
    r.clipped.push_back(stage_updates > 0 ? static_cast<double>(c) / static_cast<double>(stage_updates) : 0.0);
  return r;
}

namespace {
nlohmann::json finite_or_null(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }
double from_json_number(const nlohmann::json& j) {
  return j.is_null() ? std::numeric_limits<double>::infinity() : j.get<double>();
}
}  // namespace

std::string result_to_json(const Result& r) {
  nlohmann::json curve = nlohmann::json::array();
  for (const auto& [t, v] : r.curve) curve.push_back({t, finite_or_null(v)});
  return nlohmann::json{{"id", r.id},
                        {"method", r.method},
                        {"lr", r.lr},
                        {"seed", r.seed},
                        {"stages", r.stages},
                        {"sweep", r.sweep},
                        {"diverged", r.diverged},
                        {"updates", r.updates},
                        {"tokens", r.tokens},
                        {"train_loss", finite_or_null(r.train_loss)},
                        {"val_loss", finite_or_null(r.val_loss)},
                        {"wall_s", r.wall_s},
                        {"tokens_per_s", r.tokens_per_s},
                        {"clipped", r.clipped},
                        {"curve", curve}}
             .dump(1) +
         "\n";
}

Result result_from_json(const std::string& text, const std::string& what) {
  try {
    const auto j = nlohmann::json::parse(text);
    Result r;
    r.id = j.at("id").get<std::string>();
    r.method = j.at("method").get<std::string>();
    r.lr = j.at("lr").get<double>();
    r.seed = j.at("seed").get<int64_t>();
    r.stages = j.at("stages").get<int>();
    r.sweep = j.at("sweep").get<bool>();
    r.diverged = j.at("diverged").get<bool>();
    r.updates = j.at("updates").get<int64_t>();
    r.tokens = j.at("tokens").get<int64_t>();
    r.train_loss = from_json_number(j.at("train_loss"));
    r.val_loss = from_json_number(j.at("val_loss"));
    r.wall_s = j.at("wall_s").get<double>();
    r.tokens_per_s = j.at("tokens_per_s").get<double>();
    r.clipped = j.at("clipped").get<std::vector<double>>();
    for (const auto& e : j.at("curve")) r.curve.emplace_back(e.at(0).get<int64_t>(), from_json_number(e.at(1)));
    return r;
  } catch (const nlohmann::json::exception& e) {
    throw Error(what + " is damaged (" + std::string(e.what()) + "): delete it to redo that run");
  }
}

std::map<std::string, double> best_lrs(const std::vector<Result>& grid_results) {
  std::map<std::string, std::map<double, std::pair<double, int>>> acc;  // method -> lr -> (sum, n)
  for (const auto& r : grid_results) {
    if (r.sweep) continue;
    auto& a = acc[r.method][r.lr];
    a.first += r.diverged ? std::numeric_limits<double>::infinity() : r.val_loss;
    a.second += 1;
  }
  std::map<std::string, double> best;
  for (const auto& [m, by_lr] : acc) {
    double best_mean = std::numeric_limits<double>::infinity();
    double lr_best = by_lr.begin()->first;
    for (const auto& [lr, a] : by_lr) {
      const double mean = a.first / a.second;
      if (mean < best_mean) {
        best_mean = mean;
        lr_best = lr;
      }
    }
    best[m] = lr_best;
  }
  return best;
}

// ------------------------------------------------------------------------------------------------
// Running the study

namespace {

std::atomic<int> g_signal{0};
extern "C" void on_study_signal(int sig) { g_signal.store(sig); }

std::string self_exe() {
  std::error_code ec;
  const fs::path p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("pipenag") : p.string();
}

// The last non-empty line of a log from byte `from` on (what the latest start wrote), or, when
// `prefer` is given, the last such line containing it. A run of a killed study can still append to
// the same log (its checkpoint message) after a new start failed on its lock, so the new start's
// line is not always the last one.
std::string last_line(const std::string& path, std::streamoff from = 0, const std::string& prefer = "") {
  std::ifstream in(path);
  in.seekg(from);
  std::string line, last, preferred;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    last = line;
    if (!prefer.empty() && line.find(prefer) != std::string::npos) preferred = line;
  }
  return preferred.empty() ? last : preferred;
}

// The last "step" in a metrics.jsonl (0 when none): progress of a running run.
int64_t last_step(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return 0;
  const std::streamoff size = in.tellg();
  const std::streamoff from = std::max<std::streamoff>(0, size - 4096);
  in.seekg(from);
  std::string tail(static_cast<size_t>(size - from), '\0');
  in.read(tail.data(), static_cast<std::streamsize>(tail.size()));
  int64_t step = 0;
  std::istringstream lines(tail);
  for (std::string line; std::getline(lines, line);) {
    const auto p = line.find("\"step\":");
    if (p != std::string::npos) step = std::max<int64_t>(step, std::atoll(line.c_str() + p + 7));
  }
  return step;
}

struct Child {
  pid_t pid = -1;
  size_t index = 0;  // into the study's runs
  int tries = 0;     // earlier starts refused because another process held the run's folder
  std::streamoff log_from = 0;  // where this start's output begins in the run's log
};

// Owns the running children and the study's signal handlers: however run_study leaves (an
// exception included), every child gets SIGTERM (it checkpoints and stops), is waited for, and
// the previous handlers come back.
class ChildGuard {
 public:
  explicit ChildGuard(std::vector<Child>& children) : children_(children) {
    struct sigaction sa {};
    sa.sa_handler = on_study_signal;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, &old_int_);
    ::sigaction(SIGTERM, &sa, &old_term_);
    // Children must be waitable whatever this process inherited.
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(SIGCHLD, &dfl, &old_chld_);
    g_signal.store(0);
  }
  ~ChildGuard() {
    for (const auto& c : children_) ::kill(c.pid, SIGTERM);
    for (const auto& c : children_) {
      int status = 0;
      while (::waitpid(c.pid, &status, 0) < 0 && errno == EINTR) {
      }
    }
    children_.clear();
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
    ::sigaction(SIGCHLD, &old_chld_, nullptr);
  }
  ChildGuard(const ChildGuard&) = delete;
  ChildGuard& operator=(const ChildGuard&) = delete;

 private:
  std::vector<Child>& children_;
  struct sigaction old_int_ {}, old_term_ {}, old_chld_ {};
};

std::string exit_description(int status) {
  if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
  if (WIFEXITED(status)) return "exit status " + std::to_string(WEXITSTATUS(status));
  return "stopped";
}

// Starts `binary args...` with stdout and stderr going to `log` (appended, or truncated first) and
// stdin from /dev/null; the child gets SIGTERM (a run checkpoints) if the study dies. `what` names
// the start in errors.
pid_t spawn_pipenag(const std::string& binary, std::vector<std::string> args, const std::string& log, bool append,
                    const char* what) {
  args.insert(args.begin(), binary);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw Error(std::string("cannot ") + what + ": fork failed: " + std::strerror(errno));
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(1);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC), 0644);
    if (fd < 0) ::_exit(126);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::close(fd);
    const int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) {
      ::dup2(devnull, 0);
      ::close(devnull);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(binary.c_str(), argv.data());
    std::fprintf(stderr, "pipenag study: cannot run %s: %s\n", binary.c_str(), std::strerror(errno));
    ::_exit(127);
  }
  return pid;
}

// Starts `binary train -q -c <config> [--resume|--force]` with output appended to `log`.
pid_t spawn_run(const std::string& binary, const std::string& config, bool resume, const std::string& log) {
  return spawn_pipenag(binary, {"train", "-q", "-c", config, resume ? "--resume" : "--force"}, log, true,
                       "start a run");
}

std::string fmt_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const auto t = static_cast<long long>(s + 0.5);
  char b[32];
  if (t >= 3600) std::snprintf(b, sizeof b, "%lldh%02lldm", t / 3600, (t / 60) % 60);
  else std::snprintf(b, sizeof b, "%lldm%02llds", t / 60, t % 60);
  return b;
}

// Prepares the corpus once for every run (DIR/data), as `pipenag prepare` would.
void prepare_data(const Spec& spec, const std::string& binary, const std::string& dir) {
  const std::string data = (fs::path(dir) / "data").string();
  if (!spec.base.data.dir.empty()) {
    // A prepared folder given by the study file: link it in.
    if (!fs::exists(data)) {
      std::error_code ec;
      fs::create_directory_symlink(fs::absolute(spec.base.data.dir), data, ec);
      if (ec) throw Error("cannot link " + data + " to " + spec.base.data.dir + ": " + ec.message());
    }
    return;
  }
  if (fs::exists(fs::path(data) / "meta.json")) return;
  if (spec.base.data.input.empty())
    throw Error(spec.path + ": the study needs data.input (a corpus) or data.dir (a prepared folder)");
  const std::string log = (fs::path(dir) / "logs" / "prepare.log").string();
  char split[32], frac[32];
  std::snprintf(split, sizeof split, "%llu", static_cast<unsigned long long>(spec.base.data.split_seed));
  std::snprintf(frac, sizeof frac, "%.17g", spec.base.data.val_fraction);
  const pid_t pid = spawn_pipenag(binary,
                                  {"prepare", "--tokenizer", spec.base.data.tokenizer, "--input", spec.base.data.input,
                                   "--out", data, "--val-fraction", frac, "--split-seed", split},
                                  log, false, "prepare the data");
  int status = 0;
  pid_t got;
  while ((got = ::waitpid(pid, &status, 0)) < 0 && errno == EINTR) {
  }
  if (got < 0) throw Error(std::string("preparing the data: waitpid failed: ") + std::strerror(errno));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw Error("preparing the data failed: " + last_line(log) + " (log: " + log + ")");
}

}  // namespace

int run_study(const Options& opt) {
  if (opt.out_dir.empty()) throw Error("study: --out DIR is required");
  const Spec spec = load_spec(opt.config);
  const std::string dir = opt.out_dir;
  const std::string binary = opt.binary.empty() ? self_exe() : opt.binary;
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int jobs = opt.jobs >= 0 ? opt.jobs : spec.grid.jobs;
  if (jobs == 0) jobs = cores;
  if (jobs > cores)
    throw Error("study.jobs = " + std::to_string(jobs) + " runs at once would oversubscribe the " +
                std::to_string(cores) + " cores here (each run takes one)");

  if (spec.grid.lrs.size() < 3 && !opt.quiet)
    std::fprintf(stderr, "pipenag: note: study.lrs has %zu value(s): with fewer than 3 a method's best learning rate "
                 "may lie outside the grid\n", spec.grid.lrs.size());
  make_dirs(dir);
  RunFolderLock lock(dir);
  // The folder's grid: written once, compared on every later start.
  const nlohmann::json fp = fingerprint(spec);
  const std::string fp_path = (fs::path(dir) / "study.json").string();
  if (fs::exists(fp_path)) {
    nlohmann::json there;
    try {
      there = nlohmann::json::parse(read_file(fp_path, kMaxStudyBytes));
    } catch (const nlohmann::json::exception&) {
      throw Error(fp_path + " is damaged: this folder's study cannot be identified (use another --out)");
    }
    const std::string d = first_difference(there, fp, "");
    if (!d.empty()) {
      // A wider grid on the same config (more methods, learning rates, seeds or depths) extends
      // the study: its finished runs are exactly the runs the wider grid would make.
      if (!extends(there, fp))
        throw Error(dir + " holds a study of another grid or config: " + d +
                    " (use another --out, the same file, or a grid that contains the folder's)");
      if (!opt.quiet) std::fprintf(stderr, "pipenag: extending the study in %s (%s); its finished runs are kept\n",
                                   dir.c_str(), d.c_str());
      write_file_atomic(fp_path, fp.dump(2) + "\n");
    }
  } else {
    for (const char* sub : {"runs", "results"})
      if (fs::exists(fs::path(dir) / sub) && !fs::is_empty(fs::path(dir) / sub))
        throw Error(dir + " holds runs but no study.json: not a study folder pipenag can continue (use another --out)");
    write_file_atomic(fp_path, fp.dump(2) + "\n");
  }
  for (const char* sub : {"runs", "results", "configs", "logs"}) make_dirs((fs::path(dir) / sub).string());
  prepare_data(spec, binary, dir);

  std::vector<Run> runs = grid_runs(spec, dir);
  const size_t grid_count = runs.size();
  size_t sweep_expected = 0;
  for (int P : spec.grid.depths)
    if (P != spec.grid.stages) sweep_expected += spec.grid.depth_methods.size() * spec.grid.seeds.size();
  std::map<std::string, Result> results;  // by id
  const auto result_path = [&](const Run& r) { return (fs::path(dir) / "results" / (r.id + ".json")).string(); };
  const auto load_done = [&](const Run& r) {
    if (results.count(r.id) || !fs::exists(result_path(r))) return;
    results[r.id] = result_from_json(read_file(result_path(r), 64 << 20), result_path(r));
  };
  for (const auto& r : runs) load_done(r);

  const bool tty = !opt.quiet && ::isatty(STDERR_FILENO);
  const auto t0 = std::chrono::steady_clock::now();
  const auto total_tokens = [&] {
    int64_t t = 0;
    for (const auto& r : runs) t += r.cfg.train.steps * r.tokens_per_update;
    // Sweep runs not yet known: count them like an average grid run.
    if (runs.size() == grid_count && sweep_expected > 0)
      t += static_cast<int64_t>(sweep_expected) * (t / static_cast<int64_t>(std::max<size_t>(1, grid_count)));
    return t;
  };
  std::vector<Child> children;
  ChildGuard guard(children);
  int64_t tokens_at_start = -1;
  bool sweep_added = sweep_expected == 0;
  std::string failure;
  auto last_print = std::chrono::steady_clock::now() - std::chrono::hours(1);
  size_t printed_done = static_cast<size_t>(-1);

  const auto done_tokens = [&] {
    int64_t t = 0;
    for (const auto& r : runs) {
      if (results.count(r.id)) t += r.cfg.train.steps * r.tokens_per_update;
      else t += std::min(r.cfg.train.steps, last_step(r.cfg.out.dir + "/metrics.jsonl")) * r.tokens_per_update;
    }
    return t;
  };
  const auto show = [&](bool force) {
    if (opt.quiet) return;
    const auto now = std::chrono::steady_clock::now();
    const size_t ndone = results.size();
    const double since = std::chrono::duration<double>(now - last_print).count();
    if (!force && !(tty ? since >= 1.0 : (since >= 60.0 || ndone != printed_done))) return;
    last_print = now;
    printed_done = ndone;
    const int64_t total = total_tokens(), done = done_tokens();
    if (tokens_at_start < 0) tokens_at_start = done;
    const double el = std::chrono::duration<double>(now - t0).count();
    const double rate = el > 0 ? static_cast<double>(done - tokens_at_start) / el : 0;
    const double eta = rate > 0 ? static_cast<double>(total - done) / rate : -1;
    char line[256];
    std::snprintf(line, sizeof line, "study: %zu/%zu runs done, %zu running, %.1f%% of the tokens, %s elapsed, ETA %s",
                  ndone, runs.size() + (sweep_added ? 0 : sweep_expected), children.size(),
                  total > 0 ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 100.0,
                  fmt_duration(el).c_str(), fmt_duration(eta).c_str());
    if (tty) std::fprintf(stderr, "\r%-110s", line);
    else std::fprintf(stderr, "%s\n", line);
    std::fflush(stderr);
  };

  // Runs waiting to start: an index into `runs` and when it may start (a run whose folder another
  // process still holds, such as a run of a killed study finishing its checkpoint, waits and retries).
  struct Pending {
    size_t index;
    std::chrono::steady_clock::time_point not_before;
    int tries = 0;
  };
  std::vector<Pending> pending;
  for (size_t i = 0; i < runs.size(); ++i) pending.push_back({i, t0, 0});
  const auto start_next = [&] {
    const auto now = std::chrono::steady_clock::now();
    for (auto it = pending.begin();
         it != pending.end() && children.size() < static_cast<size_t>(jobs) && failure.empty() && !g_signal.load();) {
      const Run& r = runs[it->index];
      if (results.count(r.id)) {
        it = pending.erase(it);
        continue;
      }
      if (it->not_before > now) {
        ++it;
        continue;
      }
      const std::string cfg_path = (fs::path(dir) / "configs" / (r.id + ".toml")).string();
      write_file_atomic(cfg_path, config_to_toml(r.cfg));
      const bool resume = fs::exists(fs::path(r.cfg.out.dir) / "checkpoint" / "state.json");
      const std::string log = (fs::path(dir) / "logs" / (r.id + ".log")).string();
      std::error_code ec;
      const auto size = fs::file_size(log, ec);
      const std::streamoff from = ec ? 0 : static_cast<std::streamoff>(size);
      children.push_back({spawn_run(binary, cfg_path, resume, log), it->index, it->tries, from});
      it = pending.erase(it);
    }
  };

  // Grid runs first; once every depth-sweep method has finished its grid runs, the sweep joins.
  const auto maybe_add_sweep = [&] {
    if (sweep_added) return;
    for (const auto& r : runs)
      if (!r.sweep && std::find(spec.grid.depth_methods.begin(), spec.grid.depth_methods.end(), r.method) !=
                          spec.grid.depth_methods.end() &&
          !results.count(r.id))
        return;
    std::vector<Result> grid;
    for (const auto& [id, res] : results)
      if (!res.sweep) grid.push_back(res);
    for (auto& r : sweep_runs(spec, dir, best_lrs(grid))) {
      runs.push_back(std::move(r));
      load_done(runs.back());
      pending.push_back({runs.size() - 1, std::chrono::steady_clock::now(), 0});
    }
    sweep_added = true;
  };

  bool forwarded = false;
  maybe_add_sweep();
  start_next();
  while (!children.empty() || (!pending.empty() && failure.empty() && !g_signal.load())) {
    show(false);
    int status = 0;
    const pid_t pid = children.empty() ? 0 : ::waitpid(-1, &status, WNOHANG);
    if (pid == 0 || (pid < 0 && errno == EINTR)) {
      if (g_signal.load() && !forwarded) {
        forwarded = true;
        for (const auto& c : children) ::kill(c.pid, SIGTERM);  // each checkpoints and stops
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      start_next();
      continue;
    }
    if (pid < 0) throw Error(std::string("waiting for the study's runs failed: ") + std::strerror(errno));
    auto it = std::find_if(children.begin(), children.end(), [&](const Child& c) { return c.pid == pid; });
    if (it == children.end()) continue;
    const Child done = *it;
    children.erase(it);
    const Run& r = runs[done.index];
    const std::string log = (fs::path(dir) / "logs" / (r.id + ".log")).string();
    const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    const std::string why = last_line(log, done.log_from, ok ? "" : kLockHeld);
    if (ok || why.find("training diverged") != std::string::npos) {
      const Result res = read_result(r, r.cfg.out.dir, !ok);
      write_file_atomic(result_path(r), result_to_json(res));
      results[r.id] = res;
    } else if (why.find(kLockHeld) != std::string::npos && done.tries < kLockRetries &&
               !g_signal.load()) {
      pending.push_back({done.index, std::chrono::steady_clock::now() + std::chrono::seconds(1), done.tries + 1});
    } else if (!g_signal.load() && failure.empty()) {
      failure = "run " + r.id + " failed (" + exit_description(status) + "): " + (why.empty() ? "no message" : why) +
                " (log: " + log + ")";
      forwarded = true;
      for (const auto& c : children) ::kill(c.pid, SIGTERM);
    }
    maybe_add_sweep();
    start_next();
  }
  show(true);
  if (tty) std::fprintf(stderr, "\n");
  if (!failure.empty()) throw Error(failure + "; finished runs are kept, run the study again to continue");
  if (g_signal.load()) {
    std::fprintf(stderr, "pipenag: study interrupted by signal %d; every unfinished run saved a checkpoint: run the "
                 "same command again to continue\n", g_signal.load());
    return 128 + g_signal.load();
  }
  std::vector<Result> all;
  for (const auto& r : runs)
    if (results.count(r.id)) all.push_back(results[r.id]);
  std::vector<std::string> warnings;
  const auto files = write_report(spec, dir, all, opt.gnuplot, warnings);
  for (const auto& w : warnings) std::fprintf(stderr, "pipenag: warning: %s\n", w.c_str());
  if (!opt.quiet) {
    std::printf("%s", read_file((fs::path(dir) / "report" / "summary.md").string()).c_str());
    for (const auto& f : files) std::printf("wrote %s\n", f.c_str());
  }
  return 0;
}

}  // namespace pipenag::study
