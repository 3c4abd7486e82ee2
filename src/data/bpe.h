// Byte-level BPE internals shared by the tokenizer loaders and the trainer (see data/tokenizer.h
// for the public interface): open-addressing hash tables and the file loaders.
#pragma once
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer.h"

namespace pipenag {

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 32;
  x *= 0xd6e8feb86659fd93ULL;
  x ^= x >> 32;
  x *= 0xd6e8feb86659fd93ULL;
  x ^= x >> 32;
  return x;
}

inline uint64_t hash_bytes(std::string_view s) {
  uint64_t h = 0x9e3779b97f4a7c15ULL ^ (s.size() * 0xff51afd7ed558ccdULL);
  const char* p = s.data();
  size_t n = s.size();
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = (h ^ w) * 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 29;
    p += 8;
    n -= 8;
  }
  if (n) {
    uint64_t w = 0;
    std::memcpy(&w, p, n);
    h = (h ^ w) * 0x94d049bb133111ebULL;
  }
  return mix64(h);
}

inline uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// uint64 key -> V, insert-only, linear probing, load factor <= 1/2. ~0 is the empty key (a
// pair_key of two ids below 2^31 never is).
template <typename V>
class U64Map {
 public:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  explicit U64Map(size_t expected = 16) { rehash(expected); }
  size_t size() const { return size_; }
  const V* find(uint64_t key) const {
    for (size_t i = mix64(key) & mask_;; i = (i + 1) & mask_) {
      if (keys_[i] == key) return &vals_[i];
      if (keys_[i] == kEmpty) return nullptr;
    }
  }
  V* find(uint64_t key) { return const_cast<V*>(static_cast<const U64Map*>(this)->find(key)); }
  // The value for key, inserted as `init` when absent; `inserted` says which.
  V& get(uint64_t key, const V& init, bool* inserted = nullptr) {
    if (2 * (size_ + 1) > keys_.size()) rehash(2 * (size_ + 1));
    size_t i = mix64(key) & mask_;
    for (; keys_[i] != kEmpty; i = (i + 1) & mask_)
      if (keys_[i] == key) {
        if (inserted) *inserted = false;
        return vals_[i];
      }
    keys_[i] = key;
    vals_[i] = init;
    ++size_;
    if (inserted) *inserted = true;
    return vals_[i];
  }

 private:
  void rehash(size_t expected) {
    size_t cap = 16;
    while (cap < 2 * expected) cap *= 2;
    if (cap <= keys_.size()) return;
    std::vector<uint64_t> old_keys(cap, kEmpty);
    std::vector<V> old_vals(cap);
    old_keys.swap(keys_);
    old_vals.swap(vals_);
    mask_ = cap - 1;
    for (size_t j = 0; j < old_keys.size(); ++j) {
      if (old_keys[j] == kEmpty) continue;
      size_t i = mix64(old_keys[j]) & mask_;
      while (keys_[i] != kEmpty) i = (i + 1) & mask_;
      keys_[i] = old_keys[j];
      vals_[i] = old_vals[j];
    }
  }
  std::vector<uint64_t> keys_;
  std::vector<V> vals_;
  size_t mask_ = 0, size_ = 0;
};

// Byte string -> V, insert-only (keys copied into an arena), linear probing.
template <typename V>
class BytesMap {
 public:
  explicit BytesMap(size_t expected = 16) { rehash(expected); }
  size_t size() const { return size_; }
  size_t arena_bytes() const { return arena_.size(); }
  void clear() {
    std::fill(slots_.begin(), slots_.end(), Slot{});
    arena_.clear();
    size_ = 0;
  }
  const V* find(std::string_view key) const { return find(key, hash_bytes(key)); }
  const V* find(std::string_view key, uint64_t h) const {
    h |= 1;
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.hash == 0) return nullptr;
      if (s.hash == h && s.len == key.size() &&
          std::memcmp(arena_.data() + s.off, key.data(), key.size()) == 0)
        return &s.val;
    }
  }
  // Inserts key -> v unless key is present; false if it was.
  bool insert(std::string_view key, const V& v) { return insert(key, hash_bytes(key), v); }
  bool insert(std::string_view key, uint64_t h, const V& v) {
    if (2 * (size_ + 1) > slots_.size()) rehash(2 * (size_ + 1));
    h |= 1;
    size_t i = h & mask_;
    for (; slots_[i].hash != 0; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.hash == h && s.len == key.size() &&
          std::memcmp(arena_.data() + s.off, key.data(), key.size()) == 0)
        return false;
    }
    Slot& s = slots_[i];
    s.hash = h;
    s.off = static_cast<uint32_t>(arena_.size());
    s.len = static_cast<uint32_t>(key.size());
    s.val = v;
    arena_.append(key);
    ++size_;
    return true;
  }

 private:
  struct Slot {
    uint64_t hash = 0;  // the key's hash | 1; 0 = empty
    uint32_t off = 0, len = 0;
    V val{};
  };
  void rehash(size_t expected) {
    size_t cap = 16;
    while (cap < 2 * expected) cap *= 2;
    if (cap <= slots_.size()) return;
    std::vector<Slot> old(cap);
    old.swap(slots_);
    mask_ = cap - 1;
    for (const Slot& s : old) {
      if (s.hash == 0) continue;
      size_t i = s.hash & mask_;
      while (slots_[i].hash != 0) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  std::string arena_;
  size_t mask_ = 0, size_ = 0;
};

// Loads byte-level BPE from a path that is not "byte"/"gpt2": a folder (encoder.json +
// vocab.bpe, else tokenizer.json), an encoder.json, or a tokenizer.json. `name` becomes name().
std::unique_ptr<Tokenizer> load_bpe_path(const std::string& path, const std::string& name);

}  // namespace pipenag
