#include "data/loader.h"

#include <algorithm>
#include <bit>

#include "util/error.h"
#include "util/hash.h"

namespace pipenag {
namespace {


constexpr int kRounds = 6;

// T inputs src[0..T) and T targets src[1..T]: the slot was chosen inside the file (slot * T + T
// < n), so no bounds check is needed.
template <typename U>
void copy_sequence(const U* src, int T, int32_t* inputs, int32_t* targets) {
  for (int t = 0; t < T; ++t) {
    inputs[t] = static_cast<int32_t>(src[t]);
    targets[t] = static_cast<int32_t>(src[t + 1]);
  }
}

}  // namespace

uint64_t shuffle_index(uint64_t pos, uint64_t n, uint64_t seed, uint64_t epoch) {
  if (n <= 1) return 0;
  int bits = std::bit_width(n - 1);  // the domain [0, 2^bits) holds [0, n)
  bits += bits & 1;                  // two equal halves
  const int half = bits / 2;
  const uint64_t mask = (uint64_t{1} << half) - 1;
  uint64_t keys[kRounds];
  const uint64_t base = splitmix64(splitmix64(seed) ^ epoch);
  for (int r = 0; r < kRounds; ++r) keys[r] = splitmix64(base + static_cast<uint64_t>(r));
  uint64_t x = pos;
  // Cycle walking: the Feistel network permutes [0, 2^bits); re-applying it until the value
  // lands in [0, n) restricts it to a permutation of [0, n) (fewer than 4 steps on average).
  do {
    uint64_t left = x >> half, right = x & mask;
    for (int r = 0; r < kRounds; ++r) {
      const uint64_t next = left ^ (splitmix64(right ^ keys[r]) & mask);
      left = right;
      right = next;
    }
    x = (left << half) | right;
  } while (x >= n);
  return x;
}

TokenLoader::TokenLoader(const TokenFile& file, int B, int T, Order order, uint64_t seed,
                         const std::string& what)
    : path_(file.path()), data_(file.data()), dtype_(file.dtype_bytes()), B_(B), T_(T), order_(order), seed_(seed), slots_(0) {
  if (B < 1 || T < 1)
    throw Error(file.path() + ": batch size " + std::to_string(B) + " and sequence length " +
                std::to_string(T) + " must both be at least 1");
  const size_t n = file.size();
  if (n < static_cast<size_t>(T) + 1)
    throw Error(file.path() + ": sequence length " + std::to_string(T + 1) +
                " is longer than the " + what + " split (" + std::to_string(n) + " tokens)");
  slots_ = static_cast<int64_t>((n - 1) / static_cast<size_t>(T));
}

int64_t TokenLoader::batches_per_epoch() const { return std::max<int64_t>(1, slots_ / B_); }

int64_t TokenLoader::sequence_start(int64_t k) const {
  if (k < 0) throw Error(path_ + ": negative sequence number " + std::to_string(k));
  const int64_t pos = k % slots_;
  int64_t slot = pos;
  if (order_ == Order::Shuffled)
    slot = static_cast<int64_t>(shuffle_index(static_cast<uint64_t>(pos),
                                              static_cast<uint64_t>(slots_), seed_,
                                              static_cast<uint64_t>(k / slots_)));
  return slot * T_;
}

void TokenLoader::batch(int64_t index, int32_t* inputs, int32_t* targets) const {
  if (index < 0) throw Error(path_ + ": negative batch index " + std::to_string(index));
  for (int b = 0; b < B_; ++b) {
    const size_t s = static_cast<size_t>(sequence_start(index * B_ + b));
    const size_t row = static_cast<size_t>(b) * static_cast<size_t>(T_);
    if (dtype_ == 2)
      copy_sequence(static_cast<const uint16_t*>(data_) + s, T_, inputs + row, targets + row);
    else
      copy_sequence(static_cast<const uint32_t*>(data_) + s, T_, inputs + row, targets + row);
  }
}

}  // namespace pipenag
