// The size table of a flat parameter buffer: every tensor's name (PyTorch/nanoGPT naming, see
// docs/FORMATS.md), shape, offset and initialisation. Units own contiguous slices described by it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pipenag {

enum class ParamInit { Normal002, Zero, One };

struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
  size_t offset = 0;  // in floats, relative to the owner's first parameter
  size_t numel = 0;
  ParamInit init = ParamInit::Normal002;
};

inline size_t numel_of(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

}  // namespace pipenag
