// Byte-level BPE: the tokenizer (encoder.py's algorithm), its loaders (GPT-2's encoder.json +
// vocab.bpe, Hugging Face tokenizer.json) and the writer of GPT-2's files.
#include "data/bpe.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <climits>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <queue>

#include "data/pretokenize.h"
#include "io/atomic_file.h"
#include "util/error.h"

namespace pipenag {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr int32_t kNoRank = INT32_MAX;
// Pieces up to this many bytes use the quadratic merge loop on arrays (fastest for the short
// pieces of ordinary text); longer ones the n log n heap loop.
constexpr size_t kShortPiece = 64;
constexpr const char* kEot = "<|endoftext|>";

// Control characters (a newline from a damaged file, say) would break the one-line rule.
std::string one_line(std::string s) {
  for (char& c : s)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = ' ';
  return s;
}

std::string shorten(const std::string& s, size_t max = 60) {
  return one_line(s.size() <= max ? s : s.substr(0, max) + "...");
}

// What a loader hands the tokenizer: ids, bytes and merges already checked against each other.
struct BpeSpec {
  std::string name;    // name()
  std::string source;         // file named in errors
  std::string merges_source;  // file named in errors about merges
  std::vector<std::string> tokens;  // bytes of each id
  std::vector<bool> added;          // added tokens outside the model (never produced by encode)
  struct Merge {
    int32_t left, right, result;
  };
  std::vector<Merge> merges;  // by rank
  std::string pattern = kGpt2Pattern;
  bool ignore_merges = false;  // Hugging Face: a piece that is a token is that token
};

// Per-thread cache of recently encoded pieces: bytes -> span of `ids`. Owned by one tokenizer at
// a time (its serial); another tokenizer encoding on the same thread starts it afresh, and so
// does a full cache (bounded memory: kMaxEntries pieces of up to kMaxPieceBytes, kMaxIds ids).
struct PieceCache {
  static constexpr size_t kMaxEntries = 1 << 16;
  static constexpr size_t kMaxIds = 1 << 20;
  static constexpr size_t kMaxPieceBytes = 128;
  uint64_t owner = 0;
  BytesMap<std::pair<uint32_t, uint32_t>> map;
  std::vector<int32_t> ids;
  void reset(uint64_t serial) {
    owner = serial;
    map = BytesMap<std::pair<uint32_t, uint32_t>>();  // fresh and small: cheap to alternate
    ids.clear();
  }
};

std::atomic<uint64_t> g_serial{1};

class BpeTokenizer final : public Tokenizer {
 public:
  explicit BpeTokenizer(BpeSpec spec);
  std::string name() const override { return name_; }
  int vocab_size() const override { return static_cast<int>(offsets_.size() - 1); }
  std::vector<int32_t> encode(std::string_view text) const override;
  using Tokenizer::decode;
  std::string decode(const int32_t* ids, size_t n) const override;
  std::optional<int32_t> eot() const override { return eot_; }

 private:
  std::string_view token(int32_t id) const {
    return std::string_view(bytes_).substr(offsets_[id], offsets_[id + 1] - offsets_[id]);
  }
  int32_t rank(int32_t a, int32_t b) const {
    const int32_t* r = ranks_.find(pair_key(a, b));
    return r ? *r : kNoRank;
  }
  // encoder.py's merge loop on one piece (no cache), appending the ids to out.
  void bpe(std::string_view piece, std::vector<int32_t>& out) const;
  void bpe_short(std::string_view piece, std::vector<int32_t>& out) const;
  void bpe_long(std::string_view piece, std::vector<int32_t>& out) const;

  std::string name_;
  std::string bytes_;              // all tokens' bytes, id after id
  std::vector<uint32_t> offsets_;  // token id's bytes: [offsets_[id], offsets_[id+1])
  std::array<int32_t, 256> byte_id_{};
  U64Map<int32_t> ranks_;          // pair_key(left, right) -> rank
  std::vector<int32_t> merge_result_;  // rank -> id of the merged token
  BytesMap<int32_t> whole_;        // pieces whose BPE is one token: bytes -> that id
  std::unique_ptr<Pretokenizer> pre_;
  std::optional<int32_t> eot_;
  uint64_t serial_;
};

BpeTokenizer::BpeTokenizer(BpeSpec spec)
    : name_(std::move(spec.name)), ranks_(spec.merges.size()), serial_(g_serial++) {
  const size_t V = spec.tokens.size();
  if (V == 0) throw Error(spec.source + ": the vocabulary is empty");
  offsets_.reserve(V + 1);
  offsets_.push_back(0);
  for (const std::string& t : spec.tokens) {
    bytes_ += t;
    offsets_.push_back(static_cast<uint32_t>(bytes_.size()));
  }
  byte_id_.fill(-1);
  for (size_t id = 0; id < V; ++id) {
    if (spec.added[id] || spec.tokens[id].size() != 1) continue;
    const auto b = static_cast<unsigned char>(spec.tokens[id][0]);
    if (byte_id_[b] >= 0)
      throw Error(spec.source + ": ids " + std::to_string(byte_id_[b]) + " and " +
                  std::to_string(id) + " are the same byte");
    byte_id_[b] = static_cast<int32_t>(id);
  }
  for (int b = 0; b < 256; ++b)
    if (byte_id_[b] < 0) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02x", b);
      throw Error(spec.source + ": no token for byte " + hex +
                  " (byte-level BPE needs a token for each of the 256 bytes)");
    }
  merge_result_.reserve(spec.merges.size());
  for (size_t r = 0; r < spec.merges.size(); ++r) {
    const auto& m = spec.merges[r];
    bool inserted = false;
    ranks_.get(pair_key(m.left, m.right), static_cast<int32_t>(r), &inserted);
    if (!inserted)
      throw Error(spec.merges_source + ": merge " + std::to_string(r + 1) + " ('" +
                  shorten(spec.tokens[m.left]) + "' + '" + shorten(spec.tokens[m.right]) +
                  "') appears twice");
    merge_result_.push_back(m.result);
  }
  pre_ = std::make_unique<Pretokenizer>(spec.pattern, spec.source);
  // Whole-piece shortcut: a piece equal to a token whose own BPE is that single token (in
  // GPT-2 nearly all of them) is looked up instead of merged. Exactly encoder.py's result, since
  // it is that result, precomputed.
  whole_ = BytesMap<int32_t>(V);
  std::vector<int32_t> tmp;
  for (size_t id = 0; id < V; ++id) {
    const std::string& t = spec.tokens[id];
    if (spec.added[id] || t.size() < 2) continue;
    bool one = spec.ignore_merges;
    if (!one) {
      tmp.clear();
      bpe(t, tmp);
      one = tmp.size() == 1 && tmp[0] == static_cast<int32_t>(id);
    }
    if (one) whole_.insert(t, static_cast<int32_t>(id));
  }
  for (size_t id = 0; id < V && !eot_; ++id)
    if (spec.tokens[id] == kEot) eot_ = static_cast<int32_t>(id);
}

void BpeTokenizer::bpe(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.size() <= kShortPiece)
    bpe_short(piece, out);
  else
    bpe_long(piece, out);
}

// Arrays of symbols and of the rank of each adjacent pair; quadratic, fast for short pieces.
void BpeTokenizer::bpe_short(std::string_view piece, std::vector<int32_t>& out) const {
  int32_t syms[kShortPiece], rk[kShortPiece];
  int n = static_cast<int>(piece.size());
  for (int i = 0; i < n; ++i) syms[i] = byte_id_[static_cast<unsigned char>(piece[i])];
  for (int i = 0; i + 1 < n; ++i) rk[i] = rank(syms[i], syms[i + 1]);
  while (n > 1) {
    int32_t r = kNoRank;
    int first = -1;
    for (int i = 0; i + 1 < n; ++i)
      if (rk[i] < r) {
        r = rk[i];
        first = i;
      }
    if (first < 0) break;
    const int32_t merged = merge_result_[r];
    // Every occurrence of the pair, left to right, not overlapping (encoder.py). The pairs made
    // by a merge contain the merged token, so they never have rank r themselves.
    for (int i = first; i + 1 < n; ++i) {
      if (rk[i] != r) continue;
      syms[i] = merged;
      std::memmove(syms + i + 1, syms + i + 2, sizeof(int32_t) * (n - i - 2));
      std::memmove(rk + i, rk + i + 1, sizeof(int32_t) * (n - i - 2));
      --n;
      if (i > 0) rk[i - 1] = rank(syms[i - 1], syms[i]);
      if (i + 1 < n) rk[i] = rank(syms[i], syms[i + 1]);
    }
  }
  out.insert(out.end(), syms, syms + n);
}

// Linked list of symbols and a heap of (rank, position), for long pieces (n log n). Each round
// takes every pair of the lowest rank, left to right; the pairs it creates wait for the next
// round, so the result is encoder.py's even for a vocabulary whose merges are out of order.
void BpeTokenizer::bpe_long(std::string_view piece, std::vector<int32_t>& out) const {
  const int n = static_cast<int>(piece.size());
  std::vector<int32_t> sym(n), next(n), prev(n);
  for (int i = 0; i < n; ++i) {
    sym[i] = byte_id_[static_cast<unsigned char>(piece[i])];
    next[i] = i + 1 < n ? i + 1 : -1;
    prev[i] = i - 1;
  }
  using Entry = std::pair<int32_t, int32_t>;  // (rank, left position)
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (int i = 0; i + 1 < n; ++i)
    if (int32_t r = rank(sym[i], sym[i + 1]); r != kNoRank) heap.push({r, i});
  std::vector<Entry> pending;
  while (!heap.empty()) {
    const int32_t r = heap.top().first;
    pending.clear();
    while (!heap.empty() && heap.top().first == r) {
      const int32_t i = heap.top().second;
      heap.pop();
      // Stale: i was merged away (sym = -1) or the pair at i changed.
      if (sym[i] < 0 || next[i] < 0 || rank(sym[i], sym[next[i]]) != r) continue;
      const int32_t j = next[i];
      sym[i] = merge_result_[r];
      sym[j] = -1;
      next[i] = next[j];
      if (next[j] >= 0) prev[next[j]] = i;
      if (prev[i] >= 0)
        if (int32_t q = rank(sym[prev[i]], sym[i]); q != kNoRank) pending.push_back({q, prev[i]});
      if (next[i] >= 0)
        if (int32_t q = rank(sym[i], sym[next[i]]); q != kNoRank) pending.push_back({q, i});
    }
    for (const Entry& e : pending) heap.push(e);
  }
  for (int i = 0; i >= 0; i = next[i]) out.push_back(sym[i]);
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text) const {
  thread_local PieceCache cache;
  if (cache.owner != serial_) cache.reset(serial_);
  std::vector<int32_t> out;
  out.reserve(text.size() / 4 + 16);
  pre_->split(text, [&](std::string_view piece) {
    if (piece.size() == 1) {
      out.push_back(byte_id_[static_cast<unsigned char>(piece[0])]);
      return;
    }
    const uint64_t h = hash_bytes(piece);
    if (const int32_t* id = whole_.find(piece, h)) {
      out.push_back(*id);
      return;
    }
    if (piece.size() > PieceCache::kMaxPieceBytes) {
      bpe(piece, out);
      return;
    }
    if (const auto* span = cache.map.find(piece, h)) {
      out.insert(out.end(), cache.ids.begin() + span->first,
                 cache.ids.begin() + span->first + span->second);
      return;
    }
    const size_t before = out.size();
    bpe(piece, out);
    if (cache.map.size() >= PieceCache::kMaxEntries || cache.ids.size() >= PieceCache::kMaxIds)
      cache.reset(serial_);
    const auto off = static_cast<uint32_t>(cache.ids.size());
    cache.ids.insert(cache.ids.end(), out.begin() + static_cast<std::ptrdiff_t>(before), out.end());
    cache.map.insert(piece, h, {off, static_cast<uint32_t>(out.size() - before)});
  });
  return out;
}

std::string BpeTokenizer::decode(const int32_t* ids, size_t n) const {
  std::string s;
  s.reserve(n * 4);
  const int32_t V = vocab_size();
  for (size_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= V)
      throw Error(name_ + ": token id " + std::to_string(ids[i]) + " is out of range (vocabulary " +
                  std::to_string(V) + ")");
    s += token(ids[i]);
  }
  return s;
}

// ---- loading ----

// GPT-2 alphabet string -> bytes; nullopt if it has a character outside the alphabet (or is not
// UTF-8).
std::optional<std::string> alphabet_to_bytes(std::string_view s) {
  static const std::array<int, 324> to_byte = [] {
    std::array<int, 324> t{};
    t.fill(-1);
    const auto& u = byte_to_unicode();
    for (int b = 0; b < 256; ++b) t[u[b]] = b;
    return t;
  }();
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const size_t len = utf8_sequence_length(s, i);
    if (len == 0 || len > 2) return std::nullopt;
    char32_t c = static_cast<unsigned char>(s[i]);
    if (len == 2) c = ((c & 0x1F) << 6) | (static_cast<unsigned char>(s[i + 1]) & 0x3F);
    if (c >= to_byte.size() || to_byte[c] < 0) return std::nullopt;
    out += static_cast<char>(to_byte[c]);
    i += len;
  }
  return out;
}

json parse_json_file(const std::string& path) {
  const std::string text = read_file(path);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw Error(path + ": not valid JSON: " + one_line(e.what()));
  }
}

// Token strings by id from a {token: id} object; Error on a duplicate or missing id.
void fill_vocab(const json& obj, const std::string& source, std::vector<std::string>& strs,
                std::vector<bool>& have) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    const json& v = it.value();
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= (int64_t{1} << 24))
      throw Error(source + ": token '" + shorten(it.key()) + "' has id " + shorten(v.dump()) +
                  ", not an integer in 0..16777215");
    const auto id = static_cast<size_t>(v.get<int64_t>());
    if (id >= strs.size()) {
      strs.resize(id + 1);
      have.resize(id + 1, false);
    }
    if (have[id])
      throw Error(source + ": id " + std::to_string(id) + " is given to both '" +
                  shorten(strs[id]) + "' and '" + shorten(it.key()) + "'");
    strs[id] = it.key();
    have[id] = true;
  }
}

void check_contiguous(const std::vector<bool>& have, const std::string& source) {
  for (size_t id = 0; id < have.size(); ++id)
    if (!have[id])
      throw Error(source + ": no token has id " + std::to_string(id) + " (ids must be 0.." +
                  std::to_string(have.size() - 1) + " without gaps)");
}

// Alphabet strings of the model's vocabulary -> bytes (Error naming the token otherwise).
void to_bytes(BpeSpec& spec, const std::vector<std::string>& strs,
              const std::vector<bool>& in_model) {
  spec.tokens.resize(strs.size());
  for (size_t id = 0; id < strs.size(); ++id) {
    if (!in_model[id]) continue;
    auto b = alphabet_to_bytes(strs[id]);
    if (!b)
      throw Error(spec.source + ": token '" + shorten(strs[id]) + "' (id " + std::to_string(id) +
                  ") has a character outside GPT-2's byte-level alphabet");
    spec.tokens[id] = std::move(*b);
  }
}

// Resolves a merge of two vocabulary strings; `where` prefixes the message ("vocab.bpe:12").
BpeSpec::Merge resolve_merge(const BytesMap<int32_t>& ids, const std::string& a,
                             const std::string& b, const std::string& where,
                             const std::string& vocab_file) {
  const int32_t* ia = ids.find(a);
  if (!ia) throw Error(where + ": token '" + shorten(a) + "' is not in " + vocab_file);
  const int32_t* ib = ids.find(b);
  if (!ib) throw Error(where + ": token '" + shorten(b) + "' is not in " + vocab_file);
  const int32_t* ir = ids.find(a + b);
  if (!ir) throw Error(where + ": merged token '" + shorten(a + b) + "' is not in " + vocab_file);
  return {*ia, *ib, *ir};
}

std::unique_ptr<Tokenizer> load_gpt2_pair(const std::string& encoder_path, const json& enc,
                                          const std::string& vocab_path, const std::string& name) {
  BpeSpec spec;
  spec.name = name;
  spec.source = encoder_path;
  spec.merges_source = vocab_path;
  if (!enc.is_object())
    throw Error(encoder_path + ": expected a JSON object of token -> id (GPT-2's encoder.json)");
  std::vector<std::string> strs;
  std::vector<bool> have;
  fill_vocab(enc, encoder_path, strs, have);
  check_contiguous(have, encoder_path);
  to_bytes(spec, strs, have);
  spec.added.assign(strs.size(), false);
  BytesMap<int32_t> ids(strs.size());
  for (size_t id = 0; id < strs.size(); ++id) ids.insert(strs[id], static_cast<int32_t>(id));

  const std::string text = read_file(vocab_path);
  const std::string vocab_name = fs::path(encoder_path).filename().string();
  size_t line_no = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || (line_no == 1 && line.starts_with("#version"))) continue;
    const size_t sp = line.find(' ');
    if (sp == std::string_view::npos || sp == 0 || sp + 1 == line.size() ||
        line.find(' ', sp + 1) != std::string_view::npos)
      throw Error(vocab_path + ":" + std::to_string(line_no) + ": expected two tokens separated by one space, got '" +
                  shorten(std::string(line)) + "'");
    spec.merges.push_back(resolve_merge(ids, std::string(line.substr(0, sp)),
                                        std::string(line.substr(sp + 1)),
                                        vocab_path + ":" + std::to_string(line_no), vocab_name));
  }
  // Every token longer than one byte must come out of some merge, except special tokens such as
  // <|endoftext|>; one that cannot means vocab.bpe lost lines (truncated) or belongs to another
  // encoder.json.
  std::vector<bool> produced(spec.tokens.size(), false);
  for (const auto& m : spec.merges) produced[static_cast<size_t>(m.result)] = true;
  size_t orphans = 0;
  std::string first;
  for (size_t id = 0; id < spec.tokens.size(); ++id) {
    const std::string& t = spec.tokens[id];
    // Special tokens (<|endoftext|>, <s>, <mask>, ...) are made by no merge by design.
    const bool special = t.size() > 2 && t.front() == '<' && t.back() == '>';
    if (t.size() > 1 && !produced[id] && !special) {
      if (orphans++ == 0) first = t;
    }
  }
  const size_t n_merges = spec.merges.size();
  auto tok = std::make_unique<BpeTokenizer>(std::move(spec));  // its own checks first
  if (orphans > 0)
    throw Error(vocab_path + ": " + std::to_string(orphans) + " tokens of " + vocab_name +
                " are made by no merge (first: '" + shorten(first) + "', id order); the file has " +
                std::to_string(n_merges) + " merges: truncated, or from another tokenizer");
  return tok;
}

std::string json_type_of(const json& j, const char* key) {
  if (!j.is_object() || !j.contains(key) || !j[key].is_string()) return {};
  return j[key].get<std::string>();
}

// Pre-tokenizer of a tokenizer.json: ByteLevel (GPT-2's regex unless use_regex is false), a
// Split(regex, Isolated), or a Sequence of those with exactly one regex and a ByteLevel.
void read_pre_tokenizer(const json& pt, const std::string& path, BpeSpec& spec) {
  bool byte_level = false, have_pattern = false;
  auto one = [&](const json& p) {
    const std::string type = json_type_of(p, "type");
    auto set_pattern = [&](std::string pat) {
      if (have_pattern)
        throw Error(path + ": pre_tokenizer splits by more than one regex (not supported)");
      have_pattern = true;
      spec.pattern = std::move(pat);
    };
    if (type == "ByteLevel") {
      byte_level = true;
      if (p.value("add_prefix_space", false))
        throw Error(path + ": ByteLevel add_prefix_space = true is not supported");
      if (p.value("use_regex", true)) set_pattern(kGpt2Pattern);
    } else if (type == "Split") {
      const json& pat = p.contains("pattern") ? p["pattern"] : json();
      if (pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string()) {
        set_pattern(pat["Regex"].get<std::string>());
      } else if (pat.is_object() && pat.contains("String") && pat["String"].is_string()) {
        std::string lit = pat["String"].get<std::string>(), quoted;
        for (char c : lit) {  // \Q..\E cannot hold "\E": escape each character instead
          if (!std::isalnum(static_cast<unsigned char>(c)) && static_cast<unsigned char>(c) < 0x80)
            quoted += '\\';
          quoted += c;
        }
        set_pattern(quoted);
      } else {
        throw Error(path + ": Split pre_tokenizer without a \"pattern\" Regex or String");
      }
      if (p.value("behavior", std::string("Isolated")) != "Isolated" || p.value("invert", false))
        throw Error(path + ": Split pre_tokenizer behavior other than Isolated is not supported");
    } else {
      throw Error(path + ": pre_tokenizer type '" + shorten(type.empty() ? p.dump() : type) +
                  "' is not supported (byte-level BPE only)");
    }
  };
  if (pt.is_null())
    throw Error(path + ": no pre_tokenizer: not a byte-level BPE tokenizer (not supported)");
  if (json_type_of(pt, "type") == "Sequence") {
    if (!pt.contains("pretokenizers") || !pt["pretokenizers"].is_array())
      throw Error(path + ": Sequence pre_tokenizer without a \"pretokenizers\" list");
    for (const json& p : pt["pretokenizers"]) one(p);
  } else {
    one(pt);
  }
  if (!byte_level)
    throw Error(path + ": pre_tokenizer has no ByteLevel step: not a byte-level BPE tokenizer");
  if (!have_pattern) spec.pattern = "[\\s\\S]+";  // no split: each valid UTF-8 run is one piece
}

std::unique_ptr<Tokenizer> load_hf(const std::string& path, const json& j,
                                   const std::string& name) {
  BpeSpec spec;
  spec.name = name;
  spec.source = path;
  spec.merges_source = path;
  const json& model = j["model"];
  if (!model.is_object()) throw Error(path + ": \"model\" is not an object");
  const std::string type = json_type_of(model, "type");
  if (!type.empty() && type != "BPE")
    throw Error(path + ": model type '" + shorten(type) + "' is not supported (only BPE)");
  if (!model.contains("vocab") || !model["vocab"].is_object())
    throw Error(path + ": model has no \"vocab\" object");
  if (!model.contains("merges") || !model["merges"].is_array())
    throw Error(path + ": model has no \"merges\" list");
  if (model.value("byte_fallback", false))
    throw Error(path + ": model byte_fallback = true is not supported (byte-level BPE only)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model.contains(key) && !model[key].is_null() &&
        !(model[key].is_string() && model[key].get<std::string>().empty()))
      throw Error(path + ": model " + key + " is not supported (byte-level BPE only)");
  if (j.contains("normalizer") && !j["normalizer"].is_null())
    throw Error(path + ": normalizer '" + shorten(json_type_of(j["normalizer"], "type")) +
                "' is not supported (it would change the text)");
  spec.ignore_merges = model.value("ignore_merges", false);
  read_pre_tokenizer(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : json(), path, spec);

  std::vector<std::string> strs;
  std::vector<bool> in_model;
  fill_vocab(model["vocab"], path, strs, in_model);
  std::vector<bool> have = in_model;
  std::vector<std::string> added_content(strs.size());
  std::vector<bool> added(strs.size(), false);
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    if (!j["added_tokens"].is_array()) throw Error(path + ": \"added_tokens\" is not a list");
    for (const json& a : j["added_tokens"]) {
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() ||
          !a.contains("content") || !a["content"].is_string() || a["id"].get<int64_t>() < 0 ||
          a["id"].get<int64_t>() >= (int64_t{1} << 24))
        throw Error(path + ": an added_tokens entry without an integer \"id\" and a \"content\"");
      const auto id = static_cast<size_t>(a["id"].get<int64_t>());
      const std::string content = a["content"].get<std::string>();
      if (id >= have.size()) {
        have.resize(id + 1, false);
        in_model.resize(id + 1, false);
        strs.resize(id + 1);
        added.resize(id + 1, false);
        added_content.resize(id + 1);
      }
      if (in_model[id]) {
        if (strs[id] != content)
          throw Error(path + ": added token '" + shorten(content) + "' has id " +
                      std::to_string(id) + ", which the vocabulary gives to '" +
                      shorten(strs[id]) + "'");
        continue;  // a vocabulary token marked special: nothing to add
      }
      if (have[id])
        throw Error(path + ": added tokens '" + shorten(added_content[id]) + "' and '" +
                    shorten(content) + "' have the same id " + std::to_string(id));
      have[id] = true;
      added[id] = true;
      added_content[id] = content;
    }
  }
  check_contiguous(have, path);
  to_bytes(spec, strs, in_model);
  for (size_t id = 0; id < added.size(); ++id)
    if (added[id]) spec.tokens[id] = added_content[id];
  spec.added = added;

  BytesMap<int32_t> ids(strs.size());
  for (size_t id = 0; id < strs.size(); ++id)
    if (in_model[id]) ids.insert(strs[id], static_cast<int32_t>(id));
  const json& merges = model["merges"];
  for (size_t k = 0; k < merges.size(); ++k) {
    const json& m = merges[k];
    const std::string where = path + ": merge " + std::to_string(k + 1);
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 == s.size() ||
          s.find(' ', sp + 1) != std::string::npos)
        throw Error(where + " ('" + shorten(s) + "') is not two tokens separated by one space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      throw Error(where + " is neither \"a b\" nor [\"a\", \"b\"]");
    }
    spec.merges.push_back(resolve_merge(ids, a, b, where, "the vocabulary"));
  }
  return std::make_unique<BpeTokenizer>(std::move(spec));
}

// Python's json.dumps (ensure_ascii) of a string.
void append_json_string(std::string& out, std::u32string_view s) {
  static const char* hex = "0123456789abcdef";
  auto u4 = [&](unsigned v) {
    out += "\\u";
    for (int k = 12; k >= 0; k -= 4) out += hex[(v >> k) & 0xF];
  };
  out += '"';
  for (char32_t c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c >= 0x20 && c < 0x7F) {
          out += static_cast<char>(c);
        } else if (c < 0x10000) {
          u4(c);
        } else {
          const char32_t v = c - 0x10000;
          u4(0xD800 + (v >> 10));
          u4(0xDC00 + (v & 0x3FF));
        }
    }
  }
  out += '"';
}

}  // namespace

namespace {

std::unique_ptr<Tokenizer> load_bpe_path_unchecked(const std::string& path,
                                                   const std::string& name) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st))
    throw Error("tokenizer '" + shorten(path, 200) +
                "': no such file or folder (give byte, gpt2, a folder with encoder.json + "
                "vocab.bpe, or a tokenizer.json)");
  if (fs::is_directory(st)) {
    const fs::path dir(path);
    const std::string enc = (dir / "encoder.json").string(), voc = (dir / "vocab.bpe").string();
    const bool has_enc = fs::exists(enc, ec), has_voc = fs::exists(voc, ec);
    if (has_enc || has_voc) {
      if (!has_enc) throw Error(enc + ": missing (the folder has vocab.bpe but no encoder.json)");
      if (!has_voc) throw Error(voc + ": missing (the folder has encoder.json but no vocab.bpe)");
      return load_gpt2_pair(enc, parse_json_file(enc), voc, name);
    }
    const std::string tj = (dir / "tokenizer.json").string();
    if (fs::exists(tj, ec)) return load_hf(tj, parse_json_file(tj), name);
    throw Error(path + ": folder has neither encoder.json + vocab.bpe nor tokenizer.json");
  }
  const json j = parse_json_file(path);
  if (j.is_object() && j.contains("model")) return load_hf(path, j, name);
  const std::string voc = (fs::path(path).parent_path() / "vocab.bpe").string();
  if (!fs::exists(voc, ec))
    throw Error(path + ": neither a tokenizer.json (no \"model\") nor an encoder.json with a "
                "vocab.bpe beside it (" + voc + " is missing)");
  return load_gpt2_pair(path, j, voc, name);
}

}  // namespace

std::unique_ptr<Tokenizer> load_bpe_path(const std::string& path, const std::string& name) {
  try {
    return load_bpe_path_unchecked(path, name);
  } catch (const json::exception& e) {  // a field of the wrong JSON type, say
    throw Error(path + ": unexpected JSON content: " + one_line(e.what()));
  }
}

void write_gpt2_files(const std::vector<std::string>& tokens,
                      const std::vector<std::pair<int32_t, int32_t>>& merges,
                      const std::string& out_dir) {
  const auto& u = byte_to_unicode();
  auto alphabet = [&](const std::string& bytes) {
    std::u32string s;
    for (unsigned char c : bytes) s += u[c];
    return s;
  };
  std::string enc = "{";
  for (size_t id = 0; id < tokens.size(); ++id) {
    if (id) enc += ", ";
    // <|endoftext|> is written as itself (all its bytes are printable ASCII anyway).
    append_json_string(enc, alphabet(tokens[id]));
    enc += ": " + std::to_string(id);
  }
  enc += "}";
  std::string voc = "#version: 0.2\n";
  for (const auto& [a, b] : merges) {
    if (a < 0 || b < 0 || static_cast<size_t>(a) >= tokens.size() ||
        static_cast<size_t>(b) >= tokens.size())
      throw Error(out_dir + ": merge of ids " + std::to_string(a) + " and " + std::to_string(b) +
                  " is out of range");
    std::string line;
    for (char32_t c : alphabet(tokens[a])) append_utf8(line, c);
    line += ' ';
    for (char32_t c : alphabet(tokens[b])) append_utf8(line, c);
    voc += line + '\n';
  }
  make_dirs(out_dir);
  write_file_atomic((fs::path(out_dir) / "encoder.json").string(), enc);
  write_file_atomic((fs::path(out_dir) / "vocab.bpe").string(), voc);
}

}  // namespace pipenag
