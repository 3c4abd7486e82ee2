// How the model's units [embedding, block 0 .. block L-1, head] are cut into P stages.
#pragma once
#include <string>
#include <vector>

#include "model/config.h"

namespace pipenag {

// Blocks per stage when pipeline.partition is empty: L/P each, and the remainder goes to the
// middle stages first, because the end stages also carry the embedding and the head (as the
// reference: [1, 1, ..., 1] for 8 blocks on 8 stages, [1, 2, 2, 1] for 6 on 4).
std::vector<int> default_partition(int n_layer, int stages);

// The partition in use: pipeline.partition's blocks, or the default. An "auto" partition must
// have been replaced by its blocks first (choose_partition); Error otherwise.
std::vector<int> blocks_per_stage(const ModelConfig& m, const PipelineConfig& p);

// P+1 unit boundaries: stage k owns units [b[k], b[k+1]); stage 0 starts with the embedding,
// stage P-1 ends with the head.
std::vector<int> unit_boundaries(const ModelConfig& m, const PipelineConfig& p);

// The contiguous cut of the units (costs in unit order: embedding, blocks, head) into `stages`
// stages, every stage with at least one block, that minimises the cost of the slowest stage
// (among equals, the one with the smaller sum of squared stage costs). Blocks per stage.
std::vector<int> balanced_partition(const std::vector<double>& unit_costs, int stages);

// Seconds of forward + backward of one micro-batch of B sequences, per unit (embedding, each
// block, head), measured on this machine with `threads` OpenMP threads: the median of `reps`
// timed runs after one warm-up. Blocks share one shape, so one block is timed for all of them.
std::vector<double> measure_unit_costs(const ModelConfig& m, int B, bool recompute, bool bf16,
                                       int threads, int reps = 5);

// Cost of each stage of `blocks` under `unit_costs` (same unit order).
std::vector<double> stage_costs(const std::vector<double>& unit_costs,
                                const std::vector<int>& blocks);

}  // namespace pipenag
