#include "pipeline/partition.h"

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
  if (p.partition.empty()) return default_partition(m.n_layer, p.stages);
  int sum = 0;
  for (int b : p.partition) sum += b;
  if (static_cast<int>(p.partition.size()) != p.stages || sum != m.n_layer)
    throw Error("pipeline.partition does not match pipeline.stages and model.n_layer");
  return p.partition;
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

}  // namespace pipenag
