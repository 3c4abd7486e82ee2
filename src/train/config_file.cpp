#include "train/config_file.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <optional>
#include <toml++/toml.h>

#include "io/atomic_file.h"
#include "optim/optimizer.h"
#include "train/methods.h"
#include "util/error.h"

namespace pipenag {
namespace {

// The section name doubles as the Config member name, so a row is one line per setting.
#define PIPENAG_CONFIG_KEY(sec, fld, desc) \
  ConfigKey { #sec, #fld, desc, [](Config& c) -> ConfigField { return &c.sec.fld; } }

const std::vector<ConfigKey> kKeys = {
    PIPENAG_CONFIG_KEY(model, n_layer, "number of transformer blocks"),
    PIPENAG_CONFIG_KEY(model, n_embd, "embedding width (divisible by n_head)"),
    PIPENAG_CONFIG_KEY(model, n_head, "attention heads per block"),
    PIPENAG_CONFIG_KEY(model, block_size, "context length in tokens"),
    PIPENAG_CONFIG_KEY(model, vocab_size, "vocabulary size in tokens"),
    PIPENAG_CONFIG_KEY(model, activation, "MLP activation: \"relu\" or \"gelu\""),
    PIPENAG_CONFIG_KEY(model, tie_embeddings, "share the token embedding with the output layer"),
    PIPENAG_CONFIG_KEY(model, seed, "weight initialisation seed"),
    PIPENAG_CONFIG_KEY(train, steps, "optimizer updates"),
    PIPENAG_CONFIG_KEY(train, batch_size, "sequences per step"),
    PIPENAG_CONFIG_KEY(train, lr, "peak learning rate"),
    PIPENAG_CONFIG_KEY(train, warmup_steps, "linear warm-up steps from 0 to lr"),
    PIPENAG_CONFIG_KEY(train, min_lr_ratio, "cosine decays to lr * min_lr_ratio at the last step"),
    PIPENAG_CONFIG_KEY(train, clip, "gradient-norm clipping threshold, each stage its own gradient (<= 0 disables)"),
    PIPENAG_CONFIG_KEY(train, clip_global, "gpipe/1f1b: clip by the norm over all stages instead"),
    PIPENAG_CONFIG_KEY(train, seed, "data order seed"),
    PIPENAG_CONFIG_KEY(train, eval_every, "steps between evaluations (0 disables)"),
    PIPENAG_CONFIG_KEY(train, eval_batches, "validation batches per evaluation, spread evenly over the split (0: all of it)"),
    PIPENAG_CONFIG_KEY(train, checkpoint_every, "steps between checkpoints (0: only at the end)"),
    PIPENAG_CONFIG_KEY(train, log_every, "steps between plain log lines (when not on a terminal)"),
    PIPENAG_CONFIG_KEY(train, threads, "worker threads (0: all cores)"),
    PIPENAG_CONFIG_KEY(train, bf16, "bf16 matmul inputs with fp32 master weights"),
    PIPENAG_CONFIG_KEY(data, input, "text file or folder of .txt files, tokenised into <out.dir>/data"),
    PIPENAG_CONFIG_KEY(data, tokenizer, "byte | gpt2 | tokenizer folder or tokenizer.json (with data.input)"),
    PIPENAG_CONFIG_KEY(data, dir, "folder made by `pipenag prepare` (overrides data.input)"),
    PIPENAG_CONFIG_KEY(data, order, "training batch order: \"sequential\" or \"shuffled\""),
    PIPENAG_CONFIG_KEY(data, val_fraction, "fraction of the documents held out for validation"),
    PIPENAG_CONFIG_KEY(data, split_seed, "seed of the train/validation document split"),
    PIPENAG_CONFIG_KEY(pipeline, stages, "pipeline stages P (each needs at least one block)"),
    PIPENAG_CONFIG_KEY(pipeline, partition, "blocks per stage, e.g. [1, 2, 2, 1]; \"auto\": cut by the measured cost of each unit (empty: even split, ends lighter)"),
    PIPENAG_CONFIG_KEY(pipeline, schedule, "\"gpipe\", \"1f1b\" or \"async-1f1b\""),
    PIPENAG_CONFIG_KEY(pipeline, microbatches, "micro-batches of train.batch_size per update (gpipe, 1f1b)"),
    PIPENAG_CONFIG_KEY(pipeline, engine, "\"sequential\" (one thread), \"threads\" (one thread per stage) or \"mpi\" (one rank per stage, under mpirun)"),
    PIPENAG_CONFIG_KEY(pipeline, stash, "async-1f1b: backward under the weights its forward used"),
    PIPENAG_CONFIG_KEY(pipeline, recompute, "keep only stage inputs and recompute the forward in the backward"),
    PIPENAG_CONFIG_KEY(pipeline, link_latency_ms, "emulated latency of each message, ms: one value or one per stage boundary (timing only)"),
    PIPENAG_CONFIG_KEY(pipeline, link_bandwidth_mbps, "emulated link bandwidth, Mbit/s (0: unlimited): one value or one per boundary"),
    PIPENAG_CONFIG_KEY(pipeline, stage_slowdown, "each stage computes as if this many times slower (>= 1): one value or one per stage"),
    PIPENAG_CONFIG_KEY(pipeline, extra_inflight, "async-1f1b: E more micro-batches in flight across every stage boundary, hiding link latency (delay tau_k = (P-1-k)(1+E))"),
    PIPENAG_CONFIG_KEY(pipeline, peer_timeout_s, "mpi: a rank that sends nothing for this long is lost; every rank stops"),
    PIPENAG_CONFIG_KEY(optim, name, "sgd | nag | adamw | nadamw | nag-delay"),
    PIPENAG_CONFIG_KEY(optim, beta1, "momentum (sgd, nag) or first-moment decay (adamw, nadamw)"),
    PIPENAG_CONFIG_KEY(optim, beta2, "second-moment decay (adamw, nadamw, adaptive nag-delay)"),
    PIPENAG_CONFIG_KEY(optim, eps, "denominator epsilon"),
    PIPENAG_CONFIG_KEY(optim, weight_decay, "decoupled weight decay, all parameters"),
    PIPENAG_CONFIG_KEY(optim, momentum_decay, "nadamw: psi of mu_t = beta1 (1 - 0.5 * 0.96^(t psi))"),
    PIPENAG_CONFIG_KEY(optim, gamma, "nag-delay: momentum gamma of Eq. 10"),
    PIPENAG_CONFIG_KEY(optim, gamma_theory, "nag-delay: gamma_t = (t-2)/t instead of gamma"),
    PIPENAG_CONFIG_KEY(optim, adaptive, "nag-delay: Adam-style second-moment scaling"),
    PIPENAG_CONFIG_KEY(optim, lr_reschedule, "async: eta_k(t) = eta / tau_k^(1 - min(t/T, 1)) (PipeMare)"),
    PIPENAG_CONFIG_KEY(optim, lr_reschedule_steps, "T of lr_reschedule (0: 14% of train.steps, as the reference: 7k of 50k)"),
    PIPENAG_CONFIG_KEY(optim, pipemare, "async, no stash: backward on w - tau_k * delta (PipeMare)"),
    PIPENAG_CONFIG_KEY(optim, spectrain, "async, no stash: forward on w - tau_k * lr * smoothed update (SpecTrain)"),
    PIPENAG_CONFIG_KEY(optim, delta_decay, "EMA coefficient of PipeMare's delta and SpecTrain's smoothed update"),
    PIPENAG_CONFIG_KEY(optim, stage_momentum, "async: beta1_k = beta1 + tau_k (0.99 - beta1) / P (Ours-No-WS)"),
    PIPENAG_CONFIG_KEY(optim, stage_lr_rho, "async: eta_k = eta / tau_k^rho for tau_k >= 1 (0: off)"),
    PIPENAG_CONFIG_KEY(out, dir, "output directory for checkpoints and logs"),
};

#undef PIPENAG_CONFIG_KEY

// Reading through the mutable accessor is fine: nothing is written through the pointer.
ConfigField field_of(const ConfigKey& k, const Config& c) { return k.field(const_cast<Config&>(c)); }

std::vector<std::string_view> sections() {
  std::vector<std::string_view> out;
  for (const auto& k : kKeys)
    if (std::find(out.begin(), out.end(), k.section) == out.end()) out.push_back(k.section);
  return out;
}

const ConfigKey* find_key(std::string_view section, std::string_view key) {
  for (const auto& k : kKeys)
    if (k.section == section && k.key == key) return &k;
  return nullptr;
}

// Optimal string alignment distance: a swapped pair of letters ("n_emdb") counts as one edit.
std::size_t edit_distance(std::string_view a, std::string_view b) {
  const std::size_t n = a.size(), m = b.size();
  std::vector<std::vector<std::size_t>> d(n + 1, std::vector<std::size_t>(m + 1));
  for (std::size_t i = 0; i <= n; ++i) d[i][0] = i;
  for (std::size_t j = 0; j <= m; ++j) d[0][j] = j;
  for (std::size_t i = 1; i <= n; ++i) {
    for (std::size_t j = 1; j <= m; ++j) {
      const std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[n][m];
}

// Compares both the full name and the bare key, so a key put in the wrong section
// ("model.lr") still finds its home ("train.lr").
std::string suggestion_for_key(std::string_view full) {
  const auto dot = full.find('.');
  const std::string_view bare = dot == std::string_view::npos ? full : full.substr(dot + 1);
  const ConfigKey* best = nullptr;
  std::size_t best_d = 3;
  for (const auto& k : kKeys) {
    const std::size_t d = std::min(edit_distance(full, k.name()), edit_distance(bare, k.key));
    if (d < best_d && d < k.key.size()) {
      best = &k;
      best_d = d;
    }
  }
  return best ? " (did you mean '" + best->name() + "'?)" : "";
}

std::string suggestion_for_section(std::string_view sec) {
  std::string_view best;
  std::size_t best_d = 3;
  for (const auto s : sections()) {
    const std::size_t d = edit_distance(sec, s);
    if (d < best_d && d < s.size()) {
      best = s;
      best_d = d;
    }
  }
  return best.empty() ? "" : " (did you mean '[" + std::string(best) + "]'?)";
}

[[noreturn]] void unknown_key(std::string_view where, std::string_view full) {
  throw Error(std::string(where) + ": unknown key '" + std::string(full) + "'" +
              suggestion_for_key(full));
}

std::string_view toml_type_name(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::table: return "table";
    case toml::node_type::array: return "array";
    case toml::node_type::string: return "string";
    case toml::node_type::integer: return "integer";
    case toml::node_type::floating_point: return "float";
    case toml::node_type::boolean: return "boolean";
    case toml::node_type::date: return "date";
    case toml::node_type::time: return "time";
    case toml::node_type::date_time: return "date-time";
    default: return "nothing";
  }
}

// Shortest text that parses back to exactly `x` (std::to_chars guarantees the round trip);
// %g style so that 3e-4 reads as 0.0003 rather than 3e-04.
std::string format_double(double x) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::general);
  return std::string(buf, res.ptr);
}

std::string toml_double(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  std::string s = format_double(x);
  // "1" would read back as a TOML integer; keep it visibly a float.
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string toml_quote(std::string_view s) {
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\t': out += "\\t"; break;
      case '\n': out += "\\n"; break;
      case '\f': out += "\\f"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20 || c == 0x7f) {  // TOML forbids raw control characters in strings
          static const char* hex = "0123456789ABCDEF";
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 0xf];
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

std::optional<Activation> parse_activation(std::string_view s) {
  if (s == "relu") return Activation::ReLU;
  if (s == "gelu") return Activation::GELU;
  return std::nullopt;
}

// Stores `node` into the field of `k`; `where` names the file or override in errors.
void assign(const ConfigKey& k, Config& cfg, const toml::node& node, std::string_view where) {
  const std::string name = k.name();
  const std::string prefix = std::string(where) + ": " + name;
  const auto wrong_type = [&](std::string_view expected) {
    return Error(prefix + " must be " + std::string(expected) + ", got " +
                 std::string(toml_type_name(node)));
  };
  std::visit(
      [&](auto* p) {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, int> || std::is_same_v<T, int64_t> ||
                      std::is_same_v<T, uint64_t>) {
          const auto* v = node.as_integer();
          if (!v) throw wrong_type("an integer");
          const int64_t x = v->get();
          if constexpr (std::is_same_v<T, int>) {
            if (x < std::numeric_limits<int>::min() || x > std::numeric_limits<int>::max())
              throw Error(prefix + " = " + std::to_string(x) +
                          " is out of range (must fit in a 32-bit integer)");
          }
          if constexpr (std::is_same_v<T, uint64_t>) {
            if (x < 0) throw Error(prefix + " must be >= 0, got " + std::to_string(x));
          }
          *p = static_cast<T>(x);
        } else if constexpr (std::is_same_v<T, double>) {
          double x;
          if (const auto* f = node.as_floating_point()) {
            x = f->get();
          } else if (const auto* i = node.as_integer()) {
            x = static_cast<double>(i->get());
          } else {
            throw wrong_type("a number");
          }
          if (!std::isfinite(x))
            throw Error(prefix + " must be a finite number, got " + toml_double(x));
          *p = x;
        } else if constexpr (std::is_same_v<T, bool>) {
          const auto* v = node.as_boolean();
          if (!v) throw wrong_type("a boolean (true or false)");
          *p = v->get();
        } else if constexpr (std::is_same_v<T, std::string>) {
          const auto* v = node.as_string();
          if (!v) throw wrong_type("a string");
          *p = v->get();
        } else if constexpr (std::is_same_v<T, Partition>) {
          if (const auto* word = node.as_string()) {
            if (word->get() != "auto")
              throw Error(prefix + " must be an array of blocks per stage or \"auto\", got " +
                          toml_quote(word->get()));
            *p = Partition::make_auto();
            return;
          }
          const auto* arr = node.as_array();
          if (!arr) throw wrong_type("an array of integers or \"auto\"");
          std::vector<int> out;
          for (const auto& e : *arr) {
            const auto* v = e.as_integer();
            if (!v) throw Error(prefix + " must be an array of integers, found " +
                                std::string(toml_type_name(e)));
            if (v->get() < std::numeric_limits<int>::min() || v->get() > std::numeric_limits<int>::max())
              throw Error(prefix + ": " + std::to_string(v->get()) + " is out of range");
            out.push_back(static_cast<int>(v->get()));
          }
          *p = Partition(std::move(out));
        } else if constexpr (std::is_same_v<T, std::vector<double>>) {
          std::vector<double> out;
          const auto number = [&](const toml::node& e) {
            if (const auto* f = e.as_floating_point()) return f->get();
            if (const auto* i = e.as_integer()) return static_cast<double>(i->get());
            throw Error(prefix + " must be a number or an array of numbers, found " + std::string(toml_type_name(e)));
          };
          if (const auto* arr = node.as_array()) {
            for (const auto& e : *arr) out.push_back(number(e));
            if (out.empty()) throw Error(prefix + " must not be an empty array");
          } else {
            out.push_back(number(node));
          }
          for (double x : out)
            if (!std::isfinite(x)) throw Error(prefix + " must be finite, got " + toml_double(x));
          *p = std::move(out);
        } else {
          static_assert(std::is_same_v<T, Activation>);
          const auto* v = node.as_string();
          if (!v) throw wrong_type("a string");
          const auto a = parse_activation(v->get());
          if (!a) throw Error(prefix + " must be \"relu\" or \"gelu\", got " + toml_quote(v->get()));
          *p = *a;
        }
      },
      k.field(cfg));
}

void apply_override_impl(Config& cfg, std::string_view assignment);

// A method preset: its settings first, so that keys given explicitly win over it.
void apply_method(Config& cfg, const std::string& name, std::string_view where) {
  const Method* m = nullptr;
  try {
    m = &find_method(name);
  } catch (const Error& e) {
    throw Error(std::string(where) + ": " + e.what());
  }
  for (const auto& setting : m->settings) apply_override_impl(cfg, setting);
  cfg.method = name;
}

void apply_table(Config& cfg, const toml::table& root, std::string_view where) {
  const auto secs = sections();
  if (const toml::node* m = root.get("method")) {
    const auto* v = m->as_string();
    if (!v) throw Error(std::string(where) + ": method must be a string, got " +
                        std::string(toml_type_name(*m)));
    apply_method(cfg, v->get(), where);
  }
  for (const auto& [sec_key, sec_node] : root) {
    const std::string_view sec = sec_key.str();
    if (sec == "method") continue;
    if (std::find(secs.begin(), secs.end(), sec) == secs.end()) {
      if (sec_node.is_table())
        throw Error(std::string(where) + ": unknown section '[" + std::string(sec) + "]'" +
                    suggestion_for_section(sec));
      unknown_key(where, sec);
    }
    const auto* tbl = sec_node.as_table();
    if (!tbl)
      throw Error(std::string(where) + ": '" + std::string(sec) + "' must be a table ([" +
                  std::string(sec) + "]), got " + std::string(toml_type_name(sec_node)));
    for (const auto& [key, node] : *tbl) {
      const ConfigKey* k = find_key(sec, key.str());
      if (!k) unknown_key(where, std::string(sec) + "." + std::string(key.str()));
      assign(*k, cfg, node, where);
    }
  }
}

std::string_view trim(std::string_view s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string_view::npos) return {};
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

std::string value_text(const ConfigKey& k, const Config& cfg) {
  return std::visit(
      [](auto* p) -> std::string {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, double>) return toml_double(*p);
        else if constexpr (std::is_same_v<T, bool>) return *p ? "true" : "false";
        else if constexpr (std::is_same_v<T, std::string>) return toml_quote(*p);
        else if constexpr (std::is_same_v<T, Activation>) return toml_quote(activation_name(*p));
        else if constexpr (std::is_same_v<T, std::vector<double>>) {
          if (p->size() == 1) return toml_double(p->front());
          std::string s = "[";
          for (size_t i = 0; i < p->size(); ++i) s += (i ? ", " : "") + toml_double((*p)[i]);
          return s + "]";
        } else if constexpr (std::is_same_v<T, Partition>) {
          if (p->automatic) return "\"auto\"";
          std::string s = "[";
          for (size_t i = 0; i < p->blocks.size(); ++i)
            s += (i ? ", " : "") + std::to_string(p->blocks[i]);
          return s + "]";
        } else return std::to_string(*p);
      },
      field_of(k, cfg));
}

[[noreturn]] void invalid(const std::string& msg) { throw Error(msg); }

// Keys and values come from the user and may contain escaped newlines; the message must not.
std::string one_line(std::string s) {
  for (char& ch : s)
    if (static_cast<unsigned char>(ch) < 0x20) ch = ' ';
  return s;
}

template <typename T>
void check_min(const char* name, T v, T min) {
  if (v < min) invalid(std::string(name) + " must be >= " + std::to_string(min) + ", got " +
                       std::to_string(v));
}

void apply_override_impl(Config& cfg, std::string_view assignment) {
  const std::string where = "--set '" + std::string(assignment) + "'";
  const auto eq = assignment.find('=');
  if (eq == std::string_view::npos) throw Error(where + ": expected section.key=value");
  const std::string_view full = trim(assignment.substr(0, eq));
  const std::string_view text = trim(assignment.substr(eq + 1));
  if (full == "method") {
    std::string name(text);
    if (name.size() >= 2 && name.front() == '"' && name.back() == '"') name = name.substr(1, name.size() - 2);
    apply_method(cfg, name, where);
    return;
  }
  const auto dot = full.find('.');
  if (dot == std::string_view::npos) {
    if (full.empty()) throw Error(where + ": expected section.key=value");
    unknown_key(where, full);
  }
  const ConfigKey* k = find_key(full.substr(0, dot), full.substr(dot + 1));
  if (!k) unknown_key(where, full);

  // Parsing "v = <text>" gives TOML value syntax for free; anything else stays bare text.
  std::optional<toml::table> parsed;
  try {
    parsed = toml::parse("v = " + std::string(text));
  } catch (const toml::parse_error&) {
  }
  const toml::node* node = parsed && parsed->size() == 1 ? parsed->get("v") : nullptr;
  const bool wants_string = std::holds_alternative<std::string*>(k->field(cfg)) ||
                            std::holds_alternative<Activation*>(k->field(cfg));
  // For string keys bare text wins over a non-string parse, so data.input=2024 means "2024".
  const toml::value<std::string> bare{std::string(text)};
  if (!node || (wants_string && !node->is_string())) node = &bare;
  assign(*k, cfg, *node, where);
}

}  // namespace

std::string ConfigKey::name() const { return std::string(section) + "." + std::string(key); }

std::string_view ConfigKey::type_name() const {
  // Only the alternative matters here, so a dummy Config is enough to ask for it.
  static Config probe;
  return std::visit(
      [](auto* p) -> std::string_view {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, double>) return "float";
        else if constexpr (std::is_same_v<T, bool>) return "boolean";
        else if constexpr (std::is_same_v<T, std::string>) return "string";
        else if constexpr (std::is_same_v<T, Activation>) return "relu|gelu";
        else if constexpr (std::is_same_v<T, Partition>) return "integer array or \"auto\"";
        else if constexpr (std::is_same_v<T, std::vector<double>>) return "number or array";
        else return "integer";
      },
      field(probe));
}

const std::vector<ConfigKey>& config_keys() { return kKeys; }

std::string_view activation_name(Activation a) {
  return a == Activation::GELU ? "gelu" : "relu";
}

void apply_override(Config& cfg, std::string_view assignment) {
  try {
    apply_override_impl(cfg, assignment);
  } catch (const Error& e) {
    throw Error(one_line(e.what()));
  }
}

Config parse_config(std::string_view toml_text, std::string_view source_name,
                    const std::vector<std::string>& overrides) {
  const std::string source = source_name.empty() ? "config" : std::string(source_name);
  Config cfg;
  toml::table root;
  try {
    root = toml::parse(toml_text, source);
  } catch (const toml::parse_error& e) {
    throw Error(one_line(source + ":" + std::to_string(e.source().begin.line) + ":" +
                         std::to_string(e.source().begin.column) + ": " +
                         std::string(e.description())));
  }
  try {
    apply_table(cfg, root, source);
  } catch (const Error& e) {
    throw Error(one_line(e.what()));
  }
  for (const auto& o : overrides) apply_override(cfg, o);
  validate(cfg);
  return cfg;
}

// A config is a few kilobytes; anything past this is not one (and /dev/zero never ends).
constexpr std::size_t kMaxConfigBytes = 1 << 20;

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  if (path.empty()) return parse_config("", "defaults", overrides);
  return parse_config(read_file(path, kMaxConfigBytes), path, overrides);
}

void validate(const Config& cfg) {
  // Type-level checks for every row first, so a new row gets them without touching this code.
  for (const auto& k : kKeys) {
    const ConfigField f = field_of(k, cfg);
    if (const auto* d = std::get_if<double*>(&f); d && !std::isfinite(**d))
      invalid(k.name() + " must be a finite number, got " + toml_double(**d));
    // TOML integers are signed 64-bit: a larger seed could not be saved and read back.
    if (const auto* u = std::get_if<uint64_t*>(&f);
        u && **u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      invalid(k.name() + " must be <= " + std::to_string(std::numeric_limits<int64_t>::max()) +
              ", got " + std::to_string(**u));
  }

  const ModelConfig& m = cfg.model;
  check_min("model.n_layer", m.n_layer, 1);
  check_min("model.n_embd", m.n_embd, 1);
  check_min("model.n_head", m.n_head, 1);
  check_min("model.block_size", m.block_size, 1);
  check_min("model.vocab_size", m.vocab_size, 1);
  if (m.n_embd % m.n_head != 0)
    invalid("model.n_embd (" + std::to_string(m.n_embd) + ") must be divisible by model.n_head (" +
            std::to_string(m.n_head) + ")");

  const TrainConfig& t = cfg.train;
  check_min<int64_t>("train.steps", t.steps, 1);
  check_min("train.batch_size", t.batch_size, 1);
  check_min<int64_t>("train.warmup_steps", t.warmup_steps, 0);
  check_min<int64_t>("train.eval_every", t.eval_every, 0);
  check_min("train.eval_batches", t.eval_batches, 0);
  check_min<int64_t>("train.checkpoint_every", t.checkpoint_every, 0);
  check_min<int64_t>("train.log_every", t.log_every, 1);
  check_min("train.threads", t.threads, 0);
  if (t.lr < 0) invalid("train.lr must be >= 0, got " + format_double(t.lr));
  if (t.min_lr_ratio < 0 || t.min_lr_ratio > 1)
    invalid("train.min_lr_ratio must be in [0, 1], got " + format_double(t.min_lr_ratio));

  const DataConfig& d = cfg.data;
  if (d.val_fraction <= 0 || d.val_fraction >= 1)
    invalid("data.val_fraction must be in (0, 1), got " + format_double(d.val_fraction));
  if (d.order != "sequential" && d.order != "shuffled")
    invalid("data.order must be \"sequential\" or \"shuffled\", got \"" + d.order + "\"");
  if (d.tokenizer.empty()) invalid("data.tokenizer must not be empty");

  const PipelineConfig& p = cfg.pipeline;
  check_min("pipeline.stages", p.stages, 1);
  check_min("pipeline.microbatches", p.microbatches, 1);
  if (p.stages > m.n_layer)
    invalid("pipeline.stages (" + std::to_string(p.stages) + ") is more than model.n_layer (" +
            std::to_string(m.n_layer) + "): every stage needs at least one block");
  if (!p.partition.blocks.empty()) {
    if (static_cast<int>(p.partition.blocks.size()) != p.stages)
      invalid("pipeline.partition has " + std::to_string(p.partition.blocks.size()) +
              " entries for pipeline.stages = " + std::to_string(p.stages));
    int sum = 0;
    for (int b : p.partition.blocks) {
      if (b < 1) invalid("pipeline.partition: every stage needs at least one block, got " +
                         std::to_string(b));
      sum += b;
    }
    if (sum != m.n_layer)
      invalid("pipeline.partition sums to " + std::to_string(sum) + " blocks, model.n_layer is " +
              std::to_string(m.n_layer));
  }
  if (p.schedule != "gpipe" && p.schedule != "1f1b" && p.schedule != "async-1f1b")
    invalid("pipeline.schedule must be \"gpipe\", \"1f1b\" or \"async-1f1b\", got \"" +
            one_line(p.schedule) + "\"");
  if (p.schedule == "async-1f1b" && p.microbatches != 1)
    invalid("pipeline.microbatches must be 1 with async-1f1b (every micro-batch is an update), got " +
            std::to_string(p.microbatches));
  if (p.engine != "sequential" && p.engine != "threads" && p.engine != "mpi")
    invalid("pipeline.engine must be \"sequential\", \"threads\" or \"mpi\", got \"" + one_line(p.engine) + "\"");
  const auto per = [&](const char* key, const std::vector<double>& v, int n, const char* what, double min,
                       const char* why) {
    if (v.size() != 1 && static_cast<int>(v.size()) != n)
      invalid(std::string(key) + " has " + std::to_string(v.size()) + " values: give one, or one per " + what +
              " (" + std::to_string(n) + " with pipeline.stages = " + std::to_string(p.stages) + ")");
    for (double x : v)
      if (x < min) invalid(std::string(key) + " must be >= " + format_double(min) + ", got " + format_double(x) + why);
  };
  per("pipeline.link_latency_ms", p.link_latency_ms, p.stages - 1, "stage boundary", 0.0, "");
  per("pipeline.link_bandwidth_mbps", p.link_bandwidth_mbps, p.stages - 1, "stage boundary", 0.0, " (0: unlimited)");
  per("pipeline.stage_slowdown", p.stage_slowdown, p.stages, "stage", 1.0,
      " (a stage can be emulated slower, not faster)");
  if (p.extra_inflight < 0 || p.extra_inflight > 10000000)
    invalid("pipeline.extra_inflight must be between 0 and 10000000, got " + std::to_string(p.extra_inflight));
  if (static_cast<int64_t>(p.stages - 1) * (1 + static_cast<int64_t>(p.extra_inflight)) > 10000000)
    invalid("pipeline.extra_inflight = " + std::to_string(p.extra_inflight) + " with " + std::to_string(p.stages) +
            " stages keeps (P-1)(1+E) micro-batches in flight on stage 0: at most 10000000");
  if (p.extra_inflight > 0 && p.schedule != "async-1f1b")
    invalid("pipeline.extra_inflight applies to async-1f1b only; \"" + p.schedule + "\" flushes every update");
  if (!(p.peer_timeout_s > 0)) invalid("pipeline.peer_timeout_s must be > 0, got " + format_double(p.peer_timeout_s));
  if (m.tie_embeddings && p.stages > 1)
    invalid("model.tie_embeddings needs the embedding and the head on one stage (pipeline.stages = 1)");

  const OptimConfig& o = cfg.optim;
  const auto& names = optimizer_names();
  if (std::find(names.begin(), names.end(), o.name) == names.end())
    invalid("unknown optimizer optim.name = \"" + one_line(o.name) +
            "\" (expected sgd, nag, adamw, nadamw or nag-delay)");
  const auto unit = [](const char* key, double v) {
    if (v < 0 || v >= 1) invalid(std::string(key) + " must be in [0, 1), got " + format_double(v));
  };
  unit("optim.beta1", o.beta1);
  unit("optim.beta2", o.beta2);
  unit("optim.gamma", o.gamma);
  unit("optim.delta_decay", o.delta_decay);
  // Adam divides by sqrt(v) + eps, and v is 0 for a parameter whose gradient has been 0.
  if (o.eps <= 0) invalid("optim.eps must be > 0, got " + format_double(o.eps));
  if (o.weight_decay < 0) invalid("optim.weight_decay must be >= 0, got " + format_double(o.weight_decay));
  if (o.momentum_decay < 0)
    invalid("optim.momentum_decay must be >= 0, got " + format_double(o.momentum_decay));
  if (o.stage_lr_rho < 0) invalid("optim.stage_lr_rho must be >= 0, got " + format_double(o.stage_lr_rho));
  check_min<int64_t>("optim.lr_reschedule_steps", o.lr_reschedule_steps, 0);
  if ((o.gamma_theory || o.adaptive) && o.name != "nag-delay")
    invalid(std::string(o.gamma_theory ? "optim.gamma_theory" : "optim.adaptive") +
            " only applies to optim.name = \"nag-delay\", not \"" + o.name + "\"");
  // Corrections act on a delay; synchronous schedules have none.
  const bool async = p.schedule == "async-1f1b";
  for (const auto& [on, key] : std::vector<std::pair<bool, const char*>>{
           {o.lr_reschedule, "optim.lr_reschedule"}, {o.pipemare, "optim.pipemare"},
           {o.spectrain, "optim.spectrain"}, {o.stage_momentum, "optim.stage_momentum"},
           {o.stage_lr_rho > 0, "optim.stage_lr_rho"}})
    if (on && !async)
      invalid(std::string(key) + " corrects a gradient delay, but pipeline.schedule \"" +
              p.schedule + "\" has none (use \"async-1f1b\")");
  if (o.pipemare && p.stash)
    invalid("optim.pipemare estimates the forward's weights, which pipeline.stash already keeps: "
            "set pipeline.stash = false");
  if (o.spectrain && p.stash)
    invalid("optim.spectrain predicts the weights the update will apply to; with pipeline.stash "
            "the backward would not use them: set pipeline.stash = false");
  if (o.pipemare && o.spectrain)
    invalid("optim.pipemare and optim.spectrain are two alternative corrections: choose one");
  if (t.clip_global && async)
    invalid("train.clip_global needs a synchronous schedule (gpipe or 1f1b): async-1f1b stages "
            "update at different times");

  if (cfg.out.dir.empty()) invalid("out.dir must not be empty");
}

std::string config_to_toml(const Config& cfg) {
  std::string out =
      "# pipenag configuration: every key, with its value in this run.\n"
      "# `pipenag train --config <this file>` reproduces the settings.\n";
  if (!cfg.method.empty())
    out += "\nmethod = " + toml_quote(cfg.method) + "  # preset applied first (`pipenag methods`)\n";
  std::string_view section;
  for (const auto& k : kKeys) {
    if (k.section != section) {
      section = k.section;
      out += "\n[" + std::string(section) + "]\n";
    }
    out += std::string(k.key) + " = " + value_text(k, cfg) + "  # " + std::string(k.description) +
           "\n";
  }
  return out;
}

nlohmann::json config_to_json(const Config& cfg) {
  nlohmann::json j = nlohmann::json::object();
  j["method"] = cfg.method;
  for (const auto& k : kKeys) {
    nlohmann::json& slot = j[std::string(k.section)][std::string(k.key)];
    std::visit(
        [&](auto* p) {
          using T = std::remove_pointer_t<decltype(p)>;
          if constexpr (std::is_same_v<T, Activation>) slot = std::string(activation_name(*p));
          else if constexpr (std::is_same_v<T, Partition>) {
            if (p->automatic) slot = "auto";
            else slot = p->blocks;
          } else if constexpr (std::is_same_v<T, std::vector<double>>) {
            if (p->size() == 1) slot = p->front();
            else slot = *p;
          } else slot = *p;
        },
        field_of(k, cfg));
  }
  return j;
}

std::string describe_config_keys() {
  const Config defaults;
  struct Line {
    std::string name, type, def;
    std::string_view desc;
  };
  std::vector<Line> lines;
  std::size_t w_name = 3, w_type = 4, w_def = 7;
  for (const auto& k : kKeys) {
    Line l{k.name(), std::string(k.type_name()), value_text(k, defaults), k.description};
    w_name = std::max(w_name, l.name.size());
    w_type = std::max(w_type, l.type.size());
    w_def = std::max(w_def, l.def.size());
    lines.push_back(std::move(l));
  }
  const auto pad = [](std::string s, std::size_t w) {
    s.resize(std::max(s.size(), w), ' ');
    return s;
  };
  std::string out = "  " + pad("key", w_name) + "  " + pad("type", w_type) + "  " +
                    pad("default", w_def) + "  description\n";
  for (const auto& l : lines)
    out += "  " + pad(l.name, w_name) + "  " + pad(l.type, w_type) + "  " + pad(l.def, w_def) +
           "  " + std::string(l.desc) + "\n";
  return out;
}

}  // namespace pipenag
