// Crash-safe file output: a file written here is either the complete old version or the
// complete new one, never a mixture or a truncated file (a killed run must not destroy the last
// good checkpoint). Every failure throws pipenag::Error naming the path and the OS reason.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

namespace pipenag {

// Writes `bytes` to `path` atomically (see AtomicFile). The parent directory must exist.
void write_file_atomic(const std::string& path, std::string_view bytes);

// The whole content of `path`; Error if it is missing, a directory, unreadable, or longer than
// `max_bytes` (a guard for small files such as configs: /dev/zero must not exhaust memory).
std::string read_file(const std::string& path, std::size_t max_bytes = static_cast<std::size_t>(-1));

// mkdir -p; an empty `dir` means the current directory and does nothing.
void make_dirs(const std::string& dir);

// Streaming atomic write: data goes to `<path>.tmp.<pid>` in the same directory (so the final
// rename cannot cross filesystems); commit() fsyncs it, renames it over `path` and fsyncs the
// directory so the rename itself survives a power cut. Destroying an AtomicFile that was not
// committed, or any failed write/commit, removes the temporary file and leaves `path` untouched.
class AtomicFile {
 public:
  AtomicFile() = default;
  explicit AtomicFile(const std::string& path) { open(path); }
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  AtomicFile(AtomicFile&& other) noexcept;
  AtomicFile& operator=(AtomicFile&& other) noexcept;

  void open(const std::string& path);
  void write(const void* data, std::size_t n);
  void write(std::string_view bytes) { write(bytes.data(), bytes.size()); }
  void commit();
  // Drops the temporary file without touching `path` (what the destructor does).
  void abort() noexcept;

  bool is_open() const { return fd_ >= 0; }
  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return tmp_path_; }

 private:
  int fd_ = -1;
  std::string path_;
  std::string tmp_path_;
};

}  // namespace pipenag
