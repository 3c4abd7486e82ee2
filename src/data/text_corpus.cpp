#include "data/text_corpus.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "util/error.h"

namespace pipenag {
namespace fs = std::filesystem;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw Error(p.string() + ": cannot read file");
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw Error(p.string() + ": read error");
  return ss.str();
}

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

std::vector<Document> read_documents(const std::string& path) {
  std::error_code ec;
  if (path.empty()) throw Error("data.input is empty: give a text file or a folder of .txt files");
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) throw Error(path + ": no such file or folder");
  std::vector<Document> docs;
  if (fs::is_directory(st)) {
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(path, ec))
      if (e.is_regular_file() && e.path().extension() == ".txt") files.push_back(e.path());
    if (ec) throw Error(path + ": cannot list folder: " + ec.message());
    std::sort(files.begin(), files.end());
    for (const auto& f : files) docs.push_back({f.filename().string(), slurp(f)});
    if (docs.empty()) throw Error(path + ": folder has no .txt files");
  } else {
    docs.push_back({fs::path(path).filename().string(), slurp(path)});
  }
  size_t total = 0;
  for (const auto& d : docs) total += d.text.size();
  if (total == 0) throw Error(path + ": corpus is empty");
  return docs;
}

TokenSplits byte_token_splits(const std::vector<Document>& docs, double val_fraction,
                              uint64_t seed) {
  std::vector<bool> is_val(docs.size(), false);
  for (size_t d = 0; d < docs.size(); ++d) {
    uint64_t h = seed;
    for (unsigned char c : docs[d].name) h = mix(h ^ c);
    is_val[d] = static_cast<double>(h >> 11) * 0x1.0p-53 < val_fraction;
  }
  if (docs.size() >= 2) {
    // Keep both sides non-empty: move the last document across when one side is empty.
    if (std::none_of(is_val.begin(), is_val.end(), [](bool v) { return v; })) is_val.back() = true;
    if (std::all_of(is_val.begin(), is_val.end(), [](bool v) { return v; })) is_val.front() = false;
  }
  TokenSplits out;
  for (size_t d = 0; d < docs.size(); ++d) {
    auto& dst = (is_val[d] || docs.size() == 1) ? out.val : out.train;
    (is_val[d] ? out.val_docs : out.train_docs)++;
    for (unsigned char c : docs[d].text) dst.push_back(c);
    dst.push_back('\n');
  }
  if (docs.size() == 1) {
    // One document: hold out its tail.
    std::vector<int32_t> all = std::move(out.val);
    const size_t n_val = static_cast<size_t>(static_cast<double>(all.size()) * val_fraction);
    out.train.assign(all.begin(), all.end() - static_cast<std::ptrdiff_t>(n_val));
    out.val.assign(all.end() - static_cast<std::ptrdiff_t>(n_val), all.end());
    out.train_docs = 1;
    out.val_docs = 0;
  }
  return out;
}

BatchLoader::BatchLoader(const std::vector<int32_t>* tokens, int B, int T, const std::string& what)
    : tokens_(tokens), B_(B), T_(T) {
  if (tokens->size() < static_cast<size_t>(T) + 1)
    throw Error(what + " split has " + std::to_string(tokens->size()) +
                " tokens, fewer than one sequence of model.block_size + 1 = " +
                std::to_string(T + 1));
}

int64_t BatchLoader::batches_per_epoch() const {
  const int64_t n = static_cast<int64_t>(tokens_->size()) - 1;
  return std::max<int64_t>(1, n / (static_cast<int64_t>(B_) * T_));
}

void BatchLoader::batch(int64_t i, int32_t* inputs, int32_t* targets) const {
  const int64_t n = static_cast<int64_t>(tokens_->size());
  // Sequences start every T tokens; a start beyond the last full sequence wraps to the beginning.
  const int64_t starts = (n - 1) / T_;
  for (int b = 0; b < B_; ++b) {
    const int64_t s = ((i * B_ + b) % starts) * T_;
    for (int t = 0; t < T_; ++t) {
      inputs[b * T_ + t] = (*tokens_)[static_cast<size_t>(s + t)];
      targets[b * T_ + t] = (*tokens_)[static_cast<size_t>(s + t + 1)];
    }
  }
}

}  // namespace pipenag
