#include "util/gnuplot.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <vector>

#include "io/atomic_file.h"
#include "util/error.h"

extern char** environ;

namespace pipenag {

std::string quote_gp(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

namespace {

// Runs the script; "" on success, else why not.
std::string run(const std::string& program, const std::string& dir, const std::string& script,
                const std::string& outfile) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addchdir_np(&fa, dir.c_str());
  const std::string err_name = script + ".log.tmp." + std::to_string(::getpid());
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 2, err_name.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::string e_arg = "outfile=" + quote_gp(outfile);
  std::string script_arg = script, dash_e = "-e";
  std::vector<char*> argv = {const_cast<char*>(program.c_str()), dash_e.data(), e_arg.data(), script_arg.data(),
                             nullptr};
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, program.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  const std::filesystem::path log = std::filesystem::path(dir) / err_name;
  std::error_code ec;
  if (rc != 0) {
    std::filesystem::remove(log, ec);
    if (rc == ENOENT) return "'" + program + "' not found (install gnuplot-nox)";
    return "cannot run '" + program + "': " + std::strerror(rc);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  std::string err;
  try {
    err = read_file(log.string());
  } catch (const Error&) {
  }
  std::filesystem::remove(log, ec);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
  if (WIFEXITED(status) && WEXITSTATUS(status) == 127) return "'" + program + "' not found (install gnuplot-nox)";
  // The last non-empty line of gnuplot's complaint, on one line.
  std::string last;
  std::istringstream in(err);
  for (std::string line; std::getline(in, line);)
    if (line.find_first_not_of(" \t^") != std::string::npos) last = line;
  return program + " failed" + (last.empty() ? std::string() : ": " + last);
}

}  // namespace

std::string render_gnuplot(const std::string& program, const std::string& dir, const std::string& script,
                           const std::string& png) {
  namespace fs = std::filesystem;
  const std::string tmp = png + ".tmp." + std::to_string(::getpid());
  std::string why = run(program, dir, script, tmp);
  std::error_code ec;
  if (why.empty()) {
    fs::rename(fs::path(dir) / tmp, fs::path(dir) / png, ec);
    if (ec) why = "cannot rename " + (fs::path(dir) / tmp).string() + ": " + ec.message();
  }
  fs::remove(fs::path(dir) / tmp, ec);
  return why;
}

}  // namespace pipenag
