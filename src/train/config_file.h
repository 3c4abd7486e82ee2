// TOML configuration files and `--set section.key=value` overrides, mapped onto the structs in
// model/config.h by one table (config_keys()). A new setting is one row in that table: parsing,
// overrides, validation of its type, --help text, config_to_toml and config_to_json all follow.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "model/config.h"

namespace pipenag {

// Points at one field inside a Config; the alternative held decides how the value is parsed.
using ConfigField =
    std::variant<int*, int64_t*, uint64_t*, double*, bool*, std::string*, Activation*,
                 Partition*, std::vector<double>*>;

struct ConfigKey {
  std::string_view section;      // "model"
  std::string_view key;          // "n_layer"
  std::string_view description;  // one line, for --help and the saved config
  ConfigField (*field)(Config&);

  std::string name() const;            // "model.n_layer"
  std::string_view type_name() const;  // "integer", "float", "boolean", "string", ...
};

// Every accepted key, grouped by section, in the order --help and config_to_toml list them.
const std::vector<ConfigKey>& config_keys();

// Defaults, then the file at `path` (none if empty), then each override in order; validated.
Config load_config(const std::string& path, const std::vector<std::string>& overrides);
// As load_config on text already in memory; `source_name` prefixes error messages.
Config parse_config(std::string_view toml_text, std::string_view source_name,
                    const std::vector<std::string>& overrides);
// One `section.key=value` override; the value is TOML (3e-4, true, "x", [1,2]) or, for string
// keys, bare text (data.input=/path/file.txt). Not validated: call validate() afterwards.
void apply_override(Config& cfg, std::string_view assignment);

// Cross-field and range checks; Error with a one-line message naming the key(s).
void validate(const Config& cfg);

// A complete TOML document (every key) that parse_config reads back to an identical Config.
std::string config_to_toml(const Config& cfg);
nlohmann::json config_to_json(const Config& cfg);

// Every key with its type, default and description, one per line, for `pipenag train --help`.
std::string describe_config_keys();

std::string_view activation_name(Activation a);  // "relu" / "gelu"

}  // namespace pipenag
