#include "io/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <utility>

#include "util/error.h"

namespace pipenag {
namespace {

std::string errno_text(int err) { return std::strerror(err); }

std::string parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Without this the rename may be lost on power failure even though the file data was synced.
// Filesystems that cannot sync a directory (EINVAL) give no durability guarantee to lose, and a
// directory we cannot open for reading leaves the rename merely unsynced, which is no reason to
// fail a write that has already happened.
void sync_dir(const std::string& path) {
  const std::string dir = parent_dir(path);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return;
  const int rc = ::fsync(dfd);
  const int err = errno;
  ::close(dfd);
  if (rc != 0 && err != EINVAL && err != ENOTSUP) {
    throw Error(path + ": cannot sync directory '" + dir + "': " + errno_text(err));
  }
}

}  // namespace

AtomicFile::~AtomicFile() { abort(); }

AtomicFile::AtomicFile(AtomicFile&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      path_(std::move(other.path_)),
      tmp_path_(std::move(other.tmp_path_)) {}

AtomicFile& AtomicFile::operator=(AtomicFile&& other) noexcept {
  if (this != &other) {
    abort();
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
    tmp_path_ = std::move(other.tmp_path_);
  }
  return *this;
}

void AtomicFile::open(const std::string& path) {
  if (is_open()) throw Error(path + ": AtomicFile is already open for '" + path_ + "'");
  if (path.empty()) throw Error("cannot write a file with an empty path");
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) {
    const int err = errno;
    throw Error(path + ": cannot create temporary file '" + tmp + "': " + errno_text(err));
  }
  fd_ = fd;
  path_ = path;
  tmp_path_ = std::move(tmp);
}

void AtomicFile::write(const void* data, std::size_t n) {
  if (!is_open()) throw Error("write to an AtomicFile that is not open");
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    // Linux transfers at most ~2 GiB per call; chunking also keeps the count in ssize_t range.
    const std::size_t chunk = std::min<std::size_t>(n, std::size_t{1} << 30);
    const ssize_t wrote = ::write(fd_, p, chunk);
    if (wrote < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      const std::string path = path_;
      abort();
      throw Error(path + ": write failed: " + errno_text(err));
    }
    p += wrote;
    n -= static_cast<std::size_t>(wrote);
  }
}

void AtomicFile::commit() {
  if (!is_open()) throw Error("commit of an AtomicFile that is not open");
  const std::string path = path_;
  if (::fsync(fd_) != 0) {
    const int err = errno;
    abort();
    throw Error(path + ": fsync failed: " + errno_text(err));
  }
  // close() can report a deferred write error (e.g. NFS quota); the data is not safe until then.
  const int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp_path_.c_str());
    tmp_path_.clear();
    throw Error(path + ": close failed: " + errno_text(err));
  }
  if (::rename(tmp_path_.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp_path_.c_str());
    tmp_path_.clear();
    throw Error(path + ": cannot replace file: " + errno_text(err));
  }
  tmp_path_.clear();
  sync_dir(path);
}

void AtomicFile::abort() noexcept {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
    ::unlink(tmp_path_.c_str());
  }
  tmp_path_.clear();
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  AtomicFile f(path);
  f.write(bytes);
  f.commit();
}

std::string read_file(const std::string& path, std::size_t max_bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    throw Error(path + ": cannot open: " + errno_text(err));
  }
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};

  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    throw Error(path + ": cannot stat: " + errno_text(err));
  }
  if (S_ISDIR(st.st_mode)) throw Error(path + ": is a directory, expected a file");

  std::string out;
  // st_size is only a hint: pipes and /proc files report 0, so read until EOF regardless.
  if (S_ISREG(st.st_mode) && st.st_size > 0) out.reserve(static_cast<std::size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    const ssize_t got = ::read(fd, buf, sizeof buf);
    if (got < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      throw Error(path + ": read failed: " + errno_text(err));
    }
    if (got == 0) break;
    out.append(buf, static_cast<std::size_t>(got));
    if (out.size() > max_bytes)
      throw Error(path + ": longer than " + std::to_string(max_bytes) + " bytes, not a file of this kind");
  }
  return out;
}

void make_dirs(const std::string& dir) {
  if (dir.empty()) return;
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    throw Error(dir + ": exists and is not a directory");
  fs::create_directories(dir, ec);
  if (ec) throw Error(dir + ": cannot create directory: " + ec.message());
  if (!fs::is_directory(dir, ec)) throw Error(dir + ": exists and is not a directory");
}

}  // namespace pipenag
