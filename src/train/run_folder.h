// One owner per run folder (out.dir). A trainer holds an exclusive flock on <out.dir>/pipenag.lock for
// its whole run; the kernel releases it when the process ends, however it ends, so a lock never
// goes stale. Under the lock the trainer removes the temporaries that killed runs left behind
// (`<name>.tmp.<pid>` files and folders whose process is gone) and decides what to do with an
// earlier run's files (continue with --resume, replace with --force, else refuse).
#pragma once
#include <string>

namespace pipenag {

inline constexpr const char* kLockFile = "pipenag.lock";

class RunFolderLock {
 public:
  // Creates `dir` if needed and locks it; Error naming the folder and the holder's pid when
  // another process holds it.
  explicit RunFolderLock(const std::string& dir);
  ~RunFolderLock();
  RunFolderLock(const RunFolderLock&) = delete;
  RunFolderLock& operator=(const RunFolderLock&) = delete;

 private:
  int fd_ = -1;
};

// Removes the `<name>.tmp.<pid>` entries (files or folders) that a trainer writes (checkpoint,
// metrics.jsonl, metrics.jsonl.corrupt, memory.json in `dir`; train.bin, val.bin, meta.json in
// `dir`/data) whose pid is a valid pid of no live process. Returns how many it removed.
int remove_stale_temporaries(const std::string& dir);

}  // namespace pipenag
