#include "train/run_folder.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "io/atomic_file.h"
#include "util/error.h"

namespace pipenag {
namespace fs = std::filesystem;

RunFolderLock::RunFolderLock(const std::string& dir) {
  make_dirs(dir);
  const std::string path = (dir.empty() ? std::string(".") : dir) + "/" + kLockFile;
  // Someone may unlink the lock file between our open and our flock; then we would hold a lock
  // on an inode nobody else can find. Retry until the locked inode is the one at `path`.
  for (int attempt = 0;; ++attempt) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) throw Error(path + ": cannot open the run folder's lock file: " + std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      std::string holder;
      char buf[32] = {};
      const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
      if (n > 0) holder = std::string(buf, static_cast<size_t>(n));
      while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
      ::close(fd_);
      fd_ = -1;
      if (err == EWOULDBLOCK)
        throw Error("out.dir " + dir + " is in use by another pipenag process" +
                    (holder.empty() ? std::string() : " (pid " + holder + ")") +
                    "; wait for it to finish or choose another out.dir");
      throw Error(path + ": cannot lock: " + std::strerror(err));
    }
    struct stat held {}, named {};
    if (::fstat(fd_, &held) == 0 && ::stat(path.c_str(), &named) == 0 && held.st_dev == named.st_dev &&
        held.st_ino == named.st_ino)
      break;
    ::close(fd_);
    fd_ = -1;
    if (attempt == 10) throw Error(path + ": the lock file keeps being replaced; is another tool deleting it?");
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    throw Error(path + ": cannot write the lock file: " + std::strerror(err));
  }
}

RunFolderLock::~RunFolderLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

namespace {

// The pid of a `<name>.tmp.<pid>` entry whose name is one pipenag writes in that folder, or -1.
long temp_pid(const std::string& entry, const std::vector<std::string>& names) {
  for (const auto& n : names) {
    const std::string prefix = n + ".tmp.";
    if (entry.size() <= prefix.size() || entry.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string digits = entry.substr(prefix.size());
    if (digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) return -1;
    return std::stol(digits);
  }
  return -1;
}

long pid_max() {
  long v = 4194304;
  if (std::FILE* f = std::fopen("/proc/sys/kernel/pid_max", "r")) {
    if (std::fscanf(f, "%ld", &v) != 1) v = 4194304;
    std::fclose(f);
  }
  return v;
}

bool alive(long pid) { return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM; }

}  // namespace

int remove_stale_temporaries(const std::string& dir) {
  int removed = 0;
  const fs::path root(dir.empty() ? "." : dir);
  const long max_pid = pid_max();
  // Only what a trainer writes: the checkpoint folder, metrics and memory report in out.dir, the
  // token cache in out.dir/data. Anything else in the folder belongs to the user.
  const std::vector<std::pair<fs::path, std::vector<std::string>>> places = {
      {root, {"checkpoint", "metrics.jsonl", "metrics.jsonl.corrupt", "memory.json"}},
      {root / "data", {"train.bin", "val.bin", "meta.json"}}};
  for (const auto& [d, names] : places) {
    std::error_code ec;
    if (!fs::is_directory(d, ec)) continue;
    for (const auto& e : fs::directory_iterator(d, ec)) {
      const long pid = temp_pid(e.path().filename().string(), names);
      if (pid <= 0 || pid > max_pid || pid == ::getpid() || alive(pid)) continue;
      std::error_code rec;
      if (fs::remove_all(e.path(), rec) > 0 && !rec) ++removed;
    }
  }
  return removed;
}

}  // namespace pipenag
