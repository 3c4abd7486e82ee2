// libFuzzer harness for the tokenizers (not part of the CMake build): for any input bytes, the
// GPT-2 pre-tokeniser's pieces are non-empty and concatenate to the input, and for byte, gpt2
// and a small BPE trained at start-up, every id is in range and decode(encode(x)) == x.
//
// Build and run from the repository root (clang with libFuzzer; scripts/setup for the GPT-2 files):
//   clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -Isrc \
//     tests/fuzz/tokenizer_fuzz.cpp src/data/tokenizer.cpp src/data/bpe.cpp \
//     src/data/bpe_train.cpp src/data/pretokenize.cpp src/io/atomic_file.cpp \
//     $(pkg-config --libs libpcre2-8) -o /tmp/tokenizer_fuzz
//   /tmp/tokenizer_fuzz -max_total_time=60 -max_len=4096
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "data/pretokenize.h"
#include "data/tokenizer.h"
#include "util/error.h"

namespace {

std::vector<std::unique_ptr<pipenag::Tokenizer>> make_tokenizers() {
  std::vector<std::unique_ptr<pipenag::Tokenizer>> toks;
  toks.push_back(pipenag::load_tokenizer("byte"));
  try {
    toks.push_back(pipenag::load_tokenizer("gpt2"));
  } catch (const pipenag::Error& e) {
    std::fprintf(stderr, "tokenizer_fuzz: no gpt2 (%s)\n", e.what());
  }
  const std::string dir =
      (std::filesystem::temp_directory_path() / "pipenag_tokenizer_fuzz_bpe").string();
  pipenag::train_bpe({"the quick brown fox jumps over the lazy dog, caf\u00e9 \u4e16\u754c 1234 "
                      "It's the end of the world as we know it.\n\n"},
                     300, dir);
  toks.push_back(pipenag::load_tokenizer(dir));
  return toks;
}

[[noreturn]] void fail(const char* what, const std::string& who) {
  std::fprintf(stderr, "tokenizer_fuzz: %s (%s)\n", what, who.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const auto toks = make_tokenizers();
  static const pipenag::Pretokenizer pre(pipenag::kGpt2Pattern, "fuzz");
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::string joined;
  for (std::string_view p : pre.pieces(text)) {
    if (p.empty()) fail("empty piece", "pretokenizer");
    joined += p;
  }
  if (joined != text) fail("pieces do not concatenate to the input", "pretokenizer");
  for (const auto& tok : toks) {
    const std::vector<int32_t> ids = tok->encode(text);
    for (int32_t id : ids)
      if (id < 0 || id >= tok->vocab_size()) fail("id out of range", tok->name());
    if (tok->decode(ids) != text) fail("decode(encode(x)) != x", tok->name());
  }
  return 0;
}
