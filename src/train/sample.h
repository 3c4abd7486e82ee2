// Text generation from a checkpoint: autoregressive sampling with temperature and top-k.
#pragma once
#include <cstdint>
#include <string>

#include "model/config.h"

namespace pipenag {

struct SampleOptions {
  std::string prompt;
  int max_new_tokens = 200;
  double temperature = 0.8;  // 0: greedy
  int top_k = 40;            // 0: no top-k filtering
  uint64_t seed = 1337;
};

// The prompt is encoded with the tokenizer the checkpoint's data was made with; the result is the
// decoded prompt and continuation.
std::string sample_text(const std::string& checkpoint_dir, const SampleOptions& opt);

}  // namespace pipenag
