#include "train/run_folder.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>

#include "io/atomic_file.h"
#include "util/error.h"

namespace pipenag {
namespace fs = std::filesystem;

RunFolderLock::RunFolderLock(const std::string& dir) {
  make_dirs(dir);
  const std::string path = (dir.empty() ? std::string(".") : dir) + "/lock";
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

// The pid of a `<name>.tmp.<pid>` entry, or -1 when the name is not one.
long temp_pid(const std::string& name) {
  const size_t p = name.rfind(".tmp.");
  if (p == std::string::npos || p == 0) return -1;
  const std::string digits = name.substr(p + 5);
  if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stol(digits);
}

bool alive(long pid) { return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM); }

}  // namespace

int remove_stale_temporaries(const std::string& dir) {
  int removed = 0;
  const fs::path root(dir.empty() ? "." : dir);
  for (const fs::path& d : {root, root / "data", root / "checkpoint"}) {
    std::error_code ec;
    if (!fs::is_directory(d, ec)) continue;
    for (const auto& e : fs::directory_iterator(d, ec)) {
      const long pid = temp_pid(e.path().filename().string());
      if (pid < 0 || pid == ::getpid() || alive(pid)) continue;
      std::error_code rec;
      if (fs::remove_all(e.path(), rec) > 0 && !rec) ++removed;
    }
  }
  return removed;
}

}  // namespace pipenag
