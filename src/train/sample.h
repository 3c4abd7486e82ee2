// Text generation from a checkpoint: autoregressive sampling with temperature and top-k.
#pragma once
#include <cstdint>
#include <functional>
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

// Most tokens one `sample` may generate (it streams, so this bounds time, not memory).
constexpr int kMaxSampleTokens = 10'000'000;

// The prompt is encoded with the tokenizer the checkpoint's data was made with. `out` receives
// the decoded prompt, then each generated token's text as soon as it is sampled; it returns false
// to stop early (its reader went away).
void sample_stream(const std::string& checkpoint_dir, const SampleOptions& opt,
                   const std::function<bool(const std::string&)>& out);
// The decoded prompt and continuation as one string.
std::string sample_text(const std::string& checkpoint_dir, const SampleOptions& opt);

}  // namespace pipenag
