#include "model/init.h"

#include <cmath>

#include "util/hash.h"

namespace pipenag {
namespace {


uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  return h;
}

// Uniform in (0, 1], never 0 so that log() is finite.
double unit_uniform(uint64_t bits) { return (static_cast<double>(bits >> 11) + 1.0) * 0x1.0p-53; }

}  // namespace

void init_param(float* dst, const ParamSpec& spec, uint64_t seed) {
  if (spec.init == ParamInit::Zero || spec.init == ParamInit::One) {
    const float v = spec.init == ParamInit::One ? 1.0f : 0.0f;
    for (size_t i = 0; i < spec.numel; ++i) dst[i] = v;
    return;
  }
  const uint64_t stream = splitmix64(seed ^ fnv1a(spec.name));
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  // Box-Muller on a counter-based generator: pair p yields elements 2p and 2p+1.
  for (size_t i = 0; i < spec.numel; i += 2) {
    const uint64_t p = i / 2;
    const double u1 = unit_uniform(splitmix64(stream + 2 * p));
    const double u2 = unit_uniform(splitmix64(stream + 2 * p + 1));
    const double r = std::sqrt(-2.0 * std::log(u1));
    dst[i] = static_cast<float>(0.02 * r * std::cos(kTwoPi * u2));
    if (i + 1 < spec.numel) dst[i + 1] = static_cast<float>(0.02 * r * std::sin(kTwoPi * u2));
  }
}

}  // namespace pipenag
