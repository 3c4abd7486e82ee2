#include "comm/mpi.h"

#include <algorithm>
#include <climits>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>

#ifdef PIPENAG_WITH_MPI
#include <mpi.h>
#endif

namespace pipenag::mpi {

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "PMI_FD", "MPI_LOCALNRANKS"})
    if (std::getenv(v)) return true;
  return false;
}

int launcher_size() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"})
    if (const char* s = std::getenv(v)) {
      const int n = std::atoi(s);
      if (n > 0) return n;
    }
  return 1;
}

#ifndef PIPENAG_WITH_MPI

namespace {
[[noreturn]] void no_mpi() {
  throw Error("pipeline.engine = \"mpi\": this build has no MPI (install libopenmpi-dev or libmpich-dev and "
              "rebuild; scripts/setup does)");
}
}  // namespace

bool built_with_mpi() { return false; }
void init() { no_mpi(); }
bool initialized() { return false; }
int rank() { return 0; }
int size() { return 1; }
int local_size() { return 1; }
std::string implementation() { return "none"; }
void finalize() {}
void abort(int code) { std::_Exit(code); }
void barrier(double, const std::string&) { no_mpi(); }
std::vector<std::string> allgather(const std::string&, double, const std::string&) { no_mpi(); }
std::string broadcast(const std::string&, int, double, const std::string&) { no_mpi(); }
std::vector<double> allgather(const std::vector<double>&, double, const std::string&) { no_mpi(); }
void agree(const std::function<void()>&, double, const std::string&) { no_mpi(); }
void send(int, int, const void*, size_t, double) { no_mpi(); }
void recv(int, int, void*, size_t, double) { no_mpi(); }
struct Links::Impl {};
Links::Links(size_t, int) : impl_(nullptr) { no_mpi(); }
Links::~Links() = default;
void Links::send_data(int, int64_t, const float*) { no_mpi(); }
void Links::send_marker(int) { no_mpi(); }
void Links::send_stop(int, int64_t) { no_mpi(); }
void Links::send_report(const std::vector<double>&) { no_mpi(); }
bool Links::poll(std::vector<Event>&, std::vector<std::vector<double>>&, double) { no_mpi(); }
void Links::give_back(std::vector<float>&&) {}
void Links::flush(double) { no_mpi(); }

#else

namespace {

using Clock = std::chrono::steady_clock;

bool g_init = false;
int g_rank = 0, g_size = 1, g_local = 1;
MPI_Comm g_data = MPI_COMM_NULL, g_report = MPI_COMM_NULL, g_aux = MPI_COMM_NULL;

void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw Error(std::string("MPI: ") + what + " failed: " + std::string(msg, static_cast<size_t>(len)));
}

// Waits for a request with a sleeping back-off (a waiting rank must not take a core from the
// ranks that compute on the same machine); Error after timeout_s.
void wait_for(MPI_Request& req, double timeout_s, const std::string& what) {
  const auto t0 = Clock::now();
  int us = 20;
  for (;;) {
    int done = 0;
    check(MPI_Test(&req, &done, MPI_STATUS_IGNORE), what.c_str());
    if (done) return;
    if (std::chrono::duration<double>(Clock::now() - t0).count() > timeout_s) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%g", timeout_s);
      throw Error("rank " + std::to_string(g_rank) + ": " + what + ": no answer within " + buf +
                  " s (pipeline.peer_timeout_s): a rank was lost or stalled");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(us));
    us = std::min(us * 2, 1000);
  }
}

}  // namespace

bool built_with_mpi() { return true; }

void init() {
  if (g_init) return;
  if (!launched_by_mpi())
    throw Error("pipeline.engine = \"mpi\" needs an MPI launcher: run `mpirun -np <pipeline.stages> pipenag train ...` "
                "(as root add --allow-run-as-root, and --oversubscribe for more ranks than cores)");
  int provided = 0;
  check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
  g_init = true;
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  check(MPI_Comm_rank(MPI_COMM_WORLD, &g_rank), "MPI_Comm_rank");
  check(MPI_Comm_size(MPI_COMM_WORLD, &g_size), "MPI_Comm_size");
  for (MPI_Comm* c : {&g_data, &g_report, &g_aux}) {
    check(MPI_Comm_dup(MPI_COMM_WORLD, c), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(*c, MPI_ERRORS_RETURN);
  }
  MPI_Comm node;
  check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_rank, MPI_INFO_NULL, &node), "MPI_Comm_split_type");
  check(MPI_Comm_size(node, &g_local), "MPI_Comm_size");
  MPI_Comm_free(&node);
}

bool initialized() { return g_init; }
int rank() { return g_rank; }
int size() { return g_size; }
int local_size() { return g_local; }

std::string implementation() {
  char v[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(v, &len);
  std::string s(v, static_cast<size_t>(len));
  const auto nl = s.find_first_of("\n,");
  return nl == std::string::npos ? s : s.substr(0, nl);
}

void finalize() {
  if (!g_init) return;
  for (MPI_Comm* c : {&g_data, &g_report, &g_aux})
    if (*c != MPI_COMM_NULL) MPI_Comm_free(c);
  MPI_Finalize();
  g_init = false;
}

void abort(int code) {
  if (g_init) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

void barrier(double timeout_s, const std::string& what) {
  MPI_Request r;
  check(MPI_Ibarrier(g_aux, &r), "MPI_Ibarrier");
  wait_for(r, timeout_s, what);
}

std::vector<std::string> allgather(const std::string& mine, double timeout_s, const std::string& what) {
  if (mine.size() > static_cast<size_t>(INT_MAX) / static_cast<size_t>(g_size))
    throw Error(what + ": " + std::to_string(mine.size()) + " bytes from one rank, more than MPI gathers at once");
  int len = static_cast<int>(mine.size());
  std::vector<int> lens(static_cast<size_t>(g_size));
  MPI_Request r;
  check(MPI_Iallgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, g_aux, &r), "MPI_Iallgather");
  wait_for(r, timeout_s, what);
  std::vector<int> offs(static_cast<size_t>(g_size), 0);
  int64_t total = 0;
  for (int i = 0; i < g_size; ++i) {
    offs[static_cast<size_t>(i)] = static_cast<int>(total);
    total += lens[static_cast<size_t>(i)];
    if (total > INT_MAX) throw Error(what + ": more than 2 GiB gathered from all ranks at once");
  }
  std::string all(static_cast<size_t>(total), '\0');
  check(MPI_Iallgatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), offs.data(), MPI_CHAR, g_aux, &r),
        "MPI_Iallgatherv");
  wait_for(r, timeout_s, what);
  std::vector<std::string> out;
  for (int i = 0; i < g_size; ++i)
    out.push_back(all.substr(static_cast<size_t>(offs[static_cast<size_t>(i)]),
                             static_cast<size_t>(lens[static_cast<size_t>(i)])));
  return out;
}

std::string broadcast(const std::string& s, int root, double timeout_s, const std::string& what) {
  if (s.size() > static_cast<size_t>(INT_MAX)) throw Error(what + ": more than 2 GiB to broadcast");
  int64_t len = static_cast<int64_t>(s.size());
  MPI_Request r;
  check(MPI_Ibcast(&len, 1, MPI_INT64_T, root, g_aux, &r), "MPI_Ibcast");
  wait_for(r, timeout_s, what);
  std::string out = g_rank == root ? s : std::string(static_cast<size_t>(len), '\0');
  check(MPI_Ibcast(out.data(), static_cast<int>(len), MPI_CHAR, root, g_aux, &r), "MPI_Ibcast");
  wait_for(r, timeout_s, what);
  return out;
}

std::vector<double> allgather(const std::vector<double>& mine, double timeout_s, const std::string& what) {
  std::vector<double> out(mine.size() * static_cast<size_t>(g_size));
  MPI_Request r;
  check(MPI_Iallgather(mine.data(), static_cast<int>(mine.size()), MPI_DOUBLE, out.data(),
                       static_cast<int>(mine.size()), MPI_DOUBLE, g_aux, &r),
        "MPI_Iallgather");
  wait_for(r, timeout_s, what);
  return out;
}

void agree(const std::function<void()>& f, double timeout_s, const std::string& what) {
  std::string err;
  try {
    f();
  } catch (const std::exception& e) {
    err = e.what();
    if (err.empty()) err = "failed";
  }
  const auto all = allgather(err, timeout_s, what);
  for (int i = 0; i < g_size; ++i) {
    const std::string& e = all[static_cast<size_t>(i)];
    if (e.empty()) continue;
    // An error already naming a rank keeps its text.
    throw AgreedError(e.rfind("rank ", 0) == 0 ? e : "rank " + std::to_string(i) + ": " + e);
  }
}

void send(int to, int tag, const void* data, size_t bytes, double timeout_s) {
  if (bytes > static_cast<size_t>(INT_MAX)) throw Error("MPI: a message of " + std::to_string(bytes) + " bytes (at most 2 GiB)");
  MPI_Request r;
  check(MPI_Isend(data, static_cast<int>(bytes), MPI_BYTE, to, tag, g_aux, &r), "MPI_Isend");
  wait_for(r, timeout_s, "sending to rank " + std::to_string(to));
}

void recv(int from, int tag, void* data, size_t bytes, double timeout_s) {
  if (bytes > static_cast<size_t>(INT_MAX)) throw Error("MPI: a message of " + std::to_string(bytes) + " bytes (at most 2 GiB)");
  MPI_Request r;
  check(MPI_Irecv(data, static_cast<int>(bytes), MPI_BYTE, from, tag, g_aux, &r), "MPI_Irecv");
  wait_for(r, timeout_s, "waiting for rank " + std::to_string(from));
}

// ---------------------------------------------------------------------------------------------

namespace {
constexpr int kTagMarker = 1, kTagStop = 2, kTagData = 16, kTagMod = 16384;  // tags <= 32767 anywhere
constexpr int kPosted = 4;  // receives posted ahead per neighbour
constexpr size_t kHeader = 2 * sizeof(int64_t);
}  // namespace

struct Links::Impl {
  size_t floats = 0, bytes = 0;
  int report_doubles = 0;
  struct Ring {
    int from = 0;
    std::vector<std::vector<char>> bufs;
    std::vector<MPI_Request> reqs;
    size_t head = 0;
  };
  std::vector<Ring> rings;  // one per neighbour
  Ring reports;             // rank 0: from the last rank
  bool has_reports = false;
  struct Pending {
    MPI_Request req;
    std::vector<char> buf;
    int to;
  };
  std::deque<Pending> sends;
  std::vector<std::vector<char>> send_pool;
  std::vector<std::vector<float>> float_pool;

  void post(Ring& r, size_t i, MPI_Comm comm, int count, MPI_Datatype type) {
    check(MPI_Irecv(r.bufs[i].data(), count, type, r.from, MPI_ANY_TAG, comm, &r.reqs[i]), "MPI_Irecv");
  }

  // `count` elements of `type` from buf (bytes for everything but the reports).
  void isend(int to, int tag, std::vector<char>&& buf, size_t count, MPI_Comm comm, MPI_Datatype type = MPI_BYTE) {
    sends.push_back({MPI_REQUEST_NULL, std::move(buf), to});
    Pending& p = sends.back();
    check(MPI_Isend(p.buf.data(), static_cast<int>(count), type, to, tag, comm, &p.req), "MPI_Isend");
  }

  std::vector<char> send_buffer(size_t n) {
    std::vector<char> b;
    if (!send_pool.empty()) {
      b = std::move(send_pool.back());
      send_pool.pop_back();
    }
    b.resize(n);
    return b;
  }

  bool progress_sends() {
    bool any = false;
    while (!sends.empty()) {
      int done = 0;
      check(MPI_Test(&sends.front().req, &done, MPI_STATUS_IGNORE), "MPI_Test");
      if (!done) break;
      send_pool.push_back(std::move(sends.front().buf));
      sends.pop_front();
      any = true;
    }
    return any;
  }
};

Links::Links(size_t floats, int report_doubles) : impl_(new Impl) {
  Impl& m = *impl_;
  m.floats = floats;
  m.bytes = kHeader + floats * sizeof(float);
  if (m.bytes > static_cast<size_t>(INT_MAX)) {
    delete impl_;
    throw Error("mpi engine: an activation of " + std::to_string(floats * sizeof(float)) +
                " bytes is more than one MPI message carries here (2 GiB); lower train.batch_size");
  }
  m.report_doubles = report_doubles;
  for (int nb : {g_rank - 1, g_rank + 1}) {
    if (nb < 0 || nb >= g_size) continue;
    Impl::Ring r;
    r.from = nb;
    r.bufs.assign(kPosted, std::vector<char>(m.bytes));
    r.reqs.assign(kPosted, MPI_REQUEST_NULL);
    m.rings.push_back(std::move(r));
  }
  for (auto& r : m.rings)
    for (size_t i = 0; i < kPosted; ++i) m.post(r, i, g_data, static_cast<int>(m.bytes), MPI_BYTE);
  if (g_rank == 0 && g_size > 1) {
    m.has_reports = true;
    m.reports.from = g_size - 1;
    m.reports.bufs.assign(kPosted, std::vector<char>(sizeof(double) * static_cast<size_t>(report_doubles)));
    m.reports.reqs.assign(kPosted, MPI_REQUEST_NULL);
    for (size_t i = 0; i < kPosted; ++i) m.post(m.reports, i, g_report, report_doubles, MPI_DOUBLE);
  }
}

Links::~Links() {
  // Receives still posted are cancelled and completed before their buffers go. Sends still
  // pending (only after a failure; a window ends with every send done) may still read their
  // buffers: those are kept until the process ends.
  static std::vector<std::vector<char>> kept;
  auto cancel = [](Impl::Ring& r) {
    for (size_t i = 0; i < r.reqs.size(); ++i) {
      MPI_Request& q = r.reqs[i];
      if (q == MPI_REQUEST_NULL) continue;
      MPI_Cancel(&q);
      // A receive already matched to a message from a failed peer may never complete: give it
      // a moment, then leave it (and its buffer) to the process's end.
      int done = 0;
      for (int t = 0; t < 100 && !done; ++t) {
        MPI_Test(&q, &done, MPI_STATUS_IGNORE);
        if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      if (!done) {
        MPI_Request_free(&q);
        kept.push_back(std::move(r.bufs[i]));
      }
    }
  };
  for (auto& r : impl_->rings) cancel(r);
  if (impl_->has_reports) cancel(impl_->reports);
  for (auto& p : impl_->sends)
    if (p.req != MPI_REQUEST_NULL) {
      MPI_Request_free(&p.req);
      kept.push_back(std::move(p.buf));
    }
  delete impl_;
}

void Links::send_data(int to, int64_t mb, const float* data) {
  Impl& m = *impl_;
  std::vector<char> b = m.send_buffer(m.bytes);
  const int64_t hdr[2] = {0, mb};
  std::memcpy(b.data(), hdr, kHeader);
  std::memcpy(b.data() + kHeader, data, m.floats * sizeof(float));
  m.isend(to, kTagData + static_cast<int>(mb % kTagMod), std::move(b), m.bytes, g_data);
}

void Links::send_marker(int to) {
  std::vector<char> b = impl_->send_buffer(kHeader);
  const int64_t hdr[2] = {1, 0};
  std::memcpy(b.data(), hdr, kHeader);
  impl_->isend(to, kTagMarker, std::move(b), kHeader, g_data);
}

void Links::send_stop(int to, int64_t version) {
  std::vector<char> b = impl_->send_buffer(kHeader);
  const int64_t hdr[2] = {2, version};
  std::memcpy(b.data(), hdr, kHeader);
  impl_->isend(to, kTagStop, std::move(b), kHeader, g_data);
}

void Links::send_report(const std::vector<double>& values) {
  if (g_size == 1) return;
  std::vector<char> b = impl_->send_buffer(values.size() * sizeof(double));
  std::memcpy(b.data(), values.data(), b.size());
  impl_->isend(0, 0, std::move(b), values.size(), g_report, MPI_DOUBLE);
}

void Links::give_back(std::vector<float>&& buf) { impl_->float_pool.push_back(std::move(buf)); }

bool Links::poll(std::vector<Event>& events, std::vector<std::vector<double>>& reports, double wait_s) {
  Impl& m = *impl_;
  const auto t0 = Clock::now();
  int us = 10;
  for (;;) {
    bool any = m.progress_sends();
    bool arrived = false;
    for (auto& r : m.rings) {
      for (;;) {
        int done = 0;
        check(MPI_Test(&r.reqs[r.head], &done, MPI_STATUS_IGNORE), "MPI_Test");
        if (!done) break;
        const std::vector<char>& b = r.bufs[r.head];
        int64_t hdr[2];
        std::memcpy(hdr, b.data(), kHeader);
        Event e;
        e.from = r.from;
        e.value = hdr[1];
        e.kind = hdr[0] == 0 ? Kind::Data : hdr[0] == 1 ? Kind::Marker : Kind::Stop;
        if (e.kind == Kind::Data) {
          if (!m.float_pool.empty()) {
            e.data = std::move(m.float_pool.back());
            m.float_pool.pop_back();
          }
          e.data.resize(m.floats);
          std::memcpy(e.data.data(), b.data() + kHeader, m.floats * sizeof(float));
        }
        events.push_back(std::move(e));
        m.post(r, r.head, g_data, static_cast<int>(m.bytes), MPI_BYTE);
        r.head = (r.head + 1) % kPosted;
        arrived = true;
      }
    }
    if (m.has_reports) {
      Impl::Ring& r = m.reports;
      for (;;) {
        int done = 0;
        check(MPI_Test(&r.reqs[r.head], &done, MPI_STATUS_IGNORE), "MPI_Test");
        if (!done) break;
        std::vector<double> v(static_cast<size_t>(m.report_doubles));
        std::memcpy(v.data(), r.bufs[r.head].data(), v.size() * sizeof(double));
        reports.push_back(std::move(v));
        m.post(r, r.head, g_report, m.report_doubles, MPI_DOUBLE);
        r.head = (r.head + 1) % kPosted;
        arrived = true;
      }
    }
    any |= arrived;
    if (arrived || std::chrono::duration<double>(Clock::now() - t0).count() >= wait_s) return any;
    std::this_thread::sleep_for(std::chrono::microseconds(us));
    us = std::min(us * 2, 200);
  }
}

void Links::flush(double timeout_s) {
  const auto t0 = Clock::now();
  int us = 10;
  while (!impl_->sends.empty()) {
    impl_->progress_sends();
    if (impl_->sends.empty()) break;
    if (std::chrono::duration<double>(Clock::now() - t0).count() > timeout_s)
      throw Error("rank " + std::to_string(g_rank) + ": rank " + std::to_string(impl_->sends.front().to) +
                  " took nothing for " + std::to_string(static_cast<int>(timeout_s)) +
                  " s (pipeline.peer_timeout_s): it was lost or stalled");
    std::this_thread::sleep_for(std::chrono::microseconds(us));
    us = std::min(us * 2, 1000);
  }
}

#endif

}  // namespace pipenag::mpi
