#include "data/token_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <utility>

#include "io/atomic_file.h"
#include "util/error.h"

namespace pipenag {

static_assert(std::endian::native == std::endian::little,
              "token files are little-endian and mapped without conversion");

namespace {

constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t P3 = 0x165667B19E3779F9ULL;
constexpr uint64_t P4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t P5 = 0x27D4EB2F165667C5ULL;

inline uint64_t load64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint32_t load32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t xxh_round(uint64_t acc, uint64_t input) {
  acc += input * P2;
  acc = std::rotl(acc, 31);
  return acc * P1;
}
inline uint64_t xxh_merge(uint64_t acc, uint64_t val) {
  acc ^= xxh_round(0, val);
  return acc * P1 + P4;
}

void put32(unsigned char* p, uint32_t v) { std::memcpy(p, &v, 4); }
void put64(unsigned char* p, uint64_t v) { std::memcpy(p, &v, 8); }

std::string errno_text(int err) { return std::strerror(err); }

}  // namespace

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

uint64_t xxhash64(const void* data, size_t n, uint64_t seed) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  const unsigned char* const end = p + n;
  uint64_t h;
  if (n >= 32) {
    uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
    const unsigned char* const limit = end - 32;
    do {
      v1 = xxh_round(v1, load64(p));
      v2 = xxh_round(v2, load64(p + 8));
      v3 = xxh_round(v3, load64(p + 16));
      v4 = xxh_round(v4, load64(p + 24));
      p += 32;
    } while (p <= limit);
    h = std::rotl(v1, 1) + std::rotl(v2, 7) + std::rotl(v3, 12) + std::rotl(v4, 18);
    h = xxh_merge(h, v1);
    h = xxh_merge(h, v2);
    h = xxh_merge(h, v3);
    h = xxh_merge(h, v4);
  } else {
    h = seed + P5;
  }
  h += static_cast<uint64_t>(n);
  for (; p + 8 <= end; p += 8) {
    h ^= xxh_round(0, load64(p));
    h = std::rotl(h, 27) * P1 + P4;
  }
  if (p + 4 <= end) {
    h ^= static_cast<uint64_t>(load32(p)) * P1;
    h = std::rotl(h, 23) * P2 + P3;
    p += 4;
  }
  for (; p < end; ++p) {
    h ^= static_cast<uint64_t>(*p) * P5;
    h = std::rotl(h, 11) * P1;
  }
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

uint32_t token_dtype_for_vocab(int vocab_size) { return vocab_size <= 65536 ? 2u : 4u; }

void write_token_file(const std::string& path, const std::vector<int32_t>& tokens,
                      int vocab_size) {
  if (vocab_size < 1)
    throw Error(path + ": cannot write a token file with vocabulary size " +
                std::to_string(vocab_size));
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab_size)
      throw Error(path + ": token " + std::to_string(tokens[i]) + " at index " +
                  std::to_string(i) + " is outside the vocabulary (size " +
                  std::to_string(vocab_size) + ")");
  }
  const uint32_t dtype = token_dtype_for_vocab(vocab_size);
  std::vector<uint16_t> narrow;
  const void* payload = tokens.data();
  const size_t payload_bytes = tokens.size() * dtype;
  if (dtype == 2) {
    narrow.resize(tokens.size());
    for (size_t i = 0; i < tokens.size(); ++i) narrow[i] = static_cast<uint16_t>(tokens[i]);
    payload = narrow.data();
  }

  unsigned char header[kTokenFileHeaderSize] = {};
  std::memcpy(header, kTokenFileMagic, 8);
  put32(header + 8, kTokenFileVersion);
  put32(header + 12, static_cast<uint32_t>(vocab_size));
  put32(header + 16, dtype);
  put32(header + 20, static_cast<uint32_t>(kTokenFileHeaderSize));
  put64(header + 24, static_cast<uint64_t>(tokens.size()));
  put64(header + 32, xxhash64(payload, payload_bytes));

  AtomicFile out(path);
  out.write(header, sizeof header);
  if (payload_bytes > 0) out.write(payload, payload_bytes);
  out.commit();
}

// ---------------------------------------------------------------------------------------------

TokenFile::~TokenFile() { release(); }

void TokenFile::release() noexcept {
  if (map_ != nullptr) ::munmap(map_, map_size_);
  map_ = nullptr;
  map_size_ = 0;
  tokens_ = nullptr;
}

TokenFile::TokenFile(TokenFile&& other) noexcept
    : path_(std::move(other.path_)),
      map_(std::exchange(other.map_, nullptr)),
      map_size_(std::exchange(other.map_size_, 0)),
      tokens_(std::exchange(other.tokens_, nullptr)),
      vocab_size_(std::exchange(other.vocab_size_, 0)),
      dtype_(std::exchange(other.dtype_, 0)),
      count_(std::exchange(other.count_, 0)),
      checksum_(std::exchange(other.checksum_, 0)) {}

TokenFile& TokenFile::operator=(TokenFile&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_size_ = std::exchange(other.map_size_, 0);
    tokens_ = std::exchange(other.tokens_, nullptr);
    vocab_size_ = std::exchange(other.vocab_size_, 0);
    dtype_ = std::exchange(other.dtype_, 0);
    count_ = std::exchange(other.count_, 0);
    checksum_ = std::exchange(other.checksum_, 0);
  }
  return *this;
}

TokenFile TokenFile::open(const std::string& path, bool verify_checksum) {
  const std::string where = path + ": ";
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    throw Error(where + "cannot open token file: " + errno_text(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error(where + "cannot stat token file: " + errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(where + "not a regular file");
  }
  const size_t file_size = static_cast<size_t>(st.st_size);
  if (file_size < kTokenFileHeaderSize) {
    ::close(fd);
    throw Error(where + "not a token file: " + std::to_string(file_size) +
                " bytes, shorter than the " + std::to_string(kTokenFileHeaderSize) +
                "-byte header");
  }
  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) throw Error(where + "cannot map token file: " + errno_text(map_err));

  TokenFile f;
  f.path_ = path;
  f.map_ = map;
  f.map_size_ = file_size;
  const unsigned char* h = static_cast<const unsigned char*>(map);

  if (std::memcmp(h, kTokenFileMagic, 8) != 0)
    throw Error(where + "not a pipenag token file (wrong magic; expected \"PNAGTOK\\0\")");
  const uint32_t version = load32(h + 8);
  if (version != kTokenFileVersion)
    throw Error(where + "unsupported token file version " + std::to_string(version) +
                " (this build reads version " + std::to_string(kTokenFileVersion) + ")");
  const uint32_t vocab = load32(h + 12);
  if (vocab == 0 || vocab > static_cast<uint32_t>(INT_MAX))
    throw Error(where + "invalid vocabulary size " + std::to_string(vocab));
  const uint32_t dtype = load32(h + 16);
  if (dtype != 2 && dtype != 4)
    throw Error(where + "unsupported token dtype " + std::to_string(dtype) +
                " (expected 2 = uint16 or 4 = uint32)");
  const uint32_t expected_dtype = token_dtype_for_vocab(static_cast<int>(vocab));
  if (dtype != expected_dtype)
    throw Error(where + "token dtype " + std::to_string(dtype) +
                " is inconsistent with vocabulary size " + std::to_string(vocab) +
                " (expected " + std::to_string(expected_dtype) + ")");
  const uint32_t header_size = load32(h + 20);
  if (header_size != kTokenFileHeaderSize)
    throw Error(where + "header size " + std::to_string(header_size) + " is not " +
                std::to_string(kTokenFileHeaderSize));
  for (size_t i = 40; i < kTokenFileHeaderSize; ++i)
    if (h[i] != 0) throw Error(where + "reserved header byte " + std::to_string(i) + " is not zero");
  const uint64_t count = load64(h + 24);
  const uint64_t payload = file_size - kTokenFileHeaderSize;
  if (count > payload / dtype || payload != count * dtype) {
    const bool too_short = count > payload / dtype;
    throw Error(where + (too_short ? "truncated" : "trailing bytes") + ": header says " +
                std::to_string(count) + " tokens of " + std::to_string(dtype) + " bytes (" +
                (count > UINT64_MAX / dtype ? std::string("too many")
                                            : std::to_string(count * dtype)) +
                " bytes) but the payload has " + std::to_string(payload) + " bytes");
  }
  f.vocab_size_ = static_cast<int>(vocab);
  f.dtype_ = dtype;
  f.count_ = static_cast<size_t>(count);
  f.checksum_ = load64(h + 32);
  f.tokens_ = h + kTokenFileHeaderSize;

  if (verify_checksum) {
    ::madvise(map, file_size, MADV_SEQUENTIAL);
    const uint64_t actual = xxhash64(f.tokens_, static_cast<size_t>(payload));
    if (actual != f.checksum_) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "checksum mismatch (header %016llx, payload %016llx)",
                    static_cast<unsigned long long>(f.checksum_),
                    static_cast<unsigned long long>(actual));
      throw Error(where + buf + ": the file is damaged");
    }
    // dtype 2 with vocab 65536 cannot hold an out-of-range id; otherwise look for the first.
    const auto check = [&](const auto* t) {
      uint32_t max_seen = 0;
      for (size_t i = 0; i < f.count_; ++i) max_seen = std::max<uint32_t>(max_seen, t[i]);
      if (max_seen < vocab) return;
      for (size_t i = 0; i < f.count_; ++i)
        if (t[i] >= vocab)
          throw Error(where + "token " + std::to_string(t[i]) + " at index " + std::to_string(i) +
                      " is outside the vocabulary (size " + std::to_string(vocab) + ")");
    };
    if (dtype == 2)
      check(reinterpret_cast<const uint16_t*>(f.tokens_));
    else
      check(reinterpret_cast<const uint32_t*>(f.tokens_));
    ::madvise(map, file_size, MADV_NORMAL);
  }
  return f;
}

void TokenFile::copy(size_t begin, size_t n, int32_t* dst) const {
  if (begin > count_ || n > count_ - begin)
    throw Error(path_ + ": token range [" + std::to_string(begin) + ", " +
                std::to_string(begin + n) + ") is outside the file (" + std::to_string(count_) +
                " tokens)");
  if (dtype_ == 2) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(tokens_) + begin;
    for (size_t i = 0; i < n; ++i) dst[i] = static_cast<int32_t>(src[i]);
  } else {
    std::memcpy(dst, tokens_ + begin * 4, n * sizeof(int32_t));
  }
}

}  // namespace pipenag
