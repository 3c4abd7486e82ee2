// Batches from a token file (data/token_file.h): batch i is B sequences of T+1 consecutive
// tokens, inputs = the first T, targets = the same shifted by one. The file holds S = (n-1)/T
// sequence slots starting at multiples of T; sequence number k = i*B + b of the run uses slot
//   Sequential: k mod S                                 (the i-th run of B*T tokens, wrapping)
//   Shuffled:   permutation_{seed, epoch}(k mod S)      with epoch = k / S
// where the permutation is a seeded bijection of [0, S) (shuffle_index), different per epoch.
// A batch is a pure function of (file, B, T, order, seed, index): the data position to save in a
// checkpoint is just the next batch index, and resuming from it continues exactly.
#pragma once
#include <cstdint>
#include <string>

#include "data/token_file.h"

namespace pipenag {

enum class Order { Sequential, Shuffled };

// A seeded permutation of [0, n): pos -> its image, for pos < n (n >= 1). Bijective for every
// (seed, epoch), O(1) memory (a 6-round Feistel network on the smallest even power of two >= n,
// cycle-walking back into [0, n)).
uint64_t shuffle_index(uint64_t pos, uint64_t n, uint64_t seed, uint64_t epoch);

class TokenLoader {
 public:
  // The loader reads file's mapping, which must stay alive (moving the TokenFile is fine: the
  // mapping moves with it; destroying it is not). `what` names the split in errors ("train", "validation").
  // Error, naming the file, when B or T < 1 or the file has fewer than T+1 tokens.
  TokenLoader(const TokenFile& file, int B, int T, Order order, uint64_t seed,
              const std::string& what);

  // Fills inputs[B*T] and targets[B*T] (row b = sequence b) for batch `index` >= 0.
  void batch(int64_t index, int32_t* inputs, int32_t* targets) const;
  // max(1, S / B): batches needed to see about every slot once.
  int64_t batches_per_epoch() const;
  // S, the number of sequence slots.
  int64_t sequences() const { return slots_; }
  // First token offset of sequence number k = index*B + b (its slot times T).
  int64_t sequence_start(int64_t k) const;

  int B() const { return B_; }
  int T() const { return T_; }
  Order order() const { return order_; }

 private:
  std::string path_;
  const void* data_;  // the file's mapped payload
  uint32_t dtype_;
  int B_, T_;
  Order order_;
  uint64_t seed_;
  int64_t slots_;
};

}  // namespace pipenag
