// Named methods: one word that sets the schedule, stashing, optimizer and staleness corrections
// of a method the paper compares (PAPER.md sections 2 and 3), as `method = "nesterov"` in a
// config file or `--set method=nesterov`. A preset is a list of ordinary `key=value` settings
// applied before the file's own keys, so anything it sets can still be overridden.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace pipenag {

struct Method {
  std::string_view name;
  std::string_view description;
  std::vector<std::string_view> settings;  // "section.key=value"
};

const std::vector<Method>& methods();
// Error naming the known methods when `name` is not one.
const Method& find_method(std::string_view name);
// `pipenag methods`: every preset with what it sets.
std::string describe_methods();

}  // namespace pipenag
