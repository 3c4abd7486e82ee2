// Helpers shared by the tests that drive stage workers directly: a tiny pipeline config, a
// deterministic synthetic data source, and a Pipeline holding initialised workers.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/config.h"
#include "pipeline/engine.h"
#include "pipeline/schedule.h"
#include "pipeline/stage_worker.h"
#include "train/trainer.h"
#include "util/hash.h"

namespace pipenag::testutil {

// 4 blocks of width 32, context 16, vocabulary 64, micro-batch 2, on P stages.
inline Config tiny_pipeline_config(int P, const std::string& schedule, int M, bool stash,
                                   bool recompute, double clip, int64_t warmup, int64_t steps) {
  Config c;
  c.model.n_layer = 4;
  c.model.n_embd = 32;
  c.model.n_head = 2;
  c.model.block_size = 16;
  c.model.vocab_size = 64;
  c.train.batch_size = 2;
  c.train.lr = 1e-3;
  c.train.warmup_steps = warmup;
  c.train.steps = steps;
  c.train.clip = clip;
  c.pipeline.stages = P;
  c.pipeline.schedule = schedule;
  c.pipeline.microbatches = schedule == "async-1f1b" ? 1 : M;
  c.pipeline.stash = stash;
  c.pipeline.recompute = recompute;
  return c;
}

// Tokens are a seeded hash of (micro-batch, position); the target is the next token.
inline void synthetic_batch(const ModelConfig& m, int Bsz, int64_t mb, int32_t* x, int32_t* y,
                            uint64_t seed = 0x5eedULL) {
  const int T = m.block_size;
  auto tok = [&](int b, int t) {
    const uint64_t h = splitmix64(seed ^ (static_cast<uint64_t>(mb) * 1000003ULL) ^
                                  (static_cast<uint64_t>(b) << 40) ^ static_cast<uint64_t>(t));
    return static_cast<int32_t>(h % static_cast<uint64_t>(m.vocab_size));
  };
  for (int b = 0; b < Bsz; ++b)
    for (int t = 0; t < T; ++t) {
      x[b * T + t] = tok(b, t);
      y[b * T + t] = tok(b, t + 1);
    }
}

// The workers of a config, initialised from the model seed, at weight version base_version,
// reading synthetic_batch.
struct Pipeline {
  Config cfg;
  std::vector<std::unique_ptr<StageWorker>> owned;
  std::vector<StageWorker*> ws;
  explicit Pipeline(const Config& c, int64_t base_version = 0) : cfg(c), owned(make_workers(c)) {
    for (auto& w : owned) {
      w->stage().init_params(c.model.seed);
      w->set_version(base_version);
      const ModelConfig m = c.model;
      const int Bsz = c.train.batch_size;
      w->set_batch_source([m, Bsz](int64_t mb, int32_t* x, int32_t* y) { synthetic_batch(m, Bsz, mb, x, y); });
      ws.push_back(w.get());
    }
  }
  Schedule schedule(int64_t updates) const {
    return make_schedule(parse_schedule_kind(cfg.pipeline.schedule), cfg.pipeline.stages,
                         cfg.pipeline.microbatches, updates);
  }
  std::vector<std::vector<float>> params() const {
    std::vector<std::vector<float>> p;
    for (const auto* w : ws) p.emplace_back(w->stage().params(), w->stage().params() + w->stage().num_params());
    return p;
  }
  // All stages' weights end to end (the whole model, in unit order).
  std::vector<float> flat_params() const {
    std::vector<float> out;
    for (const auto& p : params()) out.insert(out.end(), p.begin(), p.end());
    return out;
  }
};

}  // namespace pipenag::testutil
