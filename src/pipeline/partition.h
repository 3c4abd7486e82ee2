// How the model's units [embedding, block 0 .. block L-1, head] are cut into P stages.
#pragma once
#include <vector>

#include "model/config.h"

namespace pipenag {

// Blocks per stage when pipeline.partition is empty: L/P each, and the remainder goes to the
// middle stages first, because the end stages also carry the embedding and the head (as the
// reference: [1, 1, ..., 1] for 8 blocks on 8 stages, [1, 2, 2, 1] for 6 on 4).
std::vector<int> default_partition(int n_layer, int stages);

// The partition in use: pipeline.partition, or the default.
std::vector<int> blocks_per_stage(const ModelConfig& m, const PipelineConfig& p);

// P+1 unit boundaries: stage k owns units [b[k], b[k+1]); stage 0 starts with the embedding,
// stage P-1 ends with the head.
std::vector<int> unit_boundaries(const ModelConfig& m, const PipelineConfig& p);

}  // namespace pipenag
