// Helpers shared by the tests that run the pipenag binary: files, commands, a small corpus.
#pragma once
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <functional>
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

}  // namespace pipenag::testutil
