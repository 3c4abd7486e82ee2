// Pre-tokenisation for byte-level BPE (internal to the tokenizers, see data/tokenizer.h):
// GPT-2's byte <-> unicode alphabet, UTF-8 validity, and the regex splitter (PCRE2, JIT).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace pipenag {

// GPT-2's pattern (OpenAI's encoder.py). \s is spelled out as Unicode's White_Space property so
// that the split does not depend on the PCRE2 version's idea of \s (10.42 also counts U+180E):
// this is what tiktoken's (Rust) \s matches.
extern const char* const kGpt2Pattern;

// bytes_to_unicode() of encoder.py: byte b is written as the code point byte_to_unicode()[b]
// (printable Latin-1 bytes as themselves, the others as U+0100 + n in byte order).
const std::array<char32_t, 256>& byte_to_unicode();
// The bytes in the order of bytes_to_unicode() (GPT-2's ids 0..255: '!' first, then ... 0x00 ...).
const std::array<uint8_t, 256>& gpt2_byte_order();

// Length of the valid UTF-8 sequence starting at s[i] (1..4), or 0 when the byte at s[i] does not
// start one (stray continuation byte, overlong form, surrogate, above U+10FFFF, truncated).
size_t utf8_sequence_length(std::string_view s, size_t i);
// Appends the UTF-8 encoding of code point c.
void append_utf8(std::string& out, char32_t c);

// A compiled pre-tokenisation regex. split() is const and thread-safe (per-thread match data).
//
// Invalid UTF-8: PCRE2 in UTF mode only accepts valid UTF-8, so the text is cut into maximal
// valid runs; each run is split by the regex and every invalid byte becomes a piece of its own
// (one byte token). The pieces always concatenate to the input, so decode(encode(x)) == x for any
// bytes. Text that is valid UTF-8 is split exactly as the regex splits it; near an invalid byte
// the split equals what tiktoken gives for the common cases (it sees U+FFFD there instead).
// Text the regex does not cover (impossible for GPT-2's pattern) is kept as pieces too.
class Pretokenizer {
 public:
  // Error (naming `source`) if the pattern does not compile.
  Pretokenizer(const std::string& pattern, const std::string& source);
  ~Pretokenizer();
  Pretokenizer(const Pretokenizer&) = delete;
  Pretokenizer& operator=(const Pretokenizer&) = delete;

  // Calls f(std::string_view piece) for each piece, in order.
  template <typename F>
  void split(std::string_view text, F&& f) const {
    size_t i = 0;
    const size_t n = text.size();
    while (i < n) {
      size_t j = valid_run_end(text, i);
      if (j > i) split_valid(text.substr(i, j - i), f);
      if (j < n) {
        f(text.substr(j, 1));
        ++j;
      }
      i = j;
    }
  }
  std::vector<std::string_view> pieces(std::string_view text) const;

 private:
  static size_t valid_run_end(std::string_view s, size_t i);
  // Next match in run[start..]: [begin, end) offsets, false when none.
  bool next_match(std::string_view run, size_t start, size_t& begin, size_t& end) const;
  template <typename F>
  void split_valid(std::string_view run, F& f) const {
    size_t pos = 0;     // start of the text not yet handed out
    size_t search = 0;  // where the next match may start
    while (pos < run.size()) {
      size_t b = 0, e = 0;
      if (!next_match(run, search, b, e)) break;
      if (e == b) {
        // An empty match (only with a custom pattern): look again one character later.
        const size_t len = utf8_sequence_length(run, b);
        search = b + (len ? len : 1);
        if (search >= run.size()) break;
        continue;
      }
      if (b > pos) f(run.substr(pos, b - pos));
      f(run.substr(b, e - b));
      pos = search = e;
    }
    if (pos < run.size()) f(run.substr(pos));
  }

  void* code_ = nullptr;  // pcre2_code_8*
  bool jit_ = false;
};

}  // namespace pipenag
