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

}  // namespace

std::vector<std::string> corpus_files(const std::string& path) {
  std::error_code ec;
  if (path.empty()) throw Error("data.input is empty: give a text file or a folder of .txt files");
  const fs::file_status st = fs::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory) throw Error(path + ": " + ec.message());
  if (ec || !fs::exists(st)) throw Error(path + ": no such file or folder");
  if (!fs::is_directory(st)) {
    // A device or a pipe (/dev/zero, a FIFO) could be read forever.
    if (!fs::is_regular_file(st)) throw Error(path + ": not a regular file or a folder");
    return {path};
  }
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(path, ec)) {
    if (e.path().extension() != ".txt") continue;
    std::error_code fec;
    const bool regular = e.is_regular_file(fec);
    // A .txt entry that cannot be followed (a symlink loop, a dangling link) is an error, not a
    // document to skip in silence.
    if (fec) throw Error(e.path().string() + ": " + fec.message());
    if (regular) files.push_back(e.path());
  }
  if (ec) throw Error(path + ": cannot list folder: " + ec.message());
  if (files.empty()) throw Error(path + ": folder has no .txt files");
  std::sort(files.begin(), files.end());
  std::vector<std::string> out;
  for (const auto& f : files) out.push_back(f.string());
  return out;
}

std::vector<Document> read_documents(const std::string& path) {
  std::vector<Document> docs;
  for (const auto& f : corpus_files(path)) docs.push_back({fs::path(f).filename().string(), slurp(f)});
  size_t total = 0;
  for (const auto& d : docs) total += d.text.size();
  if (total == 0) throw Error(path + ": corpus is empty");
  return docs;
}

}  // namespace pipenag
