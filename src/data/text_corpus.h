// A corpus of documents (one file = one document) turned into train/validation token streams,
// and a loader that cuts them into batches of B sequences of T+1 tokens (input and target
// shifted by one). Byte-level tokens (vocabulary 256) for now; the data issue adds BPE and
// binary token files.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace pipenag {

struct Document {
  std::string name;
  std::string text;
};

// A single text file, or every *.txt file of a folder (sorted by name). Errors name the path.
std::vector<Document> read_documents(const std::string& path);

// Deterministic split: document d goes to validation when a seeded hash of its name falls below
// val_fraction (at least one document on each side when there are two or more).
struct TokenSplits {
  std::vector<int32_t> train, val;
  size_t train_docs = 0, val_docs = 0;
};
TokenSplits byte_token_splits(const std::vector<Document>& docs, double val_fraction,
                              uint64_t seed);

// Sequential loader: batch i is the i-th run of B*T tokens (wrapping around at the end of the
// stream), each sequence with its T+1-th token as the last target.
class BatchLoader {
 public:
  BatchLoader(const std::vector<int32_t>* tokens, int B, int T, const std::string& what);
  // Fills tokens/targets [B*T] for batch index i.
  void batch(int64_t i, int32_t* inputs, int32_t* targets) const;
  int64_t batches_per_epoch() const;

 private:
  const std::vector<int32_t>* tokens_;
  int B_, T_;
};

}  // namespace pipenag
