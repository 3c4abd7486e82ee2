// Helpers shared by the tests that run the pipenag binary: files, commands, a small corpus.
#pragma once
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <functional>
#include <nlohmann/json.hpp>
#include <filesystem>
#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "util/error.h"

namespace pipenag::testutil {

namespace fs = std::filesystem;

struct RunResult {
  int code = -1;  // exit status, or 128 + signal
  std::string out, err;
};

inline std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline void spit(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}

// The message of the pipenag::Error that f throws; a test failure if it throws nothing or
// something else, or if the message is not a single line.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "message is not one line: " << msg;
    return msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected pipenag::Error, got std::exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "expected pipenag::Error, nothing was thrown";
  return {};
}

// Runs a shell command line, capturing stdout and stderr through files in `scratch`.
inline RunResult run_command(const std::string& cmd_line, const fs::path& scratch) {
  const fs::path o = scratch / "stdout.txt", e = scratch / "stderr.txt";
  const std::string cmd = cmd_line + " >" + o.string() + " 2>" + e.string();
  const int st = std::system(cmd.c_str());
  RunResult r;
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.out = slurp(o);
  r.err = slurp(e);
  return r;
}

// A fresh, empty folder named after the running test.
inline fs::path fresh_test_dir(const std::string& prefix) {
  const fs::path d = fs::path(::testing::TempDir()) /
                     (prefix + "_" + std::to_string(::getpid()) + "_" +
                      ::testing::UnitTest::GetInstance()->current_test_info()->name());
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// A fixture with a fresh folder per test, removed afterwards.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           ("pipenag_" + std::string(info->test_suite_name()) + "_" + info->name() + "_" +
            std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir_)) names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }
  fs::path dir_;
};

// Five deterministic documents of pseudo-English words (about 10 KB each) in `dir`.
inline void write_word_corpus(const fs::path& dir) {
  fs::create_directories(dir);
  const char* words[] = {"the", "union", "congress", "people", "law", "peace", "trade",
                         "state", "nation", "year", "public", "duty", "war", "treaty"};
  unsigned s = 1;
  for (int d = 0; d < 5; ++d) {
    std::string text;
    for (int i = 0; i < 1500; ++i) {
      s = s * 1103515245u + 12345u;
      text += words[(s >> 16) % 14];
      text += (i % 11 == 10) ? ".\n" : " ";
    }
    spit(dir / ("doc" + std::to_string(d) + ".txt"), text);
  }
}

// A fixture for tests that run the pipenag binary (PIPENAG_BINARY): a fresh folder per test with
// the word corpus in corpus/, kept when the test fails.
class BinaryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fresh_test_dir("pipenag_bin");
    write_word_corpus(dir_ / "corpus");
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }
#ifdef PIPENAG_BINARY
  RunResult run(const std::string& args) {
    return run_command(std::string(PIPENAG_BINARY) + " " + args, dir_);
  }
  // A failing command: non-zero exit, no crash, exactly one line "pipenag: ..." (containing
  // `needle`) on stderr, which is returned.
  std::string expect_error(const std::string& args, const std::string& needle = "") {
    const RunResult r = run(args);
    EXPECT_NE(r.code, 0) << args;
    EXPECT_LT(r.code, 128) << "crashed: " << args;
    EXPECT_EQ(r.err.rfind("pipenag: ", 0), 0u) << args << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << args << ": " << r.err;
    return r.err;
  }
#endif
  // Every line of <out>/metrics.jsonl.
  std::vector<nlohmann::json> metrics(const fs::path& out) {
    std::vector<nlohmann::json> v;
    std::istringstream in(slurp(out / "metrics.jsonl"));
    std::string line;
    while (std::getline(in, line)) v.push_back(nlohmann::json::parse(line));
    return v;
  }
  // The [model], [train] and [data] sections of a tiny model (blocks of width 32, context 32,
  // byte vocabulary) trained on the corpus; out.dir is <dir_>/out.
  std::string tiny_model_toml(int n_layer, int steps, int eval_every) const {
    return "[model]\nn_layer = " + std::to_string(n_layer) +
           "\nn_embd = 32\nn_head = 2\nblock_size = 32\nvocab_size = 256\n[train]\nsteps = " +
           std::to_string(steps) + "\nbatch_size = 4\nlr = 3e-3\nwarmup_steps = 2\neval_every = " +
           std::to_string(eval_every) + "\neval_batches = 2\nthreads = 2\n[data]\ninput = \"" +
           (dir_ / "corpus").string() + "\"\nval_fraction = 0.2\n[out]\ndir = \"" +
           (dir_ / "out").string() + "\"\n";
  }
  fs::path dir_;
};

}  // namespace pipenag::testutil
