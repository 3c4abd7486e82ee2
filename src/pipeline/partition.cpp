#include "pipeline/partition.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <random>

#include "pipeline/stage.h"
#include "util/error.h"

namespace pipenag {

std::vector<int> default_partition(int n_layer, int stages) {
  if (stages < 1 || stages > n_layer)
    throw Error("pipeline.stages (" + std::to_string(stages) + ") must be between 1 and " +
                "model.n_layer (" + std::to_string(n_layer) + ")");
  std::vector<int> out(static_cast<size_t>(stages), n_layer / stages);
  int extra = n_layer % stages;
  // Middle stages first (1 .. P-2), then the ends.
  for (int k = 1; k + 1 < stages && extra > 0; ++k, --extra) ++out[static_cast<size_t>(k)];
  for (int k : {stages - 1, 0})
    if (extra > 0) ++out[static_cast<size_t>(k)], --extra;
  return out;
}

std::vector<int> blocks_per_stage(const ModelConfig& m, const PipelineConfig& p) {
  if (p.partition.automatic)
    throw Error("internal: pipeline.partition = \"auto\" was not resolved into blocks");
  if (p.partition.is_default()) return default_partition(m.n_layer, p.stages);
  int sum = 0;
  for (int b : p.partition.blocks) sum += b;
  if (static_cast<int>(p.partition.blocks.size()) != p.stages || sum != m.n_layer)
    throw Error("pipeline.partition does not match pipeline.stages and model.n_layer");
  return p.partition.blocks;
}

std::vector<int> unit_boundaries(const ModelConfig& m, const PipelineConfig& p) {
  const std::vector<int> blocks = blocks_per_stage(m, p);
  std::vector<int> b{0};
  // Unit 0 is the embedding, so stage 0's blocks end at 1 + blocks[0].
  int at = 1;
  for (int n : blocks) {
    at += n;
    b.push_back(at);
  }
  b.back() += 1;  // the head
  return b;
}

std::vector<double> stage_costs(const std::vector<double>& unit_costs,
                                const std::vector<int>& blocks) {
  std::vector<double> out;
  size_t u = 1;  // the first block
  for (size_t k = 0; k < blocks.size(); ++k) {
    double c = k == 0 ? unit_costs.front() : 0.0;
    for (int i = 0; i < blocks[k]; ++i) c += unit_costs[u++];
    if (k + 1 == blocks.size()) c += unit_costs.back();
    out.push_back(c);
  }
  return out;
}

std::vector<int> balanced_partition(const std::vector<double>& unit_costs, int stages) {
  const int L = static_cast<int>(unit_costs.size()) - 2;
  if (L < 1) throw Error("balanced_partition: the model has no blocks");
  if (stages < 1 || stages > L)
    throw Error("pipeline.partition = \"auto\" needs at least one block per stage: pipeline.stages (" +
                std::to_string(stages) + ") is more than model.n_layer (" + std::to_string(L) + ")");
  // prefix[i]: cost of blocks [0, i).
  std::vector<double> prefix(static_cast<size_t>(L) + 1, 0.0);
  for (int i = 0; i < L; ++i) prefix[i + 1] = prefix[i] + unit_costs[static_cast<size_t>(i) + 1];
  const double emb = unit_costs.front(), head = unit_costs.back();
  auto cost = [&](int k, int i, int j) {  // stage k holding blocks [i, j)
    return prefix[j] - prefix[i] + (k == 0 ? emb : 0.0) + (k == stages - 1 ? head : 0.0);
  };
  // best[k][j]: (slowest stage, sum of squares) of the first k+1 stages over blocks [0, j).
  struct Best {
    double worst = std::numeric_limits<double>::infinity();
    double squares = std::numeric_limits<double>::infinity();
    int from = -1;
  };
  const auto better = [](double w, double s, const Best& b) {
    return w < b.worst || (w == b.worst && s < b.squares);
  };
  std::vector<std::vector<Best>> best(static_cast<size_t>(stages),
                                      std::vector<Best>(static_cast<size_t>(L) + 1));
  for (int j = 1; j <= L; ++j) {
    const double c = cost(0, 0, j);
    best[0][j] = {c, c * c, 0};
  }
  for (int k = 1; k < stages; ++k)
    for (int j = k + 1; j <= L; ++j)
      for (int i = k; i < j; ++i) {
        const Best& prev = best[k - 1][i];
        const double c = cost(k, i, j);
        const double w = std::max(prev.worst, c), s = prev.squares + c * c;
        if (better(w, s, best[k][j])) best[k][j] = {w, s, i};
      }
  std::vector<int> blocks(static_cast<size_t>(stages));
  for (int k = stages - 1, j = L; k >= 0; --k) {
    const int i = best[k][j].from;
    blocks[static_cast<size_t>(k)] = j - i;
    j = i;
  }
  return blocks;
}

std::vector<double> measure_unit_costs(const ModelConfig& m, int B, bool recompute, bool bf16,
                                       int threads, int reps) {
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(std::max(1, threads));
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int32_t> tok(0, m.vocab_size - 1);
  std::normal_distribution<float> act(0.0f, 1.0f);
  std::vector<int32_t> x(static_cast<size_t>(B) * m.block_size), y(x.size());
  for (auto& t : x) t = tok(rng);
  for (auto& t : y) t = tok(rng);
  const MicroBatch mb{x.data(), y.data()};
  // Units 0 (embedding), 1 (a block) and L + 1 (the head).
  auto time_unit = [&](int u) {
    Stage stage(m, u, u + 1, B, 1, recompute);
    stage.set_bf16(bf16);
    stage.init_params(m.seed);
    std::vector<float> in(stage.boundary_floats()), dout(stage.boundary_floats());
    for (auto& v : in) v = act(rng);
    for (auto& v : dout) v = 0.01f * act(rng);
    std::vector<double> secs;
    for (int r = 0; r <= reps; ++r) {
      UnitContext ctx;
      ctx.B = B;
      ctx.grad_scale = 1.0f / static_cast<float>(x.size());
      const auto t0 = std::chrono::steady_clock::now();
      stage.forward(0, in.data(), mb, ctx);
      stage.backward(0, dout.data(), mb, ctx);
      if (r > 0) secs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(secs.begin(), secs.end());
    return secs[secs.size() / 2];
  };
  const double emb = time_unit(0), block = time_unit(1), head = time_unit(m.n_layer + 1);
  omp_set_num_threads(saved_threads);
  std::vector<double> costs(static_cast<size_t>(m.n_layer) + 2, block);
  costs.front() = emb;
  costs.back() = head;
  return costs;
}

}  // namespace pipenag
