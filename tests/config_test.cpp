// TOML configuration: defaults, files, --set overrides, the saved-config round trip, and one
// test per kind of bad input, each checking that the one-line message names the key and problem.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "io/atomic_file.h"
#include "train/config_file.h"
#include "util/error.h"
#include "test_util.h"

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;
using namespace pipenag;
using namespace pipenag::testutil;

namespace {

Config parse(const std::string& text, const std::vector<std::string>& overrides = {}) {
  return parse_config(text, "config.toml", overrides);
}

std::string parse_error(const std::string& text, const std::vector<std::string>& overrides = {}) {
  return error_of([&] { parse(text, overrides); });
}

std::string override_error(const std::string& assignment) {
  return parse_error("", {assignment});
}

// Config has no operator==; the JSON form covers every key in the table.
void expect_same(const Config& a, const Config& b) {
  EXPECT_EQ(config_to_json(a), config_to_json(b));
}

TEST(ConfigKeys, TableCoversEveryField) {
  std::set<std::string> names;
  for (const auto& k : config_keys()) {
    EXPECT_TRUE(names.insert(k.name()).second) << "duplicate " << k.name();
    EXPECT_FALSE(k.description.empty()) << k.name();
  }
  const std::vector<std::string> expected = {
      "model.n_layer", "model.n_embd", "model.n_head", "model.block_size", "model.vocab_size",
      "model.activation", "model.tie_embeddings", "model.seed", "train.steps",
      "train.batch_size", "train.lr", "train.warmup_steps", "train.min_lr_ratio",
      "train.clip", "train.clip_global",
      "train.seed", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
      "train.log_every", "train.threads", "train.bf16", "data.input", "data.tokenizer",
      "data.dir", "data.order", "data.val_fraction", "data.split_seed", "pipeline.stages",
      "pipeline.partition", "pipeline.schedule", "pipeline.microbatches", "pipeline.engine",
      "pipeline.stash", "pipeline.recompute", "pipeline.link_latency_ms", "pipeline.link_bandwidth_mbps",
      "pipeline.stage_slowdown", "pipeline.extra_inflight", "pipeline.peer_timeout_s", "optim.name", "optim.beta1", "optim.beta2",
      "optim.eps", "optim.weight_decay", "optim.momentum_decay", "optim.gamma",
      "optim.gamma_theory", "optim.adaptive", "optim.lr_reschedule", "optim.lr_reschedule_steps",
      "optim.pipemare", "optim.spectrain", "optim.delta_decay", "optim.stage_momentum",
      "optim.stage_lr_rho", "out.dir"};
  for (const auto& n : expected) EXPECT_TRUE(names.count(n)) << n;
  EXPECT_EQ(names.size(), expected.size());
}

TEST(ConfigKeys, TypeNames) {
  std::map<std::string, std::string> types;
  for (const auto& k : config_keys()) types[k.name()] = std::string(k.type_name());
  EXPECT_EQ(types["model.n_layer"], "integer");
  EXPECT_EQ(types["model.seed"], "integer");
  EXPECT_EQ(types["train.steps"], "integer");
  EXPECT_EQ(types["train.lr"], "float");
  EXPECT_EQ(types["train.bf16"], "boolean");
  EXPECT_EQ(types["data.input"], "string");
  EXPECT_EQ(types["model.activation"], "relu|gelu");
}

TEST(ConfigKeys, DescribeListsEveryKeyWithDefault) {
  const std::string help = describe_config_keys();
  for (const auto& k : config_keys()) {
    EXPECT_THAT(help, HasSubstr(k.name())) << k.name();
    EXPECT_THAT(help, HasSubstr(std::string(k.description))) << k.name();
  }
  EXPECT_THAT(help, HasSubstr("default"));
  // Each key's line carries its default value.
  const auto line_of = [&](const std::string& key) {
    const auto pos = help.find("  " + key + " ");
    EXPECT_NE(pos, std::string::npos) << key;
    return help.substr(pos, help.find('\n', pos) - pos);
  };
  EXPECT_THAT(line_of("model.n_embd"), HasSubstr(" 384 "));
  EXPECT_THAT(line_of("train.lr"), HasSubstr(" 0.0003 "));
  EXPECT_THAT(line_of("model.activation"), HasSubstr("\"relu\""));
  EXPECT_THAT(line_of("out.dir"), HasSubstr("\"out\""));
  EXPECT_THAT(line_of("train.bf16"), HasSubstr("false"));
}

TEST(ParseConfig, EmptyGivesDefaults) {
  const Config c = parse("");
  expect_same(c, Config{});
  EXPECT_EQ(c.model.n_embd, 384);
  expect_same(load_config("", {}), Config{});
}

TEST(ParseConfig, ReadsEverySection) {
  const Config c = parse(R"(
# comment
[model]
n_layer = 2
n_embd = 64
n_head = 4
block_size = 32
vocab_size = 100
activation = "gelu"
tie_embeddings = true
seed = 7

[optim]
weight_decay = 0
beta1 = 0.8
beta2 = 0.95
eps = 1e-6

[train]
steps = 50
batch_size = 4
lr = 1e-3
warmup_steps = 5
min_lr_ratio = 0.0
clip = -1.0
seed = 99
eval_every = 0
eval_batches = 3
checkpoint_every = 25
log_every = 3
threads = 2
bf16 = true

[data]
input = "/data/shakespeare.txt"
val_fraction = 0.05

[out]
dir = "runs/a"
)");
  EXPECT_EQ(c.model.n_layer, 2);
  EXPECT_EQ(c.model.n_embd, 64);
  EXPECT_EQ(c.model.n_head, 4);
  EXPECT_EQ(c.model.block_size, 32);
  EXPECT_EQ(c.model.vocab_size, 100);
  EXPECT_EQ(c.model.activation, Activation::GELU);
  EXPECT_TRUE(c.model.tie_embeddings);
  EXPECT_EQ(c.model.seed, 7u);
  EXPECT_EQ(c.train.steps, 50);
  EXPECT_EQ(c.train.batch_size, 4);
  EXPECT_EQ(c.train.lr, 1e-3);
  EXPECT_EQ(c.train.warmup_steps, 5);
  EXPECT_EQ(c.train.min_lr_ratio, 0.0);
  EXPECT_EQ(c.optim.weight_decay, 0.0);  // an integer is accepted for a float key
  EXPECT_EQ(c.optim.beta1, 0.8);
  EXPECT_EQ(c.optim.beta2, 0.95);
  EXPECT_EQ(c.optim.eps, 1e-6);
  EXPECT_EQ(c.train.clip, -1.0);
  EXPECT_EQ(c.train.seed, 99u);
  EXPECT_EQ(c.train.eval_every, 0);
  EXPECT_EQ(c.train.eval_batches, 3);
  EXPECT_EQ(c.train.checkpoint_every, 25);
  EXPECT_EQ(c.train.log_every, 3);
  EXPECT_EQ(c.train.threads, 2);
  EXPECT_TRUE(c.train.bf16);
  EXPECT_EQ(c.data.input, "/data/shakespeare.txt");
  EXPECT_EQ(c.data.val_fraction, 0.05);
  EXPECT_EQ(c.out.dir, "runs/a");
}

TEST(ParseConfig, PartialFileKeepsOtherDefaults) {
  const Config c = parse("[train]\nsteps = 10\n");
  EXPECT_EQ(c.train.steps, 10);
  Config expected;
  expected.train.steps = 10;
  expect_same(c, expected);
}

TEST(ParseConfig, DottedKeysAtTopLevel) {
  const Config c = parse("model.n_layer = 3\ntrain.lr = 0.5\n");
  EXPECT_EQ(c.model.n_layer, 3);
  EXPECT_EQ(c.train.lr, 0.5);
}

TEST(Overrides, TomlValueSyntax) {
  const Config c = parse("", {"train.lr=3e-4", "train.bf16=true", "model.n_layer=12",
                              "data.input=\"quoted path.txt\"", "train.steps=1_000",
                              "model.activation='gelu'", "optim.weight_decay=1"});
  EXPECT_EQ(c.train.lr, 3e-4);
  EXPECT_TRUE(c.train.bf16);
  EXPECT_EQ(c.model.n_layer, 12);
  EXPECT_EQ(c.data.input, "quoted path.txt");
  EXPECT_EQ(c.train.steps, 1000);
  EXPECT_EQ(c.model.activation, Activation::GELU);
  EXPECT_EQ(c.optim.weight_decay, 1.0);
}

TEST(Overrides, BareStrings) {
  const Config c = parse("", {"data.input=/path/file.txt", "model.activation=gelu",
                              "out.dir=2024", "data.input=/a b/c#d.txt"});
  EXPECT_EQ(c.data.input, "/a b/c#d.txt");  // the last override wins
  EXPECT_EQ(c.model.activation, Activation::GELU);
  EXPECT_EQ(c.out.dir, "2024");  // bare text beats the integer reading for a string key
  EXPECT_EQ(parse("", {"data.input=/path/file.txt"}).data.input, "/path/file.txt");
  EXPECT_EQ(parse("", {"data.input="}).data.input, "");
}

TEST(Overrides, ApplyAfterFileAndTrimSpaces) {
  const Config c = parse("[model]\nn_layer = 4\nn_head = 2\n", {" model.n_layer = 8 "});
  EXPECT_EQ(c.model.n_layer, 8);
  EXPECT_EQ(c.model.n_head, 2);
}

TEST(Overrides, ValidationSeesTheOverriddenValues) {
  // The file alone is invalid (384 % 5 != 0) but the override fixes it, and vice versa.
  EXPECT_EQ(parse("[model]\nn_head = 5\n", {"model.n_head=8"}).model.n_head, 8);
  EXPECT_THAT(parse_error("[model]\nn_head = 8\n", {"model.n_head=5"}),
              HasSubstr("model.n_embd (384) must be divisible by model.n_head (5)"));
  EXPECT_EQ(parse_error("", {"model.n_embd=100", "model.n_head=3"}),
            "model.n_embd (100) must be divisible by model.n_head (3)");
}

TEST(Overrides, ApplyOverrideDirectlySkipsValidation) {
  Config c;
  apply_override(c, "model.n_layer=0");
  EXPECT_EQ(c.model.n_layer, 0);
  EXPECT_THAT(error_of([&] { validate(c); }), HasSubstr("model.n_layer must be >= 1, got 0"));
}

TEST(LoadConfig, FromFileWithOverrides) {
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("pipenag_config_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string p = (dir / "run.toml").string();
  write_file_atomic(p, "[train]\nsteps = 77\n[model]\nn_layer = 3\n");
  const Config c = load_config(p, {"model.n_layer=5"});
  EXPECT_EQ(c.train.steps, 77);
  EXPECT_EQ(c.model.n_layer, 5);

  write_file_atomic(p, "[model]\nn_layer = \"x\"\n");
  EXPECT_THAT(error_of([&] { load_config(p, {}); }),
              HasSubstr(p + ": model.n_layer must be an integer, got string"));
  fs::remove_all(dir);
}

TEST(LoadConfig, MissingFileNamesPath) {
  const std::string p = ::testing::TempDir() + "/pipenag_no_such_config.toml";
  EXPECT_THAT(error_of([&] { load_config(p, {}); }),
              AllOf(HasSubstr(p), HasSubstr("cannot open")));
}

// ------------------------------------------------------------------------- round trips

Config unusual_config() {
  Config c;
  c.model.n_layer = 3;
  c.model.n_embd = 96;
  c.model.n_head = 12;
  c.model.block_size = 17;
  c.model.vocab_size = 50257;
  c.model.activation = Activation::GELU;
  c.model.tie_embeddings = true;
  c.model.seed = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  c.train.steps = 123456789012;
  c.train.batch_size = 1;
  c.train.lr = 1.0 / 3.0;
  c.train.warmup_steps = 0;
  c.train.min_lr_ratio = 1.0;
  c.optim.weight_decay = 5.0;
  c.optim.beta1 = 0.0;
  c.optim.beta2 = 0.9999999999999999;
  c.optim.eps = 4.9e-324;  // smallest subnormal
  c.train.clip = -0.0;
  c.train.seed = 0;
  c.train.eval_every = 1;
  c.train.eval_batches = 2147483647;
  c.train.checkpoint_every = 9;
  c.train.log_every = 1;
  c.train.threads = 16;
  c.train.bf16 = true;
  c.data.input = "dir with \"quotes\", \\backslash\\, tab\t, newline\n, \x7f and \xc3\xa9";
  c.data.val_fraction = 1e-10;
  c.pipeline.partition = {3};
  c.pipeline.schedule = "1f1b";
  c.pipeline.microbatches = 7;
  c.pipeline.engine = "threads";
  c.pipeline.stash = false;
  c.pipeline.recompute = true;
  c.out.dir = "out/[x] # not a comment";
  return c;
}

TEST(RoundTrip, DefaultsThroughToml) {
  const Config c;
  const std::string text = config_to_toml(c);
  expect_same(parse_config(text, "saved.toml", {}), c);
}

TEST(RoundTrip, UnusualValuesThroughToml) {
  const Config c = unusual_config();
  const std::string text = config_to_toml(c);
  const Config back = parse_config(text, "saved.toml", {});
  expect_same(back, c);
  EXPECT_EQ(back.train.lr, 1.0 / 3.0);
  EXPECT_EQ(back.optim.eps, 4.9e-324);
  EXPECT_TRUE(std::signbit(back.train.clip));
  EXPECT_EQ(back.data.input, c.data.input);
  EXPECT_EQ(back.out.dir, c.out.dir);
  EXPECT_EQ(back.model.seed, c.model.seed);
  EXPECT_EQ(back.train.steps, 123456789012);
  EXPECT_EQ(back.pipeline.partition.blocks, std::vector<int>{3});
  EXPECT_FALSE(back.pipeline.partition.automatic);
  EXPECT_EQ(back.pipeline.microbatches, 7);
}

TEST(RoundTrip, TomlListsEveryKeyOnce) {
  const std::string text = config_to_toml(Config{});
  for (const auto& k : config_keys()) {
    const std::string needle = "\n" + std::string(k.key) + " = ";
    const auto section_pos = text.find("[" + std::string(k.section) + "]");
    ASSERT_NE(section_pos, std::string::npos) << k.section;
    EXPECT_NE(text.find(needle, section_pos), std::string::npos) << k.name();
  }
  // Whole-number floats stay floats so the file is typed as the struct is.
  EXPECT_THAT(text, HasSubstr("\nclip = 1.0  #"));
  EXPECT_THAT(text, HasSubstr("\nactivation = \"relu\"  #"));
}

TEST(RoundTrip, Json) {
  const Config c = unusual_config();
  const nlohmann::json j = config_to_json(c);
  EXPECT_EQ(j["model"]["n_layer"], 3);
  EXPECT_EQ(j["model"]["activation"], "gelu");
  EXPECT_EQ(j["model"]["tie_embeddings"], true);
  EXPECT_EQ(j["train"]["lr"].get<double>(), 1.0 / 3.0);
  EXPECT_EQ(j["train"]["steps"].get<int64_t>(), 123456789012);
  EXPECT_EQ(j["data"]["input"], c.data.input);
  EXPECT_EQ(j["out"]["dir"], c.out.dir);
  EXPECT_EQ(j.size(), 7u);  // "method" and six sections
  EXPECT_EQ(j["method"], "");
  std::size_t keys = 0;
  for (const auto& [sec, tbl] : j.items())
    if (tbl.is_object()) keys += tbl.size();
  EXPECT_EQ(keys, config_keys().size());
  EXPECT_NE(config_to_json(Config{}), j);
}

// ------------------------------------------------------------------------- bad files

TEST(BadConfig, MalformedTomlHasFileLineColumn) {
  EXPECT_THAT(parse_error("[model]\nn_layer = = 3\n"), HasSubstr("config.toml:2:"));
  EXPECT_THAT(parse_error("[model\n"), HasSubstr("config.toml:1:"));
  EXPECT_THAT(parse_error("[model]\nn_layer = 1\nn_layer = 2\n"), HasSubstr("config.toml:3:"));
}

TEST(BadConfig, UnknownKeyWithSuggestion) {
  EXPECT_EQ(parse_error("[model]\nn_embed = 64\n"),
            "config.toml: unknown key 'model.n_embed' (did you mean 'model.n_embd'?)");
  EXPECT_THAT(parse_error("[train]\nlearning_rate = 1\n"),
              AllOf(HasSubstr("unknown key 'train.learning_rate'"), Not(HasSubstr("did you mean"))));
}

TEST(BadConfig, UnknownKeyInWrongSectionSuggestsHome) {
  EXPECT_THAT(parse_error("[model]\nlr = 0.1\n"),
              HasSubstr("unknown key 'model.lr' (did you mean 'train.lr'?)"));
}

TEST(BadConfig, UnknownSection) {
  EXPECT_EQ(parse_error("[modle]\nn_layer = 2\n"),
            "config.toml: unknown section '[modle]' (did you mean '[model]'?)");
  EXPECT_THAT(parse_error("[cluster]\nranks = 2\n"),
              AllOf(HasSubstr("unknown section '[cluster]'"), Not(HasSubstr("did you mean"))));
}

TEST(BadConfig, KeyOutsideAnySection) {
  EXPECT_EQ(parse_error("n_layer = 2\n"),
            "config.toml: unknown key 'n_layer' (did you mean 'model.n_layer'?)");
}

TEST(BadConfig, SectionThatIsNotATable) {
  EXPECT_THAT(parse_error("model = 3\n"), HasSubstr("'model' must be a table ([model]), got integer"));
}

TEST(BadConfig, NestedTableInsideSection) {
  EXPECT_THAT(parse_error("[model.extra]\nx = 1\n"), HasSubstr("unknown key 'model.extra'"));
}

TEST(BadConfig, WrongTypes) {
  EXPECT_EQ(parse_error("[model]\nn_layer = \"six\"\n"),
            "config.toml: model.n_layer must be an integer, got string");
  EXPECT_THAT(parse_error("[model]\nn_layer = 4.0\n"),
              HasSubstr("model.n_layer must be an integer, got float"));
  EXPECT_THAT(parse_error("[model]\ntie_embeddings = 1\n"),
              HasSubstr("model.tie_embeddings must be a boolean (true or false), got integer"));
  EXPECT_THAT(parse_error("[train]\nlr = \"fast\"\n"),
              HasSubstr("train.lr must be a number, got string"));
  EXPECT_THAT(parse_error("[data]\ninput = [1, 2]\n"),
              HasSubstr("data.input must be a string, got array"));
  EXPECT_THAT(parse_error("[train]\nsteps = 1979-05-27\n"),
              HasSubstr("train.steps must be an integer, got date"));
  EXPECT_THAT(parse_error("[model]\nactivation = 1\n"),
              HasSubstr("model.activation must be a string, got integer"));
}

TEST(BadConfig, UnknownActivation) {
  EXPECT_THAT(parse_error("[model]\nactivation = \"tanh\"\n"),
              HasSubstr("model.activation must be \"relu\" or \"gelu\", got \"tanh\""));
  EXPECT_THAT(override_error("model.activation=GELU"),
              HasSubstr("must be \"relu\" or \"gelu\", got \"GELU\""));
}

TEST(BadConfig, IntegerOverflowBeyondInt) {
  EXPECT_THAT(parse_error("[model]\nn_layer = 3000000000\n"),
              HasSubstr("model.n_layer = 3000000000 is out of range (must fit in a 32-bit integer)"));
  EXPECT_THAT(parse_error("[train]\nthreads = -2147483649\n"),
              HasSubstr("train.threads = -2147483649 is out of range"));
  // Beyond 64 bits the TOML parser itself refuses the number.
  EXPECT_THAT(parse_error("[train]\nsteps = 99999999999999999999\n"), HasSubstr("config.toml:2:"));
}

TEST(BadConfig, NegativeSeed) {
  EXPECT_THAT(parse_error("[model]\nseed = -1\n"), HasSubstr("model.seed must be >= 0, got -1"));
}

TEST(BadConfig, NonFiniteFloat) {
  EXPECT_THAT(parse_error("[train]\nlr = nan\n"),
              HasSubstr("train.lr must be a finite number, got nan"));
  EXPECT_THAT(parse_error("[train]\nclip = inf\n"),
              HasSubstr("train.clip must be a finite number, got inf"));
}

TEST(BadConfig, MessageStaysOneLineWithNewlineInKey) {
  const std::string msg = parse_error("[model]\n\"a\\nb\" = 1\n");
  EXPECT_THAT(msg, HasSubstr("unknown key 'model.a b'"));
}

// ------------------------------------------------------------------------- bad overrides

TEST(BadOverride, MissingEquals) {
  EXPECT_EQ(override_error("model.n_layer"),
            "--set 'model.n_layer': expected section.key=value");
  EXPECT_THAT(override_error("=3"), HasSubstr("expected section.key=value"));
}

TEST(BadOverride, UnknownKey) {
  EXPECT_EQ(override_error("model.n_embed=64"),
            "--set 'model.n_embed=64': unknown key 'model.n_embed' (did you mean 'model.n_embd'?)");
  EXPECT_THAT(override_error("n_layer=2"),
              HasSubstr("unknown key 'n_layer' (did you mean 'model.n_layer'?)"));
  EXPECT_THAT(override_error("cluster.ranks=2"), HasSubstr("unknown key 'cluster.ranks'"));
}

TEST(BadOverride, WrongType) {
  EXPECT_EQ(override_error("model.n_layer=abc"),
            "--set 'model.n_layer=abc': model.n_layer must be an integer, got string");
  EXPECT_THAT(override_error("train.lr=fast"), HasSubstr("train.lr must be a number, got string"));
  EXPECT_THAT(override_error("train.bf16=yes"),
              HasSubstr("train.bf16 must be a boolean (true or false), got string"));
  EXPECT_THAT(override_error("model.n_layer="), HasSubstr("must be an integer, got string"));
  EXPECT_THAT(override_error("model.n_layer=1.5"), HasSubstr("must be an integer, got float"));
}

TEST(BadOverride, IntegerOverflow) {
  EXPECT_THAT(override_error("model.n_layer=99999999999"),
              HasSubstr("model.n_layer = 99999999999 is out of range"));
}

TEST(BadOverride, InjectionOfSecondKeyIsNotApplied) {
  // "v = 1\nw = 2" parses as two keys: not a single TOML value, so it is bare (invalid) text.
  EXPECT_THAT(override_error("model.n_layer=1\nw = 2"), HasSubstr("must be an integer"));
}

// ------------------------------------------------------------------------- validation

struct ValidationCase {
  std::string override_text;
  std::string message;
};

void PrintTo(const ValidationCase& c, std::ostream* os) { *os << "--set " << c.override_text; }

class Validation : public ::testing::TestWithParam<ValidationCase> {};

TEST_P(Validation, RejectsWithMessage) {
  const auto& c = GetParam();
  EXPECT_EQ(override_error(c.override_text), c.message);
}

INSTANTIATE_TEST_SUITE_P(
    Rules, Validation,
    ::testing::Values(
        ValidationCase{"model.n_head=5", "model.n_embd (384) must be divisible by model.n_head (5)"},
        ValidationCase{"model.n_layer=0", "model.n_layer must be >= 1, got 0"},
        ValidationCase{"model.n_embd=0", "model.n_embd must be >= 1, got 0"},
        ValidationCase{"model.n_head=0", "model.n_head must be >= 1, got 0"},
        ValidationCase{"model.n_head=-2", "model.n_head must be >= 1, got -2"},
        ValidationCase{"model.block_size=0", "model.block_size must be >= 1, got 0"},
        ValidationCase{"model.vocab_size=-1", "model.vocab_size must be >= 1, got -1"},
        ValidationCase{"train.batch_size=0", "train.batch_size must be >= 1, got 0"},
        ValidationCase{"train.steps=0", "train.steps must be >= 1, got 0"},
        ValidationCase{"train.lr=-0.001", "train.lr must be >= 0, got -0.001"},
        ValidationCase{"optim.beta1=1", "optim.beta1 must be in [0, 1), got 1"},
        ValidationCase{"optim.beta1=-0.5", "optim.beta1 must be in [0, 1), got -0.5"},
        ValidationCase{"optim.beta2=1.0", "optim.beta2 must be in [0, 1), got 1"},
        ValidationCase{"train.min_lr_ratio=1.5", "train.min_lr_ratio must be in [0, 1], got 1.5"},
        ValidationCase{"train.min_lr_ratio=-0.1",
                       "train.min_lr_ratio must be in [0, 1], got -0.1"},
        ValidationCase{"data.val_fraction=0", "data.val_fraction must be in (0, 1), got 0"},
        ValidationCase{"data.val_fraction=1", "data.val_fraction must be in (0, 1), got 1"},
        ValidationCase{"train.warmup_steps=-1", "train.warmup_steps must be >= 0, got -1"},
        ValidationCase{"optim.weight_decay=-0.01",
                       "optim.weight_decay must be >= 0, got -0.01"},
        ValidationCase{"train.eval_batches=-1", "train.eval_batches must be >= 0, got -1"},
        ValidationCase{"train.threads=-1", "train.threads must be >= 0, got -1"},
        ValidationCase{"optim.eps=0", "optim.eps must be > 0, got 0"},
        ValidationCase{"train.eval_every=-5", "train.eval_every must be >= 0, got -5"},
        ValidationCase{"train.checkpoint_every=-1",
                       "train.checkpoint_every must be >= 0, got -1"},
        ValidationCase{"train.log_every=0", "train.log_every must be >= 1, got 0"},
        ValidationCase{"out.dir=\"\"", "out.dir must not be empty"}));

TEST(Validate, AcceptsBoundaryValues) {
  Config c;
  c.train.lr = 0;
  c.optim.beta1 = 0;
  c.optim.beta2 = 0;
  c.train.min_lr_ratio = 0;
  c.train.warmup_steps = 0;
  c.optim.weight_decay = 0;
  c.train.threads = 0;
  c.train.eval_every = 0;
  c.train.clip = 0;
  c.model.n_embd = 1;
  c.model.n_head = 1;
  EXPECT_NO_THROW(validate(c));
  c.train.min_lr_ratio = 1;
  c.data.val_fraction = 0.999;
  EXPECT_NO_THROW(validate(c));
}

TEST(Validate, RejectsValuesTomlCannotCarry) {
  Config c;
  c.train.seed = std::numeric_limits<uint64_t>::max();
  EXPECT_EQ(error_of([&] { validate(c); }),
            "train.seed must be <= 9223372036854775807, got 18446744073709551615");
  c = Config{};
  c.train.lr = std::numeric_limits<double>::infinity();
  EXPECT_EQ(error_of([&] { validate(c); }), "train.lr must be a finite number, got inf");
  c = Config{};
  c.data.val_fraction = std::nan("");
  EXPECT_THAT(error_of([&] { validate(c); }), HasSubstr("data.val_fraction must be a finite number"));
}

}  // namespace
