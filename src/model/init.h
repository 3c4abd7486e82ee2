// Deterministic weight initialisation that does not depend on how the model is cut into stages:
// element i of the tensor named `name` is a pure function of (seed, name, i). Every stage, engine
// and method therefore starts from the same weights.
#pragma once
#include <cstdint>
#include <string>

#include "model/param_table.h"

namespace pipenag {

void init_param(float* dst, const ParamSpec& spec, uint64_t seed);

}  // namespace pipenag
