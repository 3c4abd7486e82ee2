// MPI point-to-point between two ranks, as the mpi engine uses it (MPI_Isend / MPI_Irecv of
// bytes, then waiting): round-trip latency of a small message and of one activation, and the
// achieved bandwidth. Run under mpirun with 2 ranks (bench/mpi_bench.sh does).
//
//   mpirun -np 2 build/mpi_loopback [--bytes N] [--rounds R]
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

// Mean seconds per round trip of `bytes` between rank 0 and rank 1.
double ping_pong(size_t bytes, int rounds, int rank) {
  std::vector<char> buf(bytes, 1);
  const int peer = 1 - rank;
  MPI_Barrier(MPI_COMM_WORLD);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < rounds; ++i) {
    MPI_Request r;
    if (rank == 0) {
      MPI_Isend(buf.data(), static_cast<int>(bytes), MPI_BYTE, peer, 16, MPI_COMM_WORLD, &r);
      MPI_Wait(&r, MPI_STATUS_IGNORE);
      MPI_Irecv(buf.data(), static_cast<int>(bytes), MPI_BYTE, peer, 16, MPI_COMM_WORLD, &r);
      MPI_Wait(&r, MPI_STATUS_IGNORE);
    } else {
      MPI_Irecv(buf.data(), static_cast<int>(bytes), MPI_BYTE, peer, 16, MPI_COMM_WORLD, &r);
      MPI_Wait(&r, MPI_STATUS_IGNORE);
      MPI_Isend(buf.data(), static_cast<int>(bytes), MPI_BYTE, peer, 16, MPI_COMM_WORLD, &r);
      MPI_Wait(&r, MPI_STATUS_IGNORE);
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / rounds;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  size_t bytes = size_t{16} * 128 * 256 * 4;  // the default model's activation: B x T x C floats
  int rounds = 200;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--bytes") == 0) bytes = std::strtoull(argv[i + 1], nullptr, 10);
    else if (std::strcmp(argv[i], "--rounds") == 0) rounds = std::atoi(argv[i + 1]);
  }
  if (size != 2 || bytes == 0 || rounds < 1) {
    if (rank == 0) std::fprintf(stderr, "mpi_loopback: run with mpirun -np 2, --bytes >= 1, --rounds >= 1\n");
    MPI_Finalize();
    return 1;
  }
  ping_pong(bytes, 5, rank);  // warm-up (connections, registration)
  const double small = ping_pong(8, rounds * 10, rank);
  const double big = ping_pong(bytes, rounds, rank);
  if (rank == 0) {
    char v[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(v, &len);
    std::string lib(v, static_cast<size_t>(len));
    lib = lib.substr(0, lib.find_first_of(",\n"));
    std::printf("| MPI | message | one-way latency | achieved bandwidth |\n|---|---:|---:|---:|\n");
    std::printf("| %s | 8 B | %.2f us | - |\n", lib.c_str(), small / 2 * 1e6);
    std::printf("| %s | %.2f MiB (one activation) | %.3f ms | %.2f GB/s |\n", lib.c_str(),
                static_cast<double>(bytes) / (1 << 20), big / 2 * 1e3, static_cast<double>(bytes) / (big / 2) / 1e9);
  }
  MPI_Finalize();
  return 0;
}
