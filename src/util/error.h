// One exception type for every user-facing failure: its what() is a single line that names the
// problem (and the file or key involved). The CLI prints "pipenag: <what>" and exits non-zero.
#pragma once
#include <stdexcept>
#include <string>

namespace pipenag {

struct Error : std::runtime_error {
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

}  // namespace pipenag
