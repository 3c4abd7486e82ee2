// Binary token files (`pipenag prepare` writes train.bin / val.bin): a 64-byte little-endian
// header followed by the tokens, read back zero-copy through a read-only memory map.
//
// Header (docs/FORMATS.md, "Token files"):
//   offset  size  field
//        0     8  magic "PNAGTOK\0"
//        8     4  format version, u32 = 1
//       12     4  vocabulary size, u32 (every token is < this)
//       16     4  token dtype = bytes per token, u32: 2 (uint16, vocab <= 65536) or 4 (uint32)
//       20     4  header size in bytes, u32 = 64 (where the tokens begin)
//       24     8  token count, u64
//       32     8  checksum of the payload (the token bytes exactly as stored), u64: XXH64, seed 0
//       40    24  reserved, zero
//       64     -  count tokens, little-endian, dtype bytes each; nothing after them
//
// Every failure is a pipenag::Error whose one-line message names the file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pipenag {

inline constexpr char kTokenFileMagic[8] = {'P', 'N', 'A', 'G', 'T', 'O', 'K', '\0'};
inline constexpr uint32_t kTokenFileVersion = 1;
inline constexpr size_t kTokenFileHeaderSize = 64;

// XXH64 (the xxHash 64-bit algorithm, byte-for-byte the reference one) of n bytes.
uint64_t xxhash64(const void* data, size_t n, uint64_t seed = 0);
// A 64-bit checksum as the files record it: 16 lowercase hex digits.
std::string hex64(uint64_t v);

// Bytes per token for a vocabulary: 2 when every id fits in uint16 (vocab_size <= 65536), else 4.
uint32_t token_dtype_for_vocab(int vocab_size);

// Writes `tokens` atomically (io/atomic_file.h: the file is complete or absent). Error, naming
// the file, when vocab_size < 1 or a token is < 0 or >= vocab_size (first offender reported).
void write_token_file(const std::string& path, const std::vector<int32_t>& tokens, int vocab_size);

// A token file mapped read-only. open() validates the header (size, magic, version, dtype, the
// dtype/vocabulary consistency, payload size == count * dtype) and, with verify_checksum, the
// payload checksum and that every token is < vocab_size. Without verify_checksum the payload is
// trusted (a damaged file may then hold out-of-vocabulary ids). Move-only; unmaps on destruction.
class TokenFile {
 public:
  static TokenFile open(const std::string& path, bool verify_checksum = true);

  TokenFile() = default;
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;
  TokenFile(TokenFile&& other) noexcept;
  TokenFile& operator=(TokenFile&& other) noexcept;

  int vocab_size() const { return vocab_size_; }
  size_t size() const { return count_; }
  uint32_t dtype_bytes() const { return dtype_; }
  uint64_t checksum() const { return checksum_; }
  const std::string& path() const { return path_; }
  // The mapped payload (size() tokens of dtype_bytes() each). It stays valid while this object or
  // the one it is moved into lives: a move transfers the mapping without changing its address.
  const void* data() const { return tokens_; }

  // Token i (no bounds check: i < size()).
  int32_t operator[](size_t i) const {
    return dtype_ == 2 ? static_cast<int32_t>(reinterpret_cast<const uint16_t*>(tokens_)[i])
                       : static_cast<int32_t>(reinterpret_cast<const uint32_t*>(tokens_)[i]);
  }
  // Tokens [begin, begin + n) into dst; Error (naming the file) when the range is out of bounds.
  void copy(size_t begin, size_t n, int32_t* dst) const;

 private:
  void release() noexcept;

  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  const unsigned char* tokens_ = nullptr;
  int vocab_size_ = 0;
  uint32_t dtype_ = 0;
  size_t count_ = 0;
  uint64_t checksum_ = 0;
};

}  // namespace pipenag
