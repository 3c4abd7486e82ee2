// MPI for the mpi engine: one rank per pipeline stage. Everything here is non-blocking underneath
// and waits with a timeout (pipeline.peer_timeout_s), so a lost or stalled rank makes the others
// fail with a message instead of hanging. Built against any MPI (Open MPI, MPICH) when CMake finds
// one; without it every entry point says the build has no MPI.
//
// Communicators (duplicates of MPI_COMM_WORLD, so that traffic of one kind never matches a
// receive of another):
//   data     activations (stage k -> k+1) and their gradients (k+1 -> k), window markers and stop
//            requests, between neighbours only; receives are posted ahead into pooled buffers and
//            taken strictly in the order they were posted, so what a neighbour sent arrives in
//            the order it was sent (MPI's non-overtaking rule);
//   report   the last stage's per-update report (loss, learning rate, ...) to rank 0;
//   aux      collectives (checks at start-up, checkpoints, statistics) and evaluation traffic.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "util/error.h"

namespace pipenag::mpi {

// An error every rank raised with the same text after agreeing on it: each rank can exit on its
// own (MPI_Finalize) instead of aborting the job.
struct AgreedError : Error {
  using Error::Error;
};

bool built_with_mpi();
// The process was started by an MPI launcher (mpirun, mpiexec, srun with PMI/PMIx).
bool launched_by_mpi();
// The number of ranks the launcher says it started (its environment; 1 when it says nothing).
int launcher_size();
// Initialises MPI once (Error when the build has none or the launcher did not start us).
void init();
bool initialized();
int rank();
int size();
int local_size();  // ranks on this machine (sharing its cores)
std::string implementation();  // "Open MPI 4.1.4", "MPICH 4.0.2", ...
// The end of a successful or agreed-failed run; abort() for every other failure.
void finalize();
[[noreturn]] void abort(int code);

// ---- collectives on the aux communicator, each bounded by `timeout_s` ----
void barrier(double timeout_s, const std::string& what);
std::vector<std::string> allgather(const std::string& mine, double timeout_s, const std::string& what);
std::string broadcast(const std::string& s, int root, double timeout_s, const std::string& what);
std::vector<double> allgather(const std::vector<double>& mine, double timeout_s, const std::string& what);
// Runs f on this rank; when f throws on any rank, every rank throws AgreedError with the first
// failing rank's message ("rank 2: ..."). f must not itself communicate.
void agree(const std::function<void()>& f, double timeout_s, const std::string& what);

// ---- point-to-point on the aux communicator (evaluation) ----
void send(int to, int tag, const void* data, size_t bytes, double timeout_s);
void recv(int from, int tag, void* data, size_t bytes, double timeout_s);

// One stage's links to its neighbours (data communicator) and, on rank 0 and the last rank, the
// report channel.
class Links {
 public:
  enum class Kind { Data, Marker, Stop };
  struct Event {
    Kind kind = Kind::Data;
    int from = 0;                 // neighbour rank
    int64_t value = 0;            // Data: micro-batch id; Stop: the version to stop after
    std::vector<float> data;      // Data
  };
  // `floats`: the size of an activation (equal at every boundary).
  Links(size_t floats, int report_doubles);
  ~Links();
  Links(const Links&) = delete;
  Links& operator=(const Links&) = delete;

  void send_data(int to, int64_t mb, const float* data);
  void send_marker(int to);
  void send_stop(int to, int64_t version);
  // Last stage: one update's report to rank 0.
  void send_report(const std::vector<double>& values);
  // Completes what can complete without waiting; appends arrived events (in the order each
  // neighbour sent them) and reports (rank 0). Waits up to `wait_s` when nothing arrived.
  // Returns whether anything arrived.
  bool poll(std::vector<Event>& events, std::vector<std::vector<double>>& reports, double wait_s);
  // A buffer of a Data event, back to the pool.
  void give_back(std::vector<float>&& buf);
  // Waits until every send has completed (Error after timeout_s, naming the peer).
  void flush(double timeout_s);

 private:
  struct Impl;
  Impl* impl_;
};

}  // namespace pipenag::mpi
