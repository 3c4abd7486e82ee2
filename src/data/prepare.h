// `pipenag prepare`: a text corpus (one file = one document) tokenised once into
// <out_dir>/train.bin and <out_dir>/val.bin (binary token files, data/token_file.h) plus
// <out_dir>/meta.json describing them (docs/FORMATS.md, "Token files (prepare)").
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "data/text_corpus.h"
#include "data/tokenizer.h"

namespace pipenag {

// The train/validation split by document: document d goes to validation when a seeded hash of
// its name falls below val_fraction; with two or more documents at least one lands on each side
// (the last moves to validation when none did, the first to training when all did). The same
// rule that earlier versions used for in-memory byte corpora, so a corpus splits the same way.
// One document: all false (prepare holds out the tail of its tokens instead).
std::vector<bool> split_documents(const std::vector<Document>& docs, double val_fraction,
                                  uint64_t seed);

struct PrepareStats {
  std::string tokenizer;  // tok.name()
  int vocab_size = 0;
  size_t documents = 0;                  // in the corpus
  size_t train_docs = 0, val_docs = 0;   // a tail split counts its document as training
  size_t train_tokens = 0, val_tokens = 0;  // separators included
  bool tail_split = false;               // one document: validation is the tail of its tokens
  std::vector<std::string> val_documents;  // names, in corpus order
  std::string train_path, val_path, meta_path;
};

// Reads `input` (read_documents: a .txt file or a folder of them), splits it (split_documents;
// a single document: its last floor(n * val_fraction) tokens are validation), tokenises every
// document (in parallel, the output independent of the thread count), joins each split's
// documents in corpus order with tok.eot() between consecutive documents when the tokenizer has
// one (nothing otherwise), and writes train.bin, val.bin and then meta.json into `out_dir`
// (created when missing), each atomically. Errors, naming the file or folder: unreadable or empty
// corpus, val_fraction outside (0, 1), a tokenizer failure or out-of-vocabulary id (naming the
// document), a split with no tokens.
// meta.json also records each input file (name, bytes, mtime, XXH64 of its content) and each
// token file's token count and checksum, so that readers can tell a stale or mixed folder.
PrepareStats prepare_corpus(const std::string& input, const Tokenizer& tok,
                            const std::string& out_dir, double val_fraction, uint64_t split_seed);

// "" when <dir>/meta.json describes the train.bin and val.bin beside it (token count, vocabulary
// and checksum of each), else what does not match ("train.bin has checksum ..., meta.json
// records ..."): a prepare killed between its renames, or files copied from different runs.
std::string prepared_folder_mismatch(const std::string& dir);

// "" when the corpus at `input` is still the one <dir>/meta.json was prepared from (same files,
// sizes and, where an mtime differs, the same content), else what changed ("a.txt changed",
// "b.txt added"). Folders prepared by older versions (no input record) count as changed.
std::string input_change_since(const std::string& dir, const std::string& input);

}  // namespace pipenag
