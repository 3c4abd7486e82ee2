// The fp32 GEMM's promise (src/kernels/gemm.h): every element of C is exactly the fused
// multiply-add chain c = beta*C, then c = fma(alpha*a[i][k], b[k][j], c) for k = 0..K-1. These
// tests compute that chain with std::fma in a plain loop and require the GEMM to equal it bit for
// bit, for every instruction set this CPU can run, 1 and 2 threads, both transposes, and shapes
// that cross every block and tile edge. Equality with the definition implies equality across
// thread counts, engines and CPUs, whatever the block sizes.
#include <gtest/gtest.h>
#include <cstdlib>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace k = pipenag::kernels;

namespace {

struct Case {
  int M, N, K;
  bool ta, tb;
  float alpha, beta;
};

// The definition, element by element.
std::vector<float> chain(const Case& c, const std::vector<float>& A, const std::vector<float>& B,
                         const std::vector<float>& C0) {
  const int lda = c.ta ? c.M : c.K, ldb = c.tb ? c.K : c.N;
  std::vector<float> C(C0.size());
  for (int i = 0; i < c.M; ++i)
    for (int j = 0; j < c.N; ++j) {
      float acc = c.beta == 0.0f ? 0.0f : c.beta == 1.0f ? C0[i * c.N + j] : c.beta * C0[i * c.N + j];
      for (int kk = 0; kk < c.K; ++kk) {
        const float a = c.ta ? A[kk * lda + i] : A[i * lda + kk];
        const float b = c.tb ? B[j * ldb + kk] : B[kk * ldb + j];
        acc = std::fma(c.alpha == 1.0f ? a : c.alpha * a, b, acc);
      }
      C[i * c.N + j] = acc;
    }
  return C;
}

std::vector<float> run(const Case& c, const std::vector<float>& A, const std::vector<float>& B,
                       const std::vector<float>& C0) {
  std::vector<float> C = C0;
  k::sgemm<float>(c.ta, c.tb, c.M, c.N, c.K, c.alpha, A.data(), c.ta ? c.M : c.K, B.data(),
                  c.tb ? c.K : c.N, c.beta, C.data(), c.N);
  return C;
}

std::vector<std::string> runnable_isas() {
  std::vector<std::string> isas = {"generic"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back("avx2");
  if (__builtin_cpu_supports("avx512f")) isas.push_back("avx512");
  return isas;
}

// Restores the instruction set chosen at start-up when a test ends.
class GemmTest : public ::testing::Test {
 protected:
  void SetUp() override { saved_ = k::gemm_isa(); }
  void TearDown() override { k::set_gemm_isa(saved_); }

 private:
  std::string saved_;
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

struct Operands {
  std::vector<float> A, B, C0;
};

Operands random_operands(const Case& c, std::mt19937& g) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Operands o{std::vector<float>(static_cast<size_t>(c.M) * c.K), std::vector<float>(static_cast<size_t>(c.K) * c.N),
             std::vector<float>(static_cast<size_t>(c.M) * c.N)};
  for (auto* v : {&o.A, &o.B, &o.C0})
    for (float& x : *v) x = nd(g);
  return o;
}

// Runs the case on every instruction set this CPU has, with 1 and 2 threads, and requires the
// definition's bits each time; returns how many runs it checked.
int check_every_isa_and_thread_count(const Case& c, const Operands& o) {
  const std::vector<float> want = chain(c, o.A, o.B, o.C0);
  const int threads = omp_get_max_threads();
  int checked = 0;
  for (const std::string& isa : runnable_isas())
    for (int nt : {1, 2}) {
      EXPECT_EQ(k::set_gemm_isa(isa), "");
      omp_set_num_threads(nt);
      const std::vector<float> got = run(c, o.A, o.B, o.C0);
      omp_set_num_threads(threads);
      EXPECT_TRUE(same_bits(got, want)) << isa << ", " << nt << " threads, M=" << c.M << " N=" << c.N
                                        << " K=" << c.K << " ta=" << c.ta << " tb=" << c.tb
                                        << " alpha=" << c.alpha << " beta=" << c.beta;
      ++checked;
    }
  return checked;
}

}  // namespace

TEST_F(GemmTest, EqualsTheFmaChainBitForBitOnEveryIsaAndThreadCount) {
  std::mt19937 g(7);
  // Shapes crossing the microkernels' tiles (6 x 16..64), the K block (384) and the row block
  // (96), with widths that take every narrow edge kernel; a K of 1 and of 0 too.
  std::vector<std::array<int, 3>> shapes = {
      {1, 1, 1},   {5, 7, 3},     {6, 64, 384},  {13, 65, 385}, {97, 130, 777},
      {7, 200, 1}, {64, 17, 1000}, {250, 300, 64}, {3, 5, 0}};
  // The sanitizer build (CI time): the shapes that cross every tile, block and edge kernel once.
  if (std::getenv("PIPENAG_SANITIZED")) shapes = {{1, 1, 1}, {5, 7, 3}, {13, 65, 385}, {7, 200, 1}, {3, 5, 0}};
  int checked = 0;
  for (const auto& s : shapes)
    for (int t = 0; t < 4; ++t)
      for (float alpha : {1.0f, 0.37f})
        for (float beta : {0.0f, 1.0f, -0.5f}) {
          const Case c{s[0], s[1], s[2], (t & 1) != 0, (t & 2) != 0, alpha, beta};
          checked += check_every_isa_and_thread_count(c, random_operands(c, g));
        }
  EXPECT_GE(checked, static_cast<int>(shapes.size()) * 4 * 2 * 3 * 2);
}

TEST_F(GemmTest, LargeProductsAreTheSameOnEveryIsaAndThreadCount) {
  // The model's shapes, large enough that two threads split them (by rows and by columns).
  std::mt19937 g(8);
  int checked = 0;
  std::vector<Case> cases = {Case{512, 384, 1152, false, true, 1, 0}, Case{384, 512, 512, true, false, 1, 1},
                             Case{600, 65, 384, false, false, 1, 0}};
  if (std::getenv("PIPENAG_SANITIZED")) cases.resize(1);  // CI time
  for (const Case& c : cases) checked += check_every_isa_and_thread_count(c, random_operands(c, g));
  EXPECT_GE(checked, static_cast<int>(cases.size()) * 2 * 2);
}

TEST_F(GemmTest, BetaZeroNeverReadsC) {
  // beta = 0 overwrites: NaN or infinity already in C must not leak into the result.
  const std::vector<float> A = {1, 2, 3, 4}, B = {5, 6, 7, 8};
  for (const std::string& isa : runnable_isas()) {
    ASSERT_EQ(k::set_gemm_isa(isa), "");
    std::vector<float> C = {std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(), -0.0f, 1e30f};
    k::sgemm<float>(false, false, 2, 2, 2, 1.0f, A.data(), 2, B.data(), 2, 0.0f, C.data(), 2);
    EXPECT_EQ(C, (std::vector<float>{19, 22, 43, 50})) << isa;
    // An empty K with beta = 0 writes zeros.
    C = {std::numeric_limits<float>::quiet_NaN(), 1, 2, 3};
    k::sgemm<float>(false, false, 2, 2, 0, 1.0f, A.data(), 2, B.data(), 2, 0.0f, C.data(), 2);
    EXPECT_EQ(C, (std::vector<float>{0, 0, 0, 0})) << isa;
  }
}

TEST_F(GemmTest, DoubleFollowsTheSameChain) {
  // Double (the gradient checks' type) has one generic kernel with the same definition.
  std::mt19937 g(9);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int M = 23, N = 19, K = 401;
  std::vector<double> A(M * K), B(N * K), C(M * N, 0.5);
  for (auto& v : A) v = nd(g);
  for (auto& v : B) v = nd(g);
  std::vector<double> want = C;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      for (int kk = 0; kk < K; ++kk) want[i * N + j] = std::fma(A[i * K + kk], B[j * K + kk], want[i * N + j]);
  k::sgemm<double>(false, true, M, N, K, 1.0, A.data(), K, B.data(), K, 1.0, C.data(), N);
  EXPECT_EQ(std::memcmp(C.data(), want.data(), C.size() * sizeof(double)), 0);
}

TEST_F(GemmTest, InstructionSetNamesAreChecked) {
  EXPECT_THROW(k::set_gemm_isa("avx1024"), std::invalid_argument);
  EXPECT_THROW(k::set_gemm_isa(""), std::invalid_argument);
  EXPECT_EQ(k::set_gemm_isa("auto"), "");
  EXPECT_NE(std::string(k::gemm_isa()), "");
  // A set this CPU lacks falls back, saying so; one it has is taken silently.
  for (const std::string isa : {"avx512", "avx2"}) {
    const std::string note = k::set_gemm_isa(isa);
    if (std::string(k::gemm_isa()) == isa) {
      EXPECT_EQ(note, "");
    } else {
      EXPECT_NE(note.find("no " + isa), std::string::npos) << note;
    }
  }
  EXPECT_EQ(k::set_gemm_isa("generic"), "");
  EXPECT_STREQ(k::gemm_isa(), "generic");
}
