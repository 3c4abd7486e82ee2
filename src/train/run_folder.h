// One owner per run folder (out.dir). A trainer holds an exclusive flock on <out.dir>/lock for
// its whole run; the kernel releases it when the process ends, however it ends, so a lock never
// goes stale. Under the lock the trainer removes the temporaries that killed runs left behind
// (`<name>.tmp.<pid>` files and folders whose process is gone) and decides what to do with an
// earlier run's files (continue with --resume, replace with --force, else refuse).
#pragma once
#include <string>

namespace pipenag {

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

// Removes `<name>.tmp.<pid>` entries (files or folders) in `dir` and its data/ and checkpoint/
// folders whose pid is not a live process. Returns how many it removed.
int remove_stale_temporaries(const std::string& dir);

}  // namespace pipenag
