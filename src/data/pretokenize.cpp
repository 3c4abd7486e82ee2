#include "data/pretokenize.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cstring>
#include <new>

#include "util/error.h"

namespace pipenag {

// Unicode White_Space, as a character class body ([WS] = \s, [^WS] = \S).
#define PIPENAG_WS "\\t-\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
const char* const kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" PIPENAG_WS "\\p{L}\\p{N}]+|[" PIPENAG_WS
    "]+(?![^" PIPENAG_WS "])|[" PIPENAG_WS "]+";
#undef PIPENAG_WS

namespace {

struct ByteTables {
  std::array<char32_t, 256> to_unicode{};
  std::array<uint8_t, 256> order{};
  ByteTables() {
    int k = 0, extra = 0;
    std::array<bool, 256> printable{};
    for (int b = '!'; b <= '~'; ++b) printable[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
    for (int b = 0; b < 256; ++b)
      if (printable[b]) {
        to_unicode[b] = static_cast<char32_t>(b);
        order[k++] = static_cast<uint8_t>(b);
      }
    for (int b = 0; b < 256; ++b)
      if (!printable[b]) {
        to_unicode[b] = static_cast<char32_t>(256 + extra++);
        order[k++] = static_cast<uint8_t>(b);
      }
  }
};
const ByteTables& byte_tables() {
  static const ByteTables t;
  return t;
}

// Per-thread PCRE2 state: match data (one pair of offsets is all we read), and a match context
// with a JIT stack of up to 1 MiB (the default 32 KiB is enough for GPT-2's pattern; a custom
// pattern may need more).
struct MatchState {
  pcre2_match_data* md = nullptr;
  pcre2_match_context* mc = nullptr;
  pcre2_jit_stack* js = nullptr;
  MatchState() {
    md = pcre2_match_data_create(1, nullptr);
    mc = pcre2_match_context_create(nullptr);
    js = pcre2_jit_stack_create(32 * 1024, 1024 * 1024, nullptr);
    if (!md || !mc || !js) {
      release();
      throw std::bad_alloc();
    }
    pcre2_jit_stack_assign(mc, nullptr, js);
  }
  ~MatchState() { release(); }
  void release() {
    if (md) pcre2_match_data_free(md);
    if (mc) pcre2_match_context_free(mc);
    if (js) pcre2_jit_stack_free(js);
    md = nullptr;
    mc = nullptr;
    js = nullptr;
  }
};
MatchState& match_state() {
  thread_local MatchState s;
  return s;
}

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  if (pcre2_get_error_message(code, buf, sizeof buf) < 0) return "error " + std::to_string(code);
  return reinterpret_cast<const char*>(buf);
}

}  // namespace

const std::array<char32_t, 256>& byte_to_unicode() { return byte_tables().to_unicode; }
const std::array<uint8_t, 256>& gpt2_byte_order() { return byte_tables().order; }

size_t utf8_sequence_length(std::string_view s, size_t i) {
  const size_t n = s.size() - i;
  const auto u = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const unsigned c0 = u(0);
  if (c0 < 0x80) return 1;
  if (c0 < 0xC2) return 0;
  const auto cont = [](unsigned c) { return (c & 0xC0) == 0x80; };
  if (c0 < 0xE0) return n >= 2 && cont(u(1)) ? 2 : 0;
  if (c0 < 0xF0) {
    if (n < 3) return 0;
    const unsigned c1 = u(1);
    const unsigned lo = c0 == 0xE0 ? 0xA0 : 0x80, hi = c0 == 0xED ? 0x9F : 0xBF;
    return c1 >= lo && c1 <= hi && cont(u(2)) ? 3 : 0;
  }
  if (c0 < 0xF5) {
    if (n < 4) return 0;
    const unsigned c1 = u(1);
    const unsigned lo = c0 == 0xF0 ? 0x90 : 0x80, hi = c0 == 0xF4 ? 0x8F : 0xBF;
    return c1 >= lo && c1 <= hi && cont(u(2)) && cont(u(3)) ? 4 : 0;
  }
  return 0;
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

size_t Pretokenizer::valid_run_end(std::string_view s, size_t i) {
  const size_t n = s.size();
  while (i < n) {
    // ASCII fast path, eight bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ULL) break;
      i += 8;
    }
    if (i >= n) break;
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const size_t len = utf8_sequence_length(s, i);
    if (len == 0) return i;
    i += len;
  }
  return n;
}

Pretokenizer::Pretokenizer(const std::string& pattern, const std::string& source) {
  int err = 0;
  PCRE2_SIZE off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
  if (!code)
    throw Error(source + ": pre-tokenizer regex does not compile at offset " +
                std::to_string(off) + ": " + pcre2_message(err));
  code_ = code;
  // Without JIT (not built in, or executable memory refused) the interpreter still works.
  jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
}

Pretokenizer::~Pretokenizer() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

bool Pretokenizer::next_match(std::string_view run, size_t start, size_t& begin,
                              size_t& end) const {
  auto* code = static_cast<const pcre2_code*>(code_);
  MatchState& st = match_state();
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(run.data());
  int rc = jit_ ? pcre2_jit_match(code, subject, run.size(), start, 0, st.md, st.mc)
                : pcre2_match(code, subject, run.size(), start, PCRE2_NO_UTF_CHECK, st.md, st.mc);
  if (rc < 0 && rc != PCRE2_ERROR_NOMATCH && jit_)  // e.g. JIT stack exhausted: interpret
    rc = pcre2_match(code, subject, run.size(), start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, st.md,
                     st.mc);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) throw Error("pre-tokenizer regex failed: " + pcre2_message(rc));
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.md);
  begin = ov[0];
  end = ov[1];
  // \K in a custom pattern can put the start after the end or before `start`: ignore it.
  if (begin < start || end < begin) begin = end = start;
  return true;
}

std::vector<std::string_view> Pretokenizer::pieces(std::string_view text) const {
  std::vector<std::string_view> out;
  split(text, [&](std::string_view p) { out.push_back(p); });
  return out;
}

}  // namespace pipenag
