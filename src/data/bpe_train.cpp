// Byte-level BPE training (see train_bpe in data/tokenizer.h).
//
// The corpus is pre-tokenised once and reduced to word types with their counts; merging then
// works on the word types only, with pair counts kept up to date incrementally: a merge visits
// just the words that contain its pair (an index pair -> words), subtracts their old pairs and
// adds their new ones. The best pair comes from a max-heap with lazy deletion: an entry whose
// count is out of date is put back with the current count when it reaches the top.
#include <algorithm>
#include <array>
#include <cstdint>
#include <queue>

#include "data/bpe.h"
#include "data/pretokenize.h"
#include "data/tokenizer.h"
#include "util/error.h"

namespace pipenag {

namespace {

struct Candidate {
  int64_t count;
  int32_t left, right;
};
// Heap order: highest count first, then the smallest left id, then the smallest right id.
struct WorseCandidate {
  bool operator()(const Candidate& a, const Candidate& b) const {
    if (a.count != b.count) return a.count < b.count;
    if (a.left != b.left) return a.left > b.left;
    return a.right > b.right;
  }
};

}  // namespace

void train_bpe(const std::vector<std::string>& documents, int vocab_size,
               const std::string& out_dir) {
  if (vocab_size < 257)
    throw Error("train_bpe: vocab_size " + std::to_string(vocab_size) +
                " is below 257 (256 byte tokens + <|endoftext|>)");
  if (vocab_size > (1 << 24))
    throw Error("train_bpe: vocab_size " + std::to_string(vocab_size) + " is above 16777216");
  size_t total = 0;
  for (const auto& d : documents) total += d.size();
  if (total == 0) throw Error("train_bpe: the corpus is empty");

  // Word types and their counts.
  const Pretokenizer pre(kGpt2Pattern, "GPT-2 pattern");
  BytesMap<uint32_t> word_index(1 << 16);
  std::vector<std::string> words;
  std::vector<int64_t> freq;
  for (const auto& doc : documents)
    pre.split(doc, [&](std::string_view piece) {
      const uint64_t h = hash_bytes(piece);
      if (const uint32_t* w = word_index.find(piece, h)) {
        ++freq[*w];
        return;
      }
      word_index.insert(piece, h, static_cast<uint32_t>(words.size()));
      words.emplace_back(piece);
      freq.push_back(1);
    });

  // Ids 0..255: the bytes in GPT-2's order.
  std::array<int32_t, 256> byte_id{};
  std::vector<std::string> tokens;
  BytesMap<int32_t> token_ids(2 * static_cast<size_t>(vocab_size));
  for (int k = 0; k < 256; ++k) {
    const uint8_t b = gpt2_byte_order()[k];
    byte_id[b] = k;
    tokens.emplace_back(1, static_cast<char>(b));
    token_ids.insert(tokens.back(), k);
  }
  const std::string eot = "<|endoftext|>";
  token_ids.insert(eot, vocab_size - 1);  // reserved: no merge may produce these bytes

  // Symbols of the words that have at least one pair, pair counts, and pair -> words.
  std::vector<std::vector<int32_t>> syms;
  std::vector<int64_t> wfreq;
  for (size_t w = 0; w < words.size(); ++w) {
    if (words[w].size() < 2) continue;
    std::vector<int32_t> s(words[w].size());
    for (size_t i = 0; i < s.size(); ++i) s[i] = byte_id[static_cast<unsigned char>(words[w][i])];
    syms.push_back(std::move(s));
    wfreq.push_back(freq[w]);
  }
  words.clear();
  words.shrink_to_fit();
  U64Map<int64_t> count(1 << 16);
  U64Map<uint32_t> where_index(1 << 16);
  std::vector<std::vector<uint32_t>> where;
  auto where_of = [&](uint64_t key) -> std::vector<uint32_t>& {
    bool inserted = false;
    uint32_t& idx = where_index.get(key, static_cast<uint32_t>(where.size()), &inserted);
    if (inserted) where.emplace_back();
    return where[idx];
  };
  for (uint32_t w = 0; w < syms.size(); ++w) {
    const auto& s = syms[w];
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      const uint64_t key = pair_key(s[i], s[i + 1]);
      count.get(key, 0) += wfreq[w];
      auto& list = where_of(key);
      if (list.empty() || list.back() != w) list.push_back(w);
    }
  }
  std::priority_queue<Candidate, std::vector<Candidate>, WorseCandidate> heap;
  {
    std::vector<Candidate> all;
    for (uint32_t w = 0; w < syms.size(); ++w)
      for (size_t i = 0; i + 1 < syms[w].size(); ++i) {
        const uint64_t key = pair_key(syms[w][i], syms[w][i + 1]);
        int64_t& c = count.get(key, 0);
        if (c > 0) {  // first sight of this pair: queue it once, then mark it queued
          all.push_back({c, syms[w][i], syms[w][i + 1]});
          c = -c;
        }
      }
    for (const Candidate& c : all) count.get(pair_key(c.left, c.right), 0) = c.count;
    heap = decltype(heap)(WorseCandidate(), std::move(all));
  }

  const size_t target = static_cast<size_t>(vocab_size) - 257;
  std::vector<std::pair<int32_t, int32_t>> merges;
  merges.reserve(target);
  U64Map<char> blocked;
  std::vector<uint32_t> visited(syms.size(), UINT32_MAX);
  std::vector<uint64_t> grown;
  std::vector<int32_t> merged_syms;
  while (merges.size() < target) {
    if (heap.empty())
      throw Error("train_bpe: the corpus allows only " + std::to_string(merges.size()) +
                  " merges, vocab_size " + std::to_string(vocab_size) + " needs " +
                  std::to_string(target) + " (give more text or a smaller vocab_size)");
    const Candidate top = heap.top();
    heap.pop();
    const uint64_t key = pair_key(top.left, top.right);
    const int64_t c = *count.find(key);
    if (c != top.count) {
      if (c > 0 && c < top.count) heap.push({c, top.left, top.right});
      continue;
    }
    if (c <= 0 || blocked.find(key)) continue;
    std::string bytes = tokens[top.left] + tokens[top.right];
    const int32_t id = static_cast<int32_t>(tokens.size());
    if (!token_ids.insert(bytes, id)) {
      blocked.get(key, 1);
      continue;
    }
    tokens.push_back(std::move(bytes));
    merges.emplace_back(top.left, top.right);

    // Apply the merge to every word that has the pair.
    const uint32_t stamp = static_cast<uint32_t>(merges.size());
    std::vector<uint32_t> list = std::move(where_of(key));
    grown.clear();
    for (const uint32_t w : list) {
      if (visited[w] == stamp) continue;
      visited[w] = stamp;
      auto& s = syms[w];
      const int64_t f = wfreq[w];
      merged_syms.clear();
      for (size_t i = 0; i < s.size(); ++i) {
        if (i + 1 < s.size() && s[i] == top.left && s[i + 1] == top.right) {
          merged_syms.push_back(id);
          ++i;
        } else {
          merged_syms.push_back(s[i]);
        }
      }
      if (merged_syms.size() == s.size()) continue;  // stale entry: the word lost the pair
      for (size_t i = 0; i + 1 < s.size(); ++i) count.get(pair_key(s[i], s[i + 1]), 0) -= f;
      for (size_t i = 0; i + 1 < merged_syms.size(); ++i) {
        const uint64_t k = pair_key(merged_syms[i], merged_syms[i + 1]);
        count.get(k, 0) += f;
        // Only pairs with the new token are new to this word (and can have grown).
        if (merged_syms[i] == id || merged_syms[i + 1] == id) {
          auto& wl = where_of(k);
          if (wl.empty() || wl.back() != w) wl.push_back(w);
          grown.push_back(k);
        }
      }
      s.swap(merged_syms);
    }
    std::sort(grown.begin(), grown.end());
    grown.erase(std::unique(grown.begin(), grown.end()), grown.end());
    for (const uint64_t k : grown) {
      const int64_t n = *count.find(k);
      if (n > 0)
        heap.push({n, static_cast<int32_t>(k >> 32), static_cast<int32_t>(k & 0xFFFFFFFFu)});
    }
  }
  tokens.push_back(eot);
  write_gpt2_files(tokens, merges, out_dir);
}

}  // namespace pipenag
