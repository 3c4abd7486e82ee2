#include "data/prepare.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "data/token_file.h"
#include "io/atomic_file.h"
#include "util/error.h"
#include "util/hash.h"

namespace pipenag {
namespace fs = std::filesystem;
namespace {


std::string fraction_text(double f) {
  std::ostringstream ss;
  ss << f;
  return ss.str();
}

}  // namespace

std::vector<bool> split_documents(const std::vector<Document>& docs, double val_fraction,
                                  uint64_t seed) {
  std::vector<bool> is_val(docs.size(), false);
  if (docs.size() < 2) return is_val;
  for (size_t d = 0; d < docs.size(); ++d) {
    uint64_t h = seed;
    for (unsigned char c : docs[d].name) h = splitmix64(h ^ c);
    is_val[d] = static_cast<double>(h >> 11) * 0x1.0p-53 < val_fraction;
  }
  if (std::none_of(is_val.begin(), is_val.end(), [](bool v) { return v; })) is_val.back() = true;
  if (std::all_of(is_val.begin(), is_val.end(), [](bool v) { return v; })) is_val.front() = false;
  return is_val;
}

namespace {

struct InputFile {
  std::string name;  // as read_documents names it
  std::string path;
  uint64_t bytes = 0;
  int64_t mtime_ns = 0;
};

// The files read_documents reads for `input`, with their sizes and mtimes.
std::vector<InputFile> input_files(const std::string& input) {
  std::vector<InputFile> out;
  for (const auto& path : corpus_files(input)) {
    struct stat sb {};
    if (::stat(path.c_str(), &sb) != 0) throw Error(path + ": cannot stat: " + std::strerror(errno));
    out.push_back({fs::path(path).filename().string(), path, static_cast<uint64_t>(sb.st_size),
                   static_cast<int64_t>(sb.st_mtim.tv_sec) * 1000000000 + sb.st_mtim.tv_nsec});
  }
  return out;
}

uint64_t xxhash64_of_file(const std::string& path) {
  const std::string b = read_file(path);
  return xxhash64(b.data(), b.size());
}

nlohmann::json parse_meta(const std::string& dir) {
  try {
    return nlohmann::json::parse(read_file(dir + "/meta.json"));
  } catch (const nlohmann::json::exception& e) {
    throw Error(dir + "/meta.json: not valid JSON (" + std::string(e.what()) + ")");
  }
}

}  // namespace

std::string prepared_folder_mismatch(const std::string& dir) {
  nlohmann::json meta;
  try {
    meta = parse_meta(dir);
  } catch (const Error& e) {
    return e.what();
  }
  for (const char* split : {"train", "val"}) {
    const std::string file = std::string(split) + ".bin";
    if (!meta.contains(split) || !meta[split].is_object()) return dir + "/meta.json has no '" + split + "' record";
    TokenFile f;
    try {
      f = TokenFile::open(dir + "/" + file, false);
    } catch (const Error& e) {
      return e.what();
    }
    const std::string sum = hex64(f.checksum());
    const std::string want = meta[split].value("checksum", std::string());
    if (sum != want)
      return dir + "/" + file + " has checksum " + sum + ", meta.json records " + (want.empty() ? "none" : want);
    if (meta[split].value("tokens", uint64_t{0}) != f.size())
      return dir + "/" + file + " has " + std::to_string(f.size()) + " tokens, meta.json records " +
             meta[split].value("tokens", nlohmann::json(0)).dump();
    if (meta.value("vocab_size", -1) != f.vocab_size())
      return dir + "/" + file + " has vocabulary " + std::to_string(f.vocab_size()) + ", meta.json records " +
             meta.value("vocab_size", nlohmann::json(-1)).dump();
  }
  return "";
}

std::string input_change_since(const std::string& dir, const std::string& input) {
  const nlohmann::json meta = parse_meta(dir);
  if (!meta.contains("inputs") || !meta["inputs"].is_array()) return "no record of the input files (older format)";
  std::vector<InputFile> now;
  try {
    now = input_files(input);
  } catch (const Error& e) {
    return e.what();
  }
  std::map<std::string, nlohmann::json> was;
  for (const auto& f : meta["inputs"]) was[f.value("name", std::string())] = f;
  std::vector<std::string> changes;
  for (const auto& f : now) {
    auto it = was.find(f.name);
    if (it == was.end()) {
      changes.push_back(f.name + " added");
      continue;
    }
    const nlohmann::json& w = it->second;
    if (w.value("bytes", uint64_t{0}) != f.bytes) changes.push_back(f.name + " changed");
    else if (w.value("mtime_ns", int64_t{0}) != f.mtime_ns &&
             w.value("xxh64", std::string()) != hex64(xxhash64_of_file(f.path)))
      changes.push_back(f.name + " changed");
    was.erase(it);
  }
  for (const auto& [name, w] : was) changes.push_back(name + " removed");
  std::string out;
  for (size_t i = 0; i < changes.size() && i < 3; ++i) out += (i ? ", " : "") + changes[i];
  if (changes.size() > 3) out += " and " + std::to_string(changes.size() - 3) + " more";
  return out;
}

PrepareStats prepare_corpus(const std::string& input, const Tokenizer& tok,
                            const std::string& out_dir, double val_fraction, uint64_t split_seed) {
  if (!(val_fraction > 0.0 && val_fraction < 1.0))
    throw Error(input + ": val_fraction " + fraction_text(val_fraction) +
                " is outside (0, 1): both splits need tokens");
  const int vocab = tok.vocab_size();
  const std::optional<int32_t> eot = tok.eot();
  if (vocab < 1 || (eot && (*eot < 0 || *eot >= vocab)))
    throw Error(input + ": tokenizer " + tok.name() + " has vocabulary size " +
                std::to_string(vocab) + (eot ? " and end-of-text id " + std::to_string(*eot) : "") +
                ", which is not usable");

  // Stat before reading: an edit while prepare runs makes the record older than the files, so
  // the next run re-checks them instead of trusting a record of the newer state.
  const std::vector<InputFile> inputs = input_files(input);
  std::vector<Document> docs = read_documents(input);
  const bool is_folder = fs::is_directory(input);
  nlohmann::ordered_json input_record = nlohmann::ordered_json::array();
  for (const auto& f : inputs) {
    std::string hash;
    for (const auto& d : docs)
      if (d.name == f.name) hash = hex64(xxhash64(d.text.data(), d.text.size()));
    input_record.push_back({{"name", f.name}, {"bytes", f.bytes}, {"mtime_ns", f.mtime_ns}, {"xxh64", hash}});
  }
  const auto doc_path = [&](size_t d) {
    return is_folder ? (fs::path(input) / docs[d].name).string() : input;
  };

  // Tokenise every document; each thread writes only its own slots, so the result does not
  // depend on the schedule. Exceptions stay inside the parallel region and the first failing
  // document (in corpus order) is reported.
  const int64_t n_docs = static_cast<int64_t>(docs.size());
  std::vector<std::vector<int32_t>> enc(docs.size());
  std::vector<std::string> failure(docs.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t d = 0; d < n_docs; ++d) {
    const size_t i = static_cast<size_t>(d);
    try {
      enc[i] = tok.encode(docs[i].text);
      std::string().swap(docs[i].text);  // the text is no longer needed
      for (size_t k = 0; k < enc[i].size(); ++k) {
        if (enc[i][k] < 0 || enc[i][k] >= vocab) {
          failure[i] = "tokenizer " + tok.name() + " produced id " + std::to_string(enc[i][k]) +
                       " at token " + std::to_string(k) + ", outside its vocabulary (size " +
                       std::to_string(vocab) + ")";
          break;
        }
      }
    } catch (const std::exception& e) {
      failure[i] = std::string("cannot tokenise: ") + e.what();
    } catch (...) {
      failure[i] = "cannot tokenise: unknown error";
    }
  }
  for (size_t d = 0; d < docs.size(); ++d)
    if (!failure[d].empty()) throw Error(doc_path(d) + ": " + failure[d]);

  PrepareStats st;
  st.tokenizer = tok.name();
  st.vocab_size = vocab;
  st.documents = docs.size();
  std::vector<int32_t> train, val;
  if (docs.size() == 1) {
    st.tail_split = true;
    std::vector<int32_t>& all = enc[0];
    const size_t n = all.size();
    const size_t n_val = static_cast<size_t>(std::floor(static_cast<double>(n) * val_fraction));
    if (n_val == 0 || n_val == n)
      throw Error(input + ": a single document of " + std::to_string(n) +
                  " tokens leaves an empty " + (n_val == 0 ? "validation" : "training") +
                  " split with val_fraction " + fraction_text(val_fraction));
    train.assign(all.begin(), all.end() - static_cast<std::ptrdiff_t>(n_val));
    val.assign(all.end() - static_cast<std::ptrdiff_t>(n_val), all.end());
    st.train_docs = 1;
  } else {
    const std::vector<bool> is_val = split_documents(docs, val_fraction, split_seed);
    size_t doc_tokens[2] = {0, 0};  // the documents' own tokens, separators not counted
    for (size_t d = 0; d < docs.size(); ++d) {
      const int s = is_val[d] ? 1 : 0;
      std::vector<int32_t>& dst = s ? val : train;
      size_t& count = s ? st.val_docs : st.train_docs;
      if (eot && count > 0) dst.push_back(*eot);
      dst.insert(dst.end(), enc[d].begin(), enc[d].end());
      doc_tokens[s] += enc[d].size();
      std::vector<int32_t>().swap(enc[d]);
      ++count;
      if (s) st.val_documents.push_back(docs[d].name);
    }
    for (int s = 0; s < 2; ++s)
      if (doc_tokens[s] == 0)
        throw Error(input + ": the " + (s == 0 ? "training" : "validation") + " split (" +
                    std::to_string(s == 0 ? st.train_docs : st.val_docs) +
                    " documents) has no tokens");
  }
  st.train_tokens = train.size();
  st.val_tokens = val.size();

  make_dirs(out_dir);
  const fs::path dir(out_dir.empty() ? "." : out_dir);
  st.train_path = (dir / "train.bin").string();
  st.val_path = (dir / "val.bin").string();
  st.meta_path = (dir / "meta.json").string();
  write_token_file(st.train_path, train, vocab);
  write_token_file(st.val_path, val, vocab);
  const uint64_t train_sum = TokenFile::open(st.train_path, false).checksum();
  const uint64_t val_sum = TokenFile::open(st.val_path, false).checksum();

  nlohmann::ordered_json meta;
  meta["format"] = "pipenag-tokens";
  meta["format_version"] = 1;
  meta["tokenizer"] = st.tokenizer;
  meta["vocab_size"] = vocab;
  meta["eot"] = eot ? nlohmann::ordered_json(*eot) : nlohmann::ordered_json(nullptr);
  meta["input"] = input;
  meta["val_fraction"] = val_fraction;
  meta["split_seed"] = split_seed;
  meta["split"] = st.tail_split ? "tail" : "documents";
  meta["documents"] = st.documents;
  meta["train"] = {{"file", "train.bin"},
                   {"documents", st.train_docs},
                   {"tokens", st.train_tokens},
                   {"checksum", hex64(train_sum)}};
  meta["val"] = {{"file", "val.bin"},
                 {"documents", st.val_docs},
                 {"tokens", st.val_tokens},
                 {"checksum", hex64(val_sum)}};
  meta["val_documents"] = st.val_documents;
  meta["inputs"] = input_record;
  write_file_atomic(st.meta_path, meta.dump(2) + "\n");
  return st;
}

}  // namespace pipenag
