// Beyond one machine (issue 11), with the pipenag binary under mpirun: the mpi engine gives the
// threads engine's bits for every schedule, its sharded checkpoints resume (on any engine and
// under another stage layout), bad launches fail with one line on every rank, a lost rank ends
// the job within a bounded time with the last checkpoint intact, and emulated links and slow
// stages change timing only.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "io/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;

namespace {

using namespace pipenag;
using namespace pipenag::testutil;

// Every tensor of a checkpoint by name (whatever file holds it), as raw bytes; the flow's own
// records (slots, stashes, messages) are left out: they are named by stage.
std::map<std::string, std::string> checkpoint_tensors(const fs::path& ckpt) {
  std::map<std::string, std::string> out;
  const auto state = nlohmann::json::parse(slurp(ckpt / "state.json"));
  for (const auto& [file, rec] : state["files"].items()) {
    const SafetensorsFile f = SafetensorsFile::open((ckpt / file).string());
    for (const auto& name : f.names()) {
      if (name.rfind("stage", 0) == 0 || name.rfind("message", 0) == 0) continue;
      const auto& info = f.info(name);
      out[name] = std::string(static_cast<const char*>(f.data(name)), info.byte_size);
    }
  }
  return out;
}

class Mpi : public BinaryTest {
 protected:
  void SetUp() override {
    BinaryTest::SetUp();
    spit(dir_ / "tiny.toml", tiny_model_toml(4, 12, 6) + "[pipeline]\nstages = 2\nschedule = \"async-1f1b\"\n");
    ASSERT_STRNE(PIPENAG_MPIEXEC, "") << "no mpiexec: scripts/setup installs Open MPI (openmpi-bin, libopenmpi-dev)";
  }
  std::string cfg() const { return "--config " + (dir_ / "tiny.toml").string(); }
  // mpirun as root, with more ranks than cores allowed (tests and scripts pass both).
  static std::string mpirun(int n) {
    return std::string(PIPENAG_MPIEXEC) + " --allow-run-as-root --oversubscribe -np " + std::to_string(n) + " ";
  }
  RunResult mpi(int n, const std::string& args) {
    return run_command(mpirun(n) + PIPENAG_BINARY + " " + args, dir_);
  }
  void expect_same_tensors(const fs::path& a, const fs::path& b) {
    const auto ta = checkpoint_tensors(a), tb = checkpoint_tensors(b);
    ASSERT_GT(ta.size(), 20u);
    ASSERT_EQ(ta.size(), tb.size());
    for (const auto& [name, bytes] : ta) {
      ASSERT_TRUE(tb.count(name)) << name;
      EXPECT_TRUE(bytes == tb.at(name)) << name << " differs between " << a << " and " << b;
    }
  }
};

TEST_F(Mpi, BitIdenticalToThreadsForEverySchedule) {
  struct Case {
    const char* name;
    std::string sets;
  };
  const std::vector<Case> cases = {
      {"async", "--set pipeline.schedule=async-1f1b"},
      {"async_nostash_recompute",
       "--set pipeline.schedule=async-1f1b --set pipeline.stash=false --set pipeline.recompute=true"},
      {"gpipe_clip", "--set pipeline.schedule=gpipe --set pipeline.microbatches=2 --set train.clip_global=true "
                     "--set train.clip=0.5"},
      {"1f1b", "--set pipeline.schedule=1f1b --set pipeline.microbatches=3"},
      {"async_extra_inflight", "--set pipeline.schedule=async-1f1b --set pipeline.extra_inflight=2"},
  };
  for (const auto& c : cases) {
    const std::string t = (dir_ / (std::string("t_") + c.name)).string(), m = (dir_ / (std::string("m_") + c.name)).string();
    const RunResult a = run("train -q " + cfg() + " " + c.sets + " --set pipeline.engine=threads --set out.dir=" + t);
    ASSERT_EQ(a.code, 0) << c.name << ": " << a.err;
    const RunResult b = mpi(2, "train -q " + cfg() + " " + c.sets + " --set pipeline.engine=mpi --set out.dir=" + m);
    ASSERT_EQ(b.code, 0) << c.name << ": " << b.err << b.out;
    // Rank 0 alone prints the result and writes the metrics.
    EXPECT_EQ(std::count(b.out.begin(), b.out.end(), '\n'), 1) << b.out;
    const auto losses = [](const std::string& o) { return o.substr(0, o.find(" | ", o.find("val ppl"))); };
    EXPECT_EQ(losses(a.out), losses(b.out));
    // One file per stage and a manifest naming both.
    EXPECT_TRUE(fs::exists(fs::path(m) / "checkpoint" / "stage0.safetensors"));
    EXPECT_TRUE(fs::exists(fs::path(m) / "checkpoint" / "stage1.safetensors"));
    expect_same_tensors(fs::path(t) / "checkpoint", fs::path(m) / "checkpoint");
    const auto mt = metrics(t), mm = metrics(m);
    ASSERT_EQ(mt.size(), mm.size()) << c.name;
    for (size_t i = 0; i < mt.size(); ++i) {
      for (const char* key : {"loss", "val_loss"}) {
        if (mt[i].contains(key)) {
          EXPECT_EQ(mt[i][key], mm[i][key]) << c.name << " line " << i;
        }
      }
    }
  }
}

TEST_F(Mpi, MidFlowCheckpointResumesOnAnyEngineAndIsReadDirectly) {
  const std::string whole = (dir_ / "whole").string(), a = (dir_ / "a").string(), b = (dir_ / "b").string();
  ASSERT_EQ(run("train -q " + cfg() + " --set pipeline.engine=threads --set out.dir=" + whole).code, 0);
  for (const std::string& out : {a, b}) {
    const RunResult r = mpi(2, "train -q " + cfg() + " --set pipeline.engine=mpi --stop-at 7 --set out.dir=" + out);
    ASSERT_EQ(r.code, 0) << r.err;
  }
  const auto state = nlohmann::json::parse(slurp(fs::path(a) / "checkpoint" / "state.json"));
  ASSERT_TRUE(state.contains("flow"));
  EXPECT_FALSE(state["flow"]["stages"][0]["in_flight"].empty()) << "async stage 0 has a micro-batch in flight at the cut";
  // eval and sample read the sharded checkpoint in one process.
  const RunResult e = run("eval --checkpoint " + a + "/checkpoint");
  EXPECT_EQ(e.code, 0) << e.err;
  EXPECT_THAT(e.out, HasSubstr("val loss"));
  const RunResult s = run("sample --checkpoint " + a + "/checkpoint --tokens 8 --prompt the");
  EXPECT_EQ(s.code, 0) << s.err;
  // Continued by mpi, and by the threads engine: both end where the uninterrupted run does.
  ASSERT_EQ(mpi(2, "train -q " + cfg() + " --set pipeline.engine=mpi --resume --set out.dir=" + a).code, 0);
  const RunResult t = run("train -q " + cfg() + " --set pipeline.engine=threads --resume --set out.dir=" + b);
  ASSERT_EQ(t.code, 0) << t.err;
  expect_same_tensors(fs::path(whole) / "checkpoint", fs::path(a) / "checkpoint");
  expect_same_tensors(fs::path(whole) / "checkpoint", fs::path(b) / "checkpoint");
}

TEST_F(Mpi, ManifestNamingAMissingOrDamagedFileIsRefused) {
  const std::string out = (dir_ / "o").string();
  ASSERT_EQ(mpi(2, "train -q " + cfg() + " --set pipeline.engine=mpi --set out.dir=" + out).code, 0);
  const fs::path ck = fs::path(out) / "checkpoint";
  fs::copy(ck, dir_ / "damaged", fs::copy_options::recursive);
  {
    std::string bytes = slurp(dir_ / "damaged" / "stage1.safetensors");
    bytes.back() = static_cast<char>(bytes.back() ^ 1);
    spit(dir_ / "damaged" / "stage1.safetensors", bytes);
  }
  expect_error("eval --checkpoint " + (dir_ / "damaged").string(), "stage1.safetensors: tensor data is damaged");
  fs::remove(ck / "stage1.safetensors");
  expect_error("eval --checkpoint " + ck.string(), "names stage1.safetensors, which is missing");
}

TEST_F(Mpi, BadLaunchesFailWithOneLineOnEveryRank) {
  // More ranks than stages: every rank says so.
  RunResult r = mpi(3, "train -q " + cfg() + " --set pipeline.engine=mpi --set out.dir=" + (dir_ / "x").string());
  EXPECT_NE(r.code, 0);
  size_t n = 0;
  for (size_t p = 0; (p = r.err.find("3 MPI ranks for pipeline.stages = 2", p)) != std::string::npos; ++p) ++n;
  EXPECT_EQ(n, 3u) << r.err;
  // Not launched by mpirun.
  expect_error("train -q " + cfg() + " --set pipeline.engine=mpi", "needs an MPI launcher");
  // Launched by mpirun without the mpi engine: refused on every rank (not two trainers racing).
  r = mpi(2, "train -q " + cfg() + " --set pipeline.engine=threads --set out.dir=" + (dir_ / "z").string());
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.err, HasSubstr("started by an MPI launcher with 2 ranks, but pipeline.engine = \"threads\""));
  // One rank with another config (MPMD launch): every rank names it.
  const std::string base = std::string(PIPENAG_BINARY) + " train -q " + cfg() + " --set pipeline.engine=mpi --set out.dir=" +
                           (dir_ / "y").string();
  r = run_command(std::string(PIPENAG_MPIEXEC) + " --allow-run-as-root --oversubscribe -np 1 " + base + " : -np 1 " +
                      base + " --set train.lr=0.002",
                  dir_);
  EXPECT_NE(r.code, 0);
  n = 0;
  for (size_t p = 0; (p = r.err.find("rank 1 has a different config: train.lr = 0.002 there", p)) != std::string::npos; ++p)
    ++n;
  EXPECT_EQ(n, 2u) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "y" / "checkpoint"));
}

// Starts an mpi run of P ranks in the background (long, checkpointing every 2 updates); returns
// mpirun's pid.
pid_t start_mpi_run(const fs::path& dir, int P, const std::string& extra) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    const std::string err = (dir / "bg.err").string();
    if (!std::freopen(err.c_str(), "w", stderr)) ::_exit(126);
    if (!std::freopen("/dev/null", "w", stdout)) ::_exit(126);
    const std::string cmd = std::string(PIPENAG_MPIEXEC) + " --allow-run-as-root --oversubscribe -np " +
                            std::to_string(P) + " " + PIPENAG_BINARY + " train -q --config " + (dir / "tiny.toml").string() +
                            " --set pipeline.engine=mpi --set train.steps=100000 --set train.eval_every=0 "
                            "--set train.checkpoint_every=2 --set out.dir=" + (dir / "lost").string() + " " + extra;
    ::execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

// The pid of rank `rank` of the run whose out.dir is `out` (from /proc: the environment Open MPI
// gives each rank).
pid_t rank_pid(const fs::path& out, int rank) {
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::string cmd, env;
    try {
      cmd = slurp(e.path() / "cmdline");
      env = slurp(e.path() / "environ");
    } catch (...) {
      continue;
    }
    if (cmd.find(out.string()) == std::string::npos || cmd.find("pipenag") == std::string::npos) continue;
    if (cmd.rfind(PIPENAG_BINARY, 0) != 0) continue;  // not mpirun or the shell
    const std::string want = std::string("OMPI_COMM_WORLD_RANK=") + std::to_string(rank);
    if (env.find(want + '\0') != std::string::npos) return static_cast<pid_t>(std::stol(name));
  }
  return -1;
}

// Waits for `pid` to exit; its status, or -1 after `limit_s`.
int wait_exit(pid_t pid, double limit_s, double* took) {
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      *took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      return status;
    }
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > limit_s) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

void wait_for_checkpoint(const fs::path& ckpt, int64_t step) {
  for (int i = 0; i < 1200; ++i) {
    try {
      if (nlohmann::json::parse(slurp(ckpt / "state.json"))["step"].get<int64_t>() >= step) return;
    } catch (...) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  FAIL() << "no checkpoint at step " << step << " in " << ckpt;
}

// Waits (up to 30 s) until rank 0 has written `n` lines of <out>/metrics.jsonl: one per update.
void wait_for_updates(const fs::path& out, long n) {
  for (int i = 0; i < 600; ++i) {
    std::string m;
    try {
      m = slurp(out / "metrics.jsonl");
    } catch (...) {
    }
    if (std::count(m.begin(), m.end(), '\n') >= n) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

TEST_F(Mpi, KilledRankEndsTheJobAndTheLastCheckpointStaysIntact) {
  const pid_t job = start_mpi_run(dir_, 2, "");
  wait_for_checkpoint(dir_ / "lost" / "checkpoint", 4);
  const pid_t victim = rank_pid(dir_ / "lost", 1);
  ASSERT_GT(victim, 0);
  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  double took = 0;
  const int status = wait_exit(job, 30, &took);
  ASSERT_NE(status, -1) << "the job did not end within 30 s of losing rank 1";
  EXPECT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "exit status " << status;
  RecordProperty("exit_after_kill_s", std::to_string(took));
  std::printf("job ended %.2f s after rank 1 was killed\n", took);
  // The last checkpoint is whole: a single process reads it.
  const RunResult e = run("eval --checkpoint " + (dir_ / "lost" / "checkpoint").string());
  EXPECT_EQ(e.code, 0) << e.err;
  EXPECT_TRUE(fs::exists(dir_ / "lost" / "checkpoint" / "stage1.safetensors"));
}

TEST_F(Mpi, StalledRankIsNamedWithinThePeerTimeout) {
  // A checkpoint at step 4, then a resumed run with no other checkpoint or evaluation before its
  // end: one window, so a rank stopped while it goes is waited for inside the flow.
  ASSERT_EQ(mpi(2, "train -q " + cfg() + " --set pipeline.engine=mpi --set train.steps=4 --set out.dir=" +
                       (dir_ / "lost").string()).code,
            0);
  const pid_t job = start_mpi_run(dir_, 2, "--resume --set pipeline.peer_timeout_s=2 --set train.checkpoint_every=0");
  // Rank 0 writes a metrics line per update: wait until the run is well under way.
  wait_for_updates(dir_ / "lost", 40);
  const pid_t victim = rank_pid(dir_ / "lost", 1);
  ASSERT_GT(victim, 0);
  ASSERT_EQ(::kill(victim, SIGSTOP), 0);
  double took = 0;
  const int status = wait_exit(job, 30, &took);
  ::kill(victim, SIGKILL);
  ASSERT_NE(status, -1) << "the job did not end within 30 s of rank 1 stalling";
  EXPECT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  std::printf("job ended %.2f s after rank 1 stalled (peer_timeout_s = 2)\n", took);
  EXPECT_LT(took, 15.0);
  const std::string err = slurp(dir_ / "bg.err");
  EXPECT_THAT(err, HasSubstr("rank 0: nothing from rank 1 for 2 s (pipeline.peer_timeout_s): rank 1 was lost or stalled; "
                             "last completed update"));
  const RunResult e = run("eval --checkpoint " + (dir_ / "lost" / "checkpoint").string());
  EXPECT_EQ(e.code, 0) << e.err;
}

// Ctrl-C on mpirun: Open MPI passes the signal on to every rank; rank 0's decides, every rank saves
// its stage at the same cut, and --resume continues the run.
TEST_F(Mpi, SignalToMpirunSavesEveryStageAndResumes) {
  const pid_t job = start_mpi_run(dir_, 2, "--set train.checkpoint_every=0");
  wait_for_updates(dir_ / "lost", 20);
  ASSERT_EQ(::kill(job, SIGINT), 0);
  double took = 0;
  const int status = wait_exit(job, 60, &took);
  ASSERT_NE(status, -1) << "mpirun did not end after SIGINT";
  EXPECT_THAT(slurp(dir_ / "bg.err"), HasSubstr("checkpoint saved to"));
  const auto state = nlohmann::json::parse(slurp(dir_ / "lost" / "checkpoint" / "state.json"));
  const int64_t step = state["step"].get<int64_t>();
  ASSERT_GT(step, 0);
  EXPECT_EQ(state["files"].size(), 2u) << "one file per stage";
  const RunResult r = mpi(2, "train -q " + cfg() + " --set pipeline.engine=mpi --resume --set train.eval_every=0 "
                             "--set train.steps=" + std::to_string(step + 4) + " --set out.dir=" + (dir_ / "lost").string());
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("done: " + std::to_string(step + 4) + " steps"));
}

// Two network namespaces joined by a veth pair stand in for two machines: rank 1 is launched in
// the second namespace through Open MPI's rsh launcher (the "ssh" is `ip netns exec`), and the
// stage traffic goes over TCP through the veth pair, a real network stack. Skipped where this
// machine does not let us create namespaces.
class Namespaces {
 public:
  explicit Namespaces(const std::string& tag) : a_("pn" + tag + "a"), b_("pn" + tag + "b") {
    ok_ = sh("ip netns add " + a_) && sh("ip netns add " + b_) &&
          sh("ip link add v" + a_ + " type veth peer name v" + b_) && sh("ip link set v" + a_ + " netns " + a_) &&
          sh("ip link set v" + b_ + " netns " + b_) && sh("ip -n " + a_ + " addr add 10.213.0.1/24 dev v" + a_) &&
          sh("ip -n " + b_ + " addr add 10.213.0.2/24 dev v" + b_) && sh("ip -n " + a_ + " link set v" + a_ + " up") &&
          sh("ip -n " + b_ + " link set v" + b_ + " up") && sh("ip -n " + a_ + " link set lo up") &&
          sh("ip -n " + b_ + " link set lo up");
  }
  ~Namespaces() {
    sh("ip netns del " + a_);
    sh("ip netns del " + b_);
  }
  bool ok() const { return ok_; }
  const std::string& a() const { return a_; }
  const std::string& b() const { return b_; }
  // Bytes the first namespace's end of the pair has sent.
  long long tx_bytes() const {
    const std::string cmd = "ip netns exec " + a_ + " cat /sys/class/net/v" + a_ + "/statistics/tx_bytes";
    std::FILE* p = ::popen(cmd.c_str(), "r");
    if (!p) return -1;
    long long n = -1;
    if (std::fscanf(p, "%lld", &n) != 1) n = -1;
    ::pclose(p);
    return n;
  }

 private:
  static bool sh(const std::string& cmd) { return std::system((cmd + " >/dev/null 2>&1").c_str()) == 0; }
  std::string a_, b_;
  bool ok_ = false;
};

TEST_F(Mpi, RanksInTwoNetworkNamespacesOverAVethPair) {
  Namespaces ns(std::to_string(::getpid() % 100000));
  if (!ns.ok()) GTEST_SKIP() << "cannot create network namespaces here (needs CAP_NET_ADMIN)";
  spit(dir_ / "agent.sh", "#!/bin/sh\nhost=$1; shift\nexec ip netns exec \"$host\" sh -c \"$*\"\n");
  fs::permissions(dir_ / "agent.sh", fs::perms::owner_all);
  spit(dir_ / "hosts", "localhost slots=1\n" + ns.b() + " slots=1\n");
  const std::string t = (dir_ / "t").string(), m = (dir_ / "m").string();
  ASSERT_EQ(run("train -q " + cfg() + " --set pipeline.engine=threads --set out.dir=" + t).code, 0);
  const long long before = ns.tx_bytes();
  const RunResult r = run_command(
      "ip netns exec " + ns.a() + " " + PIPENAG_MPIEXEC + " --allow-run-as-root --hostfile " + (dir_ / "hosts").string() +
          " --map-by node --mca plm_rsh_agent " + (dir_ / "agent.sh").string() +
          " --mca btl tcp,self --mca btl_tcp_if_include 10.213.0.0/24 --mca oob_tcp_if_include 10.213.0.0/24 -np 2 " +
          PIPENAG_BINARY + " train -q " + cfg() + " --set pipeline.engine=mpi --set out.dir=" + m,
      dir_);
  ASSERT_EQ(r.code, 0) << r.err << r.out;
  expect_same_tensors(fs::path(t) / "checkpoint", fs::path(m) / "checkpoint");
  // 12 activations of 4 x 32 x 32 floats went one way, at least.
  EXPECT_GT(ns.tx_bytes() - before, 12LL * 4 * 32 * 32 * 4) << "the stage traffic did not cross the veth pair";
}

}  // namespace
