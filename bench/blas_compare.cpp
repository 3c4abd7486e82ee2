// blas_compare: times single-precision GEMM (and bf16 GEMM with fp32 accumulation) at the shapes
// of pipenag's workload, for one BLAS backend chosen at compile time. See docs/BLAS.md for results.
//
// Workload: M = 2048 rows (batch 8 x context 256), C = 384. For (K,N) in {(384,1152) qkv,
// (384,384) attn-proj, (384,1536) fc, (1536,384) fc-proj, (384,65) head, (384,50304) head}:
//   fwd   out[M,N]  = inp[M,K] @ W[N,K]^T          (NoTrans, Trans)
//   dinp  dinp[M,K] = dout[M,N] @ W[N,K]           (NoTrans, NoTrans)
//   dW    dW[N,K]  += dout[M,N]^T @ inp[M,K]       (Trans, NoTrans), beta = 1
// plus attention products per (batch, head), 1 thread, q/k/v read from the qkv buffer (ld 1152):
//   attNT att[256,256] = q[256,64] @ k[256,64]^T   (fwd scores; bwd datt = dy @ v^T)
//   attNN y[256,64]    = att[256,256] @ v[256,64]  (fwd; bwd dq = datt @ k)
//   attTN dv[256,64]   = att^T @ dy[256,64]        (bwd dv, dk)
//
/* Build (one binary per backend; g++ 12, Debian 12). All link the exact library by path + rpath so
   Debian's libblas/libopenblas alternatives cannot change which library runs:

     OpenBLAS, OpenMP build:
       g++ -std=c++20 -O2 -march=native -fopenmp -DBACKEND_OPENBLAS -Wall -Wextra -Wpedantic -Wshadow \
         -isystem /usr/include/x86_64-linux-gnu/openblas-pthread bench/blas_compare.cpp \
         /usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0 \
         -Wl,-rpath,/usr/lib/x86_64-linux-gnu/openblas-openmp -ldl -o build/blas_openblas_omp
     OpenBLAS, pthread build:
       g++ -std=c++20 -O2 -march=native -fopenmp -DBACKEND_OPENBLAS -Wall -Wextra -Wpedantic -Wshadow \
         -isystem /usr/include/x86_64-linux-gnu/openblas-pthread bench/blas_compare.cpp \
         /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
         -Wl,-rpath,/usr/lib/x86_64-linux-gnu/openblas-pthread -ldl -o build/blas_openblas_pthread
     BLIS 0.9.0, OpenMP build:
       g++ -std=c++20 -O2 -march=native -fopenmp -DBACKEND_BLIS -Wall -Wextra -Wpedantic -Wshadow \
         -isystem /usr/include/x86_64-linux-gnu/blis-openmp bench/blas_compare.cpp \
         /usr/lib/x86_64-linux-gnu/blis-openmp/libblis.so.4 \
         -Wl,-rpath,/usr/lib/x86_64-linux-gnu/blis-openmp -o build/blas_blis
     oneDNN 2.6 (dnnl_sgemm for fp32; matmul primitive for bf16):
       g++ -std=c++20 -O2 -march=native -fopenmp -DBACKEND_DNNL -Wall -Wextra -Wpedantic -Wshadow \
         bench/blas_compare.cpp -ldnnl -o build/blas_dnnl
     (The OpenBLAS header is the same for both builds; the pthread-dev package is the one installed.)
*/
//
// Run:  build/blas_X [--threads 1,2] [--rounds R] [--no-linear] [--no-attn] [--bf16] [--amx]
//                    [--thread-control] [--determinism] [--only NAME]
//   --bf16          (oneDNN only) also time matmul bf16 x bf16 -> f32, with fp32->bf16 conversion
//   --amx           (oneDNN only) dnnl::set_max_cpu_isa(avx512_core_amx) before anything else
//   --thread-control  experiment: is the thread count a per-calling-thread setting?
//   --determinism   are fp32 results bit-identical with 1 and 2 threads?
// Each timed line: median of per-call wall times (>= 0.25 s or >= 3 calls per point, after a
// warm-up call). Lines starting with "CSV," are for aggregating many runs.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(BACKEND_OPENBLAS)
#include <cblas.h>
#include <dlfcn.h>
static const char* const kBackend = "openblas";
#elif defined(BACKEND_BLIS)
#include <blis.h>
static const char* const kBackend = "blis";
#elif defined(BACKEND_DNNL)
#include <immintrin.h>

#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl.hpp>
static const char* const kBackend = "onednn";
#elif defined(BACKEND_PIPENAG)
#include "kernels/kernels.h"
static const char* const kBackend = "pipenag";
#else
#error "define one of BACKEND_OPENBLAS, BACKEND_BLIS, BACKEND_DNNL, BACKEND_PIPENAG"
#endif

namespace {

using Clock = std::chrono::steady_clock;

double now_s() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }

// ---- backend glue ----------------------------------------------------------------------------

#if defined(BACKEND_BLIS)
// BLIS 0.9's bli_thread_set_num_threads() is process-global, so the per-thread method is the
// expert API with a caller-owned rntm_t; > 0 here routes this thread's calls through it.
thread_local int tl_blis_threads = 0;
#endif

// Row-major C[M,N] = op(A) op(B) + beta C.
void sgemm(bool ta, bool tb, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
           float beta, float* C, int ldc) {
#if defined(BACKEND_BLIS)
  if (tl_blis_threads > 0) {
    rntm_t rntm;
    bli_rntm_init(&rntm);
    bli_rntm_set_num_threads(tl_blis_threads, &rntm);
    float alpha = 1.0f;
    // row-major: element (i,j) of an [r,c] matrix with leading dim ld is at i*ld + j
    bli_sgemm_ex(ta ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, tb ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, M, N,
                 K, &alpha, const_cast<float*>(A), lda, 1, const_cast<float*>(B), ldb, 1, &beta, C, ldc,
                 1, nullptr, &rntm);
    return;
  }
#endif
#if defined(BACKEND_OPENBLAS) || defined(BACKEND_BLIS)
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K,
              1.0f, A, lda, B, ldb, beta, C, ldc);
#elif defined(BACKEND_PIPENAG)
  pipenag::kernels::sgemm<float>(ta, tb, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
#else
  dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
#endif
}

// The process-wide ("global") way of setting the thread count that a user would reach for first.
void set_threads_global(int n) {
#if defined(BACKEND_OPENBLAS)
  openblas_set_num_threads(n);
  omp_set_num_threads(n);
#elif defined(BACKEND_BLIS)
  bli_thread_set_num_threads(n);
#else
  omp_set_num_threads(n);
#endif
}

// The candidate per-calling-thread setting, tested by --thread-control.
const char* local_method_name() {
#if defined(BACKEND_OPENBLAS)
  return "openblas_set_num_threads(n) (+ omp_set_num_threads(n)) in the calling thread";
#elif defined(BACKEND_BLIS)
  return "bli_sgemm_ex() with a caller-owned rntm_t (bli_rntm_set_num_threads(n, &rntm))";
#else
  return "omp_set_num_threads(n) in the calling thread";
#endif
}
void set_threads_local(int n) {
#if defined(BACKEND_BLIS)
  tl_blis_threads = n;
#else
  set_threads_global(n);
#endif
}

std::string backend_info() {
  std::string s = kBackend;
#if defined(BACKEND_OPENBLAS)
  s += std::string(" config=\"") + openblas_get_config() + "\" core=" + openblas_get_corename();
  s += std::string(" parallel=") + std::to_string(openblas_get_parallel()) + " (0 seq,1 pthread,2 openmp)";
  void* h = dlopen(nullptr, RTLD_NOW);
  s += std::string(" cblas_sbgemm=") + (h && dlsym(h, "cblas_sbgemm") ? "exported" : "NOT exported");
#elif defined(BACKEND_PIPENAG)
  s += std::string(" isa=") + pipenag::kernels::gemm_isa();
#elif defined(BACKEND_BLIS)
  s += std::string(" version=") + bli_info_get_version_str();
  s += std::string(" arch=") + bli_arch_string(bli_arch_query_id());
  s += std::string(" openmp=") + std::to_string(static_cast<int>(bli_info_get_enable_openmp()));
#else
  const dnnl_version_t* v = dnnl_version();
  s += " version=" + std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
       std::to_string(v->patch);
  s += " cpu_runtime=" + std::to_string(v->cpu_runtime) + " (2=omp)";
  using isa = dnnl::cpu_isa;
  const isa e = dnnl::get_effective_cpu_isa();
  s += std::string(" effective_isa=") +
       (e == isa::avx512_core_amx    ? "avx512_core_amx"
        : e == isa::avx512_core_bf16 ? "avx512_core_bf16"
        : e == isa::avx512_core_vnni ? "avx512_core_vnni"
        : e == isa::avx512_core      ? "avx512_core"
        : e == isa::avx2             ? "avx2"
                                     : "other");
#endif
  return s;
}

// ---- buffers / timing ------------------------------------------------------------------------

struct Buf {
  float* p = nullptr;
  size_t n = 0;
  explicit Buf(size_t count) : n(count) {
    size_t bytes = (count * sizeof(float) + 63) / 64 * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    std::mt19937 rng(static_cast<unsigned>(count));
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    for (size_t i = 0; i < count; ++i) p[i] = d(rng) * 0.1f;
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Median per-call wall time: one warm-up call, then calls until >= min_time s and >= min_reps.
double time_op(const std::function<void()>& fn, double min_time = 0.25, int min_reps = 3,
               int max_reps = 2000) {
  fn();
  std::vector<double> t;
  double start = now_s();
  while (static_cast<int>(t.size()) < max_reps &&
         (static_cast<int>(t.size()) < min_reps || now_s() - start < min_time)) {
    double a = now_s();
    fn();
    t.push_back(now_s() - a);
  }
  return median(t);
}

int count_os_threads() {
  int n = 0;
  if (DIR* d = opendir("/proc/self/task")) {
    while (dirent* e = readdir(d))
      if (e->d_name[0] != '.') ++n;
    closedir(d);
  }
  return n;
}

// Largest |C - ref| / max|ref| over 200 sampled entries; ref(i, j) is a naive double dot product.
double sample_error(const float* C, int ldc, int rows, int cols, const std::function<double(int, int)>& ref) {
  std::mt19937 rng(123);
  double max_err = 0, max_ref = 1e-30;
  for (int s = 0; s < 200; ++s) {
    int i = static_cast<int>(rng() % static_cast<unsigned>(rows));
    int j = static_cast<int>(rng() % static_cast<unsigned>(cols));
    double r = ref(i, j);
    max_ref = std::max(max_ref, std::abs(r));
    max_err = std::max(max_err, std::abs(C[static_cast<size_t>(i) * ldc + j] - r));
  }
  return max_err / max_ref;
}

// Checks one result of each of the three linear products (row-major, W is [N,K]).
void check_linear(const char* kind, const char* name, int M, int N, int K, const float* inp, const float* W,
                  const float* dout, const float* out, const float* dinp, const float* dW, double tol) {
  auto at = [](const float* p, int ld, int i, int j) { return static_cast<double>(p[static_cast<size_t>(i) * ld + j]); };
  double e1 = sample_error(out, N, M, N, [&](int i, int j) {
    double a = 0;
    for (int k = 0; k < K; ++k) a += at(inp, K, i, k) * at(W, K, j, k);
    return a;
  });
  double e2 = sample_error(dinp, K, M, K, [&](int i, int k) {
    double a = 0;
    for (int n = 0; n < N; ++n) a += at(dout, N, i, n) * at(W, K, n, k);
    return a;
  });
  double e3 = sample_error(dW, K, N, K, [&](int n, int k) {
    double a = 0;
    for (int m = 0; m < M; ++m) a += at(dout, N, m, n) * at(inp, K, m, k);
    return a;
  });
  double e = std::max(e1, std::max(e2, e3));
  if (e > tol) {
    std::printf("CHECK FAILED %s %s: rel errors fwd %.2e dinp %.2e dW %.2e\n", kind, name, e1, e2, e3);
    std::exit(1);
  }
}

constexpr int kM = 2048;
struct Shape {
  const char* name;
  int K, N;
};
const Shape kShapes[] = {{"qkv", 384, 1152},  {"attproj", 384, 384}, {"fc", 384, 1536},
                         {"fcproj", 1536, 384}, {"head65", 384, 65},  {"head50304", 384, 50304}};

struct LinTimes {
  double fwd = 0, dinp = 0, dw = 0;
  double sum() const { return fwd + dinp + dw; }
};

void print_row(const char* kind, int threads, const char* op, int M, int N, int K, double sec) {
  double gflops = 2.0 * M * N * K / sec * 1e-9;
  std::printf("  %-6s %-10s M=%-5d N=%-6d K=%-5d %10.3f ms %8.1f GFLOP/s\n", kind, op, M, N, K,
              sec * 1e3, gflops);
  std::printf("CSV,%s,%s,%d,%s,%d,%d,%d,%.6e,%.2f\n", kBackend, kind, threads, op, M, N, K, sec,
              gflops);
}

// ---- fp32 linear ---------------------------------------------------------------------------------

LinTimes time_linear_fp32(const Shape& s, int threads) {
  const int M = kM, K = s.K, N = s.N;
  Buf inp(static_cast<size_t>(M) * K), W(static_cast<size_t>(N) * K), out(static_cast<size_t>(M) * N),
      dinp(static_cast<size_t>(M) * K), dW(static_cast<size_t>(N) * K);
  std::memset(dW.p, 0, dW.n * sizeof(float));
  sgemm(false, true, M, N, K, inp.p, K, W.p, K, 0.0f, out.p, N);
  sgemm(false, false, M, K, N, out.p, N, W.p, K, 0.0f, dinp.p, K);
  sgemm(true, false, N, K, M, out.p, N, inp.p, K, 1.0f, dW.p, K);
  check_linear("fp32", s.name, M, N, K, inp.p, W.p, out.p, out.p, dinp.p, dW.p, 1e-4);
  LinTimes t;
  double flop = 2.0 * M * N * K;
  double min_time = flop > 2e10 ? 0.0 : 0.25;  // the vocab-50304 head: 3 calls is plenty
  t.fwd = time_op([&] { sgemm(false, true, M, N, K, inp.p, K, W.p, K, 0.0f, out.p, N); }, min_time);
  t.dinp = time_op([&] { sgemm(false, false, M, K, N, out.p, N, W.p, K, 0.0f, dinp.p, K); }, min_time);
  t.dw = time_op([&] { sgemm(true, false, N, K, M, out.p, N, inp.p, K, 1.0f, dW.p, K); }, min_time);
  std::string base = s.name;
  print_row("fp32", threads, (base + ".fwd").c_str(), M, N, K, t.fwd);
  print_row("fp32", threads, (base + ".dinp").c_str(), M, K, N, t.dinp);
  print_row("fp32", threads, (base + ".dW").c_str(), N, K, M, t.dw);
  return t;
}

// One training step's worth of linear-layer GEMMs: 6 layers x (qkv, attproj, fc, fcproj) x 3
// products, plus the lm head (3 products) once.
void print_step_totals(const char* kind, int threads, const std::vector<LinTimes>& t) {
  double layers = 6.0 * (t[0].sum() + t[1].sum() + t[2].sum() + t[3].sum());
  double s65 = layers + t[4].sum(), s50k = layers + t[5].sum();
  std::printf("  %s %d-thread step total (linear GEMMs): vocab 65 %.1f ms, vocab 50304 %.1f ms\n", kind,
              threads, s65 * 1e3, s50k * 1e3);
  std::printf("CSV,%s,%s,%d,step65,0,0,0,%.6e,0\n", kBackend, kind, threads, s65);
  std::printf("CSV,%s,%s,%d,step50304,0,0,0,%.6e,0\n", kBackend, kind, threads, s50k);
}

// ---- attention products (1 thread) -------------------------------------------------------------

void time_attention() {
  const int T = 256, hs = 64, ldqkv = 1152, C = 384;
  Buf qkv(static_cast<size_t>(T) * ldqkv), att(static_cast<size_t>(T) * T), y(static_cast<size_t>(T) * C),
      dv(static_cast<size_t>(T) * ldqkv);
  const float* q = qkv.p;
  const float* k = qkv.p + C;
  const float* v = qkv.p + 2 * C;
  double nt = time_op([&] { sgemm(false, true, T, T, hs, q, ldqkv, k, ldqkv, 0.0f, att.p, T); });
  double nn = time_op([&] { sgemm(false, false, T, hs, T, att.p, T, v, ldqkv, 0.0f, y.p, C); });
  double tn = time_op([&] { sgemm(true, false, T, hs, T, att.p, T, y.p, C, 1.0f, dv.p, ldqkv); });
  print_row("fp32", 1, "attNT", T, T, hs, nt);
  print_row("fp32", 1, "attNN", T, hs, T, nn);
  print_row("fp32", 1, "attTN", T, hs, T, tn);
  // Per step: 6 layers x 8 sequences x 6 heads x (2 NT + 2 NN + 2 TN), full (unmasked) products.
  double step = 6.0 * 8 * 6 * 2 * (nt + nn + tn);
  std::printf("  attention GEMMs per step (1 thread, serial): %.1f ms\n", step * 1e3);
  std::printf("CSV,%s,fp32,1,stepattn,0,0,0,%.6e,0\n", kBackend, step);
}

// ---- determinism: same bits with 1 and 2 threads? ------------------------------------------------

#if defined(BACKEND_DNNL)
void determinism_bf16();  // below, next to the bf16 code
#endif

// pipenag's kernels promise results independent of the thread count; a BLAS that splits the K
// (reduction) dimension across threads breaks that. Compares every product bitwise.
void determinism_check() {
  std::printf("determinism (%s): fp32 results with 1 vs 2 threads\n", kBackend);
  for (const Shape& s : kShapes) {
    const int M = kM, K = s.K, N = s.N;
    const size_t nMK = static_cast<size_t>(M) * K, nNK = static_cast<size_t>(N) * K,
                 nMN = static_cast<size_t>(M) * N;
    Buf inp(nMK), W(nNK), dout(nMN);
    Buf o[2] = {Buf(nMN), Buf(nMN)}, di[2] = {Buf(nMK), Buf(nMK)}, dw[2] = {Buf(nNK), Buf(nNK)};
    for (int v = 0; v < 2; ++v) {
      set_threads_global(v + 1);
      std::memset(dw[v].p, 0, nNK * sizeof(float));
      sgemm(false, true, M, N, K, inp.p, K, W.p, K, 0.0f, o[v].p, N);
      sgemm(false, false, M, K, N, dout.p, N, W.p, K, 0.0f, di[v].p, K);
      sgemm(true, false, N, K, M, dout.p, N, inp.p, K, 1.0f, dw[v].p, K);
    }
    auto same = [](const Buf& a, const Buf& b) { return std::memcmp(a.p, b.p, a.n * sizeof(float)) == 0; };
    std::printf("  %-10s fwd %s  dinp %s  dW %s\n", s.name, same(o[0], o[1]) ? "identical" : "DIFFERS",
                same(di[0], di[1]) ? "identical" : "DIFFERS", same(dw[0], dw[1]) ? "identical" : "DIFFERS");
  }
#if defined(BACKEND_DNNL)
  determinism_bf16();
#endif
}

// ---- per-thread control experiment ---------------------------------------------------------------

void thread_control_experiment() {
  const int M = kM, K = 384, N = 1536;  // fc forward
  Buf inp(static_cast<size_t>(M) * K), W(static_cast<size_t>(N) * K);
  Buf out1(static_cast<size_t>(M) * N), out2(static_cast<size_t>(M) * N);
  auto gemm_on = [&](float* o) { sgemm(false, true, M, N, K, inp.p, K, W.p, K, 0.0f, o, N); };
  const int reps = 40;
  auto run_reps = [&](float* o) {
    double t0 = now_s();
    for (int i = 0; i < reps; ++i) gemm_on(o);
    return (now_s() - t0) / reps;
  };
  std::printf("thread-control experiment (%s), fc forward %dx%dx%d, ms per call:\n", kBackend, M, N, K);
  std::printf("  local method tested: %s\n", local_method_name());

  set_threads_global(1);
  gemm_on(out1.p);
  double ref1 = run_reps(out1.p);
  set_threads_global(2);
  gemm_on(out1.p);
  double ref2 = run_reps(out1.p);
  std::printf("  main thread, global=1: %.3f   global=2: %.3f   (OS threads now %d)\n", ref1 * 1e3,
              ref2 * 1e3, count_os_threads());

  // A: a fresh std::thread with no setting at all (what does a stage thread get by default?)
  double a = 0;
  std::thread([&] { gemm_on(out2.p); a = run_reps(out2.p); }).join();
  std::printf("  A fresh std::thread, no setting:           %.3f  -> behaves like %s\n", a * 1e3,
              a < 0.75 * ref1 ? "2 threads" : "1 thread");
  // B: a fresh std::thread that sets 1 locally.
  double b = 0;
  std::thread([&] {
    set_threads_local(1);
    gemm_on(out2.p);
    b = run_reps(out2.p);
  }).join();
  std::printf("  B fresh std::thread, local set 1:          %.3f  -> behaves like %s\n", b * 1e3,
              b < 0.75 * ref1 ? "2 threads" : "1 thread");
  // C: main again, without re-setting: did B's setting leak into the main thread?
  gemm_on(out1.p);
  double c = run_reps(out1.p);
  std::printf("  C main thread again (no re-set) after B:   %.3f  -> behaves like %s%s\n", c * 1e3,
              c < 0.75 * ref1 ? "2 threads" : "1 thread",
              c < 0.75 * ref1 ? " (B's setting stayed in B)" : " (B's setting LEAKED into main)");
  // D: two concurrent std::threads, each setting 1 locally; sample the OS thread count meanwhile.
  set_threads_global(2);
  std::atomic<bool> done{false};
  std::atomic<int> peak{0};
  std::thread mon([&] {
    while (!done.load()) {
      peak = std::max(peak.load(), count_os_threads());
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  double d1 = 0, d2 = 0;
  double t0 = now_s();
  std::thread w1([&] { set_threads_local(1); gemm_on(out1.p); d1 = run_reps(out1.p); });
  std::thread w2([&] { set_threads_local(1); gemm_on(out2.p); d2 = run_reps(out2.p); });
  w1.join();
  w2.join();
  double wall = now_s() - t0;
  done = true;
  mon.join();
  std::printf("  D two concurrent threads, each local 1:    %.3f / %.3f per call, wall %.0f ms for "
              "2x%d calls; peak OS threads %d (main+monitor+2 workers = 4 if no helpers)\n",
              d1 * 1e3, d2 * 1e3, wall * 1e3, reps + 1, peak.load());
  // E: the same, but the worker threads set nothing.
  done = false;
  peak = 0;
  std::thread mon2([&] {
    while (!done.load()) {
      peak = std::max(peak.load(), count_os_threads());
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  t0 = now_s();
  std::thread w3([&] { gemm_on(out1.p); d1 = run_reps(out1.p); });
  std::thread w4([&] { gemm_on(out2.p); d2 = run_reps(out2.p); });
  w3.join();
  w4.join();
  wall = now_s() - t0;
  done = true;
  mon2.join();
  std::printf("  E two concurrent threads, no setting:      %.3f / %.3f per call, wall %.0f ms; peak "
              "OS threads %d\n",
              d1 * 1e3, d2 * 1e3, wall * 1e3, peak.load());
}

// ---- bf16 via oneDNN matmul ------------------------------------------------------------------

#if defined(BACKEND_DNNL)
// fp32 -> bf16, round to nearest even (AVX512_BF16 when compiled with -march=native on SPR).
void to_bf16(uint16_t* dst, const float* src, size_t n) {
  const long long nn = static_cast<long long>(n);
#pragma omp parallel for schedule(static)
  for (long long i0 = 0; i0 < nn; i0 += 4096) {
    long long i = i0, end = std::min(nn, i0 + 4096);
#if defined(__AVX512BF16__)
    for (; i + 32 <= end; i += 32) {
      __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
      _mm512_storeu_si512(reinterpret_cast<void*>(dst + i), reinterpret_cast<__m512i>(v));
    }
#endif
    for (; i < end; ++i) {
      uint32_t u;
      std::memcpy(&u, src + i, 4);
      u += 0x7fffu + ((u >> 16) & 1u);
      dst[i] = static_cast<uint16_t>(u >> 16);
    }
  }
}

struct Bf16Buf {
  uint16_t* p;
  explicit Bf16Buf(size_t n) {
    p = static_cast<uint16_t*>(std::aligned_alloc(64, (n * 2 + 63) / 64 * 64));
    std::memset(p, 0, (n * 2 + 63) / 64 * 64);
  }
  ~Bf16Buf() { std::free(p); }
  Bf16Buf(const Bf16Buf&) = delete;
  Bf16Buf& operator=(const Bf16Buf&) = delete;
};

using dnnl::memory;
using dt = memory::data_type;

// dst[m,n] (+)= A[m,k] @ B[k,n], A/B bf16 with arbitrary strides (rows, cols), dst f32 row-major.
struct Matmul {
  dnnl::matmul prim;
  memory a, b, c;
  Matmul(dnnl::engine& eng, int m, int n, int k, memory::dims a_str, memory::dims b_str, bool accumulate,
         void* A, void* B, float* C) {
    memory::desc amd({m, k}, dt::bf16, a_str), bmd({k, n}, dt::bf16, b_str),
        cmd({m, n}, dt::f32, memory::dims{n, 1});
    dnnl::primitive_attr attr;
    if (accumulate) {
      dnnl::post_ops po;
      po.append_sum(1.0f);
      attr.set_post_ops(po);
    }
    dnnl::matmul::desc d(amd, bmd, cmd);
    dnnl::matmul::primitive_desc pd(d, attr, eng);
    prim = dnnl::matmul(pd);
    a = memory(amd, eng, A);
    b = memory(bmd, eng, B);
    c = memory(cmd, eng, C);
    impl = pd.impl_info_str();
  }
  void run(dnnl::stream& s) {
    prim.execute(s, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
    s.wait();
  }
  std::string impl;
};

void time_linear_bf16(const Shape& s, int threads, LinTimes& mm, LinTimes& conv_once) {
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream st(eng);
  const int M = kM, K = s.K, N = s.N;
  const size_t nMK = static_cast<size_t>(M) * K, nNK = static_cast<size_t>(N) * K,
               nMN = static_cast<size_t>(M) * N;
  Buf inp(nMK), W(nNK), dout(nMN), out(nMN), dinp(nMK), dW(nNK);
  Bf16Buf inp16(nMK), W16(nNK), dout16(nMN);
  to_bf16(inp16.p, inp.p, nMK);
  to_bf16(W16.p, W.p, nNK);
  to_bf16(dout16.p, dout.p, nMN);
  const double t_create = now_s();
  // fwd: out[M,N] = inp[M,K] @ W^T   (W^T as [K,N] with strides (1, K))
  Matmul fwd(eng, M, N, K, {K, 1}, {1, K}, false, inp16.p, W16.p, out.p);
  // dinp[M,K] = dout[M,N] @ W[N,K]
  Matmul bwd_in(eng, M, K, N, {N, 1}, {K, 1}, false, dout16.p, W16.p, dinp.p);
  // dW[N,K] += dout^T[N,M] @ inp[M,K]   (dout^T with strides (1, N))
  Matmul bwd_w(eng, N, K, M, {1, N}, {K, 1}, true, dout16.p, inp16.p, dW.p);
  const double create_ms = (now_s() - t_create) * 1e3;
  std::memset(dW.p, 0, dW.n * sizeof(float));
  fwd.run(st);
  bwd_in.run(st);
  bwd_w.run(st);
  check_linear("bf16", s.name, M, N, K, inp.p, W.p, dout.p, out.p, dinp.p, dW.p, 2e-2);
  double flop = 2.0 * M * N * K;
  double min_time = flop > 2e10 ? 0.0 : 0.25;
  mm.fwd = time_op([&] { fwd.run(st); }, min_time);
  mm.dinp = time_op([&] { bwd_in.run(st); }, min_time);
  mm.dw = time_op([&] { bwd_w.run(st); }, min_time);
  double c_inp = time_op([&] { to_bf16(inp16.p, inp.p, nMK); });
  double c_w = time_op([&] { to_bf16(W16.p, W.p, nNK); });
  double c_dout = time_op([&] { to_bf16(dout16.p, dout.p, nMN); });
  // conversion if each op converted both of its inputs itself:
  LinTimes both{c_inp + c_w, c_dout + c_w, c_dout + c_inp};
  // conversion if each tensor is converted once per step and reused (the realistic design):
  conv_once = LinTimes{c_inp, c_w, c_dout};
  std::string base = s.name;
  std::printf("  [impl fwd=%s dinp=%s dW=%s; creating the 3 primitives took %.2f ms]\n", fwd.impl.c_str(),
              bwd_in.impl.c_str(), bwd_w.impl.c_str(), create_ms);
  print_row("bf16", threads, (base + ".fwd").c_str(), M, N, K, mm.fwd);
  print_row("bf16", threads, (base + ".dinp").c_str(), M, K, N, mm.dinp);
  print_row("bf16", threads, (base + ".dW").c_str(), N, K, M, mm.dw);
  print_row("bf16+cv", threads, (base + ".fwd").c_str(), M, N, K, mm.fwd + both.fwd);
  print_row("bf16+cv", threads, (base + ".dinp").c_str(), M, K, N, mm.dinp + both.dinp);
  print_row("bf16+cv", threads, (base + ".dW").c_str(), N, K, M, mm.dw + both.dw);
  std::printf("    conversion fp32->bf16: inp[%dx%d] %.3f ms, W[%dx%d] %.3f ms, dout[%dx%d] %.3f ms\n", M,
              K, c_inp * 1e3, N, K, c_w * 1e3, M, N, c_dout * 1e3);
}

void determinism_bf16() {
  std::printf("determinism (onednn): bf16 matmul results with 1 vs 2 threads\n");
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream st(eng);
  for (const Shape& s : kShapes) {
    const int M = kM, K = s.K, N = s.N;
    const size_t nMK = static_cast<size_t>(M) * K, nNK = static_cast<size_t>(N) * K,
                 nMN = static_cast<size_t>(M) * N;
    Buf inp(nMK), W(nNK), dout(nMN);
    Bf16Buf inp16(nMK), W16(nNK), dout16(nMN);
    to_bf16(inp16.p, inp.p, nMK);
    to_bf16(W16.p, W.p, nNK);
    to_bf16(dout16.p, dout.p, nMN);
    Buf o[2] = {Buf(nMN), Buf(nMN)}, di[2] = {Buf(nMK), Buf(nMK)}, dw[2] = {Buf(nNK), Buf(nNK)};
    for (int v = 0; v < 2; ++v) {
      omp_set_num_threads(v + 1);  // primitives take the creating thread's count
      std::memset(dw[v].p, 0, nNK * sizeof(float));
      Matmul fwd(eng, M, N, K, {K, 1}, {1, K}, false, inp16.p, W16.p, o[v].p);
      Matmul bwd_in(eng, M, K, N, {N, 1}, {K, 1}, false, dout16.p, W16.p, di[v].p);
      Matmul bwd_w(eng, N, K, M, {1, N}, {K, 1}, true, dout16.p, inp16.p, dw[v].p);
      fwd.run(st);
      bwd_in.run(st);
      bwd_w.run(st);
    }
    auto same = [](const Buf& a, const Buf& b) { return std::memcmp(a.p, b.p, a.n * sizeof(float)) == 0; };
    std::printf("  %-10s fwd %s  dinp %s  dW %s\n", s.name, same(o[0], o[1]) ? "identical" : "DIFFERS",
                same(di[0], di[1]) ? "identical" : "DIFFERS", same(dw[0], dw[1]) ? "identical" : "DIFFERS");
  }
}

// oneDNN primitives fix their thread count when they are created (dnnl_get_max_threads() of the
// creating thread); does executing one from a thread set to 1 still use 2?
void thread_control_matmul() {
  const int M = kM, K = 384, N = 1536;
  Buf inp(static_cast<size_t>(M) * K), W(static_cast<size_t>(N) * K), out(static_cast<size_t>(M) * N);
  Bf16Buf inp16(static_cast<size_t>(M) * K), W16(static_cast<size_t>(N) * K);
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  const int reps = 200;
  auto timed = [&](Matmul& mm) {
    dnnl::stream st(eng);
    mm.run(st);
    double t0 = now_s();
    for (int i = 0; i < reps; ++i) mm.run(st);
    return (now_s() - t0) / reps;
  };
  std::printf("thread-control, oneDNN bf16 matmul fc forward, ms per call:\n");
  omp_set_num_threads(1);
  Matmul m1(eng, M, N, K, {K, 1}, {1, K}, false, inp16.p, W16.p, out.p);
  double ref1 = timed(m1);
  omp_set_num_threads(2);
  Matmul m2(eng, M, N, K, {K, 1}, {1, K}, false, inp16.p, W16.p, out.p);
  double ref2 = timed(m2);
  std::printf("  main: created+run with 1: %.3f   with 2: %.3f\n", ref1 * 1e3, ref2 * 1e3);
  double a = 0, b = 0;
  int threads_a = 0, threads_b = 0;
  std::thread([&] {
    omp_set_num_threads(1);
    a = timed(m2);  // created in main with 2 threads
    threads_a = count_os_threads();
  }).join();
  std::thread([&] {
    omp_set_num_threads(1);
    Matmul local(eng, M, N, K, {K, 1}, {1, K}, false, inp16.p, W16.p, out.p);
    b = timed(local);
    threads_b = count_os_threads();
  }).join();
  std::printf("  worker set 1, primitive created in main (2 thr): %.3f (OS threads %d) -> behaves like %s\n",
              a * 1e3, threads_a, a < 0.75 * ref1 ? "2 threads" : "1 thread");
  std::printf("  worker set 1, primitive created in worker:       %.3f (OS threads %d) -> behaves like %s\n",
              b * 1e3, threads_b, b < 0.75 * ref1 ? "2 threads" : "1 thread");
}
#endif

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  for (const char* p = s; *p;) {
    v.push_back(std::atoi(p));
    while (*p && *p != ',') ++p;
    if (*p == ',') ++p;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> thread_counts{2, 1};
  int rounds = 1;
  bool linear = true, attn = true, bf16 = false, amx = false, control = false, determinism = false;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) thread_counts = parse_list(argv[++i]);
    else if (a == "--rounds" && i + 1 < argc) rounds = std::atoi(argv[++i]);
    else if (a == "--no-linear") linear = false;
    else if (a == "--no-attn") attn = false;
    else if (a == "--bf16") bf16 = true;
    else if (a == "--amx") amx = true;
    else if (a == "--thread-control") control = true;
    else if (a == "--determinism") determinism = true;
    else if (a == "--only" && i + 1 < argc) only = argv[++i];
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
#if defined(BACKEND_DNNL)
  if (amx) dnnl::set_max_cpu_isa(dnnl::cpu_isa::avx512_core_amx);
#else
  (void)amx;
  if (bf16) std::printf("note: --bf16 is only implemented for the oneDNN build\n");
#endif
  const char* envs[] = {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                        "BLIS_NUM_THREADS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"};
  std::printf("backend: %s\nenv:", backend_info().c_str());
  for (const char* e : envs) std::printf(" %s=%s", e, std::getenv(e) ? std::getenv(e) : "(unset)");
  std::printf("\n");

  if (determinism) {
    determinism_check();
    return 0;
  }
  if (control) {
    thread_control_experiment();
#if defined(BACKEND_DNNL)
    thread_control_matmul();
#endif
    return 0;
  }
  for (int r = 0; r < rounds; ++r) {
    for (int threads : thread_counts) {
      set_threads_global(threads);
      if (linear) {
        std::printf("fp32 linear, %d thread(s):\n", threads);
        std::vector<LinTimes> t;
        for (const Shape& s : kShapes)
          t.push_back(only.empty() || only == s.name ? time_linear_fp32(s, threads) : LinTimes{});
        if (only.empty()) print_step_totals("fp32", threads, t);
      }
#if defined(BACKEND_DNNL)
      if (bf16) {
        std::printf("bf16 matmul (oneDNN, bf16 in / f32 out), %d thread(s):\n", threads);
        std::vector<LinTimes> mm, cv;
        for (const Shape& s : kShapes) {
          LinTimes a, b;
          if (only.empty() || only == s.name) time_linear_bf16(s, threads, a, b);
          mm.push_back(a);
          cv.push_back(b);
        }
        if (only.empty()) {
          print_step_totals("bf16", threads, mm);
          std::vector<LinTimes> tot;
          for (size_t i = 0; i < mm.size(); ++i)
            tot.push_back(LinTimes{mm[i].fwd + cv[i].fwd, mm[i].dinp + cv[i].dinp, mm[i].dw + cv[i].dw});
          print_step_totals("bf16+cv1", threads, tot);  // each tensor converted once per step
        }
      }
#endif
    }
    if (attn) {
      set_threads_global(1);
      std::printf("attention products, 1 thread:\n");
      time_attention();
    }
  }
  return 0;
}
