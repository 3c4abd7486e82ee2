// A pipenag checkpoint is loadable by PyTorch and is the same model there: a tiny model trained
// by the binary is loaded by bench/torch_checkpoint_check.py into the PyTorch model of
// bench/pytorch_gpt.py (load_state_dict strict, pipenag's tensor names), whose greedy generation
// must equal `pipenag sample --temperature 0` token for token. Fails, never skips, where Debian's
// /usr/bin/python3 cannot import torch: scripts/test installs python3-torch, and a check that
// quietly does not run is no check.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>

#include "test_util.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

namespace {

using namespace pipenag::testutil;

bool torch_available() {
  static const bool ok = std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") == 0;
  return ok;
}

class TorchInterop : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(torch_available())
        << "/usr/bin/python3 cannot import torch: install Debian's python3-torch (scripts/test does)";
    dir_ = fresh_test_dir("pipenag_torch");
    write_word_corpus(dir_ / "corpus");
  }
  void TearDown() override {
    if (!dir_.empty() && !HasFailure()) fs::remove_all(dir_);
  }

  RunResult run(const std::string& cmd_line) { return run_command(cmd_line, dir_); }

  // Trains the tiny model for 30 steps; returns its checkpoint folder.
  fs::path train(const std::string& activation, bool tie) {
    spit(dir_ / "tiny.toml", R"([model]
n_layer = 2
n_embd = 32
n_head = 2
block_size = 32
vocab_size = 256
activation = ")" + activation + R"("
tie_embeddings = )" + (tie ? "true" : "false") + R"(
[train]
steps = 30
batch_size = 4
lr = 3e-3
warmup_steps = 3
eval_every = 0
threads = 2
[data]
input = ")" + (dir_ / "corpus").string() + R"("
val_fraction = 0.2
[out]
dir = ")" + (dir_ / "out").string() + "\"\n");
    const RunResult r = run(std::string(PIPENAG_BINARY) + " train -q --config " + (dir_ / "tiny.toml").string());
    EXPECT_EQ(r.code, 0) << r.err;
    EXPECT_THAT(r.out, HasSubstr("done: 30 steps"));
    return dir_ / "out" / "checkpoint";
  }

  RunResult check(const fs::path& ck, const std::string& pipenag = PIPENAG_BINARY) {
    return run(std::string("/usr/bin/python3 ") + PIPENAG_SOURCE_DIR + "/bench/torch_checkpoint_check.py" +
               " --checkpoint " + ck.string() + " --pipenag " + pipenag + " --prompt 'the union '" +
               " --tokens 40 --text " + (dir_ / "corpus" / "doc0.txt").string());
  }

  // The check passed: strict load, identical greedy tokens, a trained (better than uniform) loss.
  void expect_same_model(const RunResult& r) {
    EXPECT_EQ(r.code, 0) << r.out << r.err;
    EXPECT_THAT(r.out, HasSubstr("load_state_dict(strict=True): ok"));
    EXPECT_THAT(r.out, HasSubstr("identical"));
    EXPECT_THAT(r.out, Not(HasSubstr("DIFFERENT")));
    // 40 generated tokens past the 10-byte prompt: the context window (32) has slid.
    EXPECT_THAT(r.out, HasSubstr("generated 40 tokens after a 10-token prompt"));
    std::smatch m;
    ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(pytorch cross-entropy: ([0-9.]+) nats)"))) << r.out;
    const double ce = std::stod(m[1].str());
    EXPECT_GT(ce, 0.5);
    EXPECT_LT(ce, std::log(256.0) - 1.0) << "30 steps should beat the uniform 5.545 nats by far";
  }

  fs::path dir_;
};

TEST_F(TorchInterop, ReluCheckpointIsTheSameModelInPytorch) {
  const fs::path ck = train("relu", false);
  ASSERT_TRUE(fs::exists(ck / "model.safetensors"));
  const RunResult r = check(ck);
  expect_same_model(r);
  EXPECT_THAT(r.out, HasSubstr("relu, tie_embeddings false"));
}

TEST_F(TorchInterop, GeluCheckpointIsTheSameModelInPytorch) {
  const fs::path ck = train("gelu", false);
  ASSERT_TRUE(fs::exists(ck / "model.safetensors"));
  const RunResult r = check(ck);
  expect_same_model(r);
  EXPECT_THAT(r.out, HasSubstr("gelu, tie_embeddings false"));
}

TEST_F(TorchInterop, TiedEmbeddingsCheckpointIsTheSameModelInPytorch) {
  const fs::path ck = train("gelu", true);
  ASSERT_TRUE(fs::exists(ck / "model.safetensors"));
  const RunResult r = check(ck);
  expect_same_model(r);
  // No lm_head.weight in the file: 2 + 2*11 + 2 + 1 tensors.
  EXPECT_THAT(r.out, HasSubstr("gelu, tie_embeddings true; 27 tensors"));
}

// The comparison is not vacuous: a "pipenag" that continues differently fails the check, and a
// tensor name PyTorch does not know fails the strict load.
TEST_F(TorchInterop, CheckFailsOnDifferentTokensAndUnknownNames) {
  const fs::path ck = train("relu", false);
  ASSERT_TRUE(fs::exists(ck / "model.safetensors"));
  const fs::path fake = dir_ / "fake_pipenag.sh";
  spit(fake, "#!/bin/sh\nprintf 'the union zzzz\\n'\n");
  fs::permissions(fake, fs::perms::owner_all);
  const RunResult diff = check(ck, fake.string());
  EXPECT_EQ(diff.code, 1) << diff.out << diff.err;
  EXPECT_THAT(diff.out, HasSubstr("DIFFERENT: first difference at position"));
  EXPECT_THAT(diff.out, Not(HasSubstr("identical")));

  // Same-length rename inside the JSON header keeps every offset valid.
  std::string bytes = slurp(ck / "model.safetensors");
  const size_t at = bytes.find("\"lm_head.bias\"");
  ASSERT_NE(at, std::string::npos);
  bytes.replace(at, 14, "\"lm_head.biaz\"");
  spit(ck / "model.safetensors", bytes);
  const RunResult bad = check(ck);
  EXPECT_EQ(bad.code, 2) << bad.out << bad.err;
  EXPECT_THAT(bad.err, HasSubstr("load_state_dict(strict=True) failed"));
  EXPECT_THAT(bad.err, HasSubstr("lm_head.biaz"));
}

}  // namespace
