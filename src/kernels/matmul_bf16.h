// The linear layer with bf16 matrix products and fp32 accumulation. Same semantics as
// linear_forward / linear_backward in kernels.h: weights stay fp32 masters owned by the caller;
// inputs, weights and output gradients are rounded to bf16 (nearest even) for the products only,
// and results and gradients are fp32.
//
// Three backends compute the products (docs/BLAS.md says which is fastest where):
//   "avx512bf16"  our GEMM driver (gemm_driver.h) around a vdpbf16ps microkernel: every element
//                 is one chain over pairs of k in order, so the results do not depend on the
//                 thread count (CPUs with AVX512_BF16: AMD Zen 4/5, Intel Cooper Lake and later);
//   "onednn"      oneDNN's matmul primitive, which runs on AMX on Sapphire Rapids and later. Each
//                 call is cut into bands of rows of a fixed height, each band one single-threaded
//                 oneDNN call, so the results do not depend on the thread count either;
//   "emulated"    the bf16-rounded values multiplied by the fp32 GEMM: the same rounding of the
//                 inputs, no speed-up, on any CPU.
// Results differ in the last bits between backends (another order of the sums), never between
// runs or thread counts of one backend.
//
// Unlike the pure kernels this is an object: it holds the bf16 conversion buffers and oneDNN's
// compiled primitives (grown or compiled on first use, so steady-state training allocates
// nothing).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace pipenag::kernels {

class Bf16Linear {
 public:
  // `backend`: "auto" (bf16_backend()) or one of the names above. An unknown name, or one this
  // CPU cannot run, throws std::invalid_argument with a one-line reason.
  explicit Bf16Linear(const std::string& backend = "auto");
  ~Bf16Linear();
  Bf16Linear(const Bf16Linear&) = delete;
  Bf16Linear& operator=(const Bf16Linear&) = delete;

  const std::string& backend() const;

  // out[M,N] = inp[M,K] @ W^T + bias (bias may be null); W is [N,K].
  void forward(float* out, const float* inp, const float* W, const float* bias, int M, int K, int N);
  // dinp[M,K] (+)= dout @ W ; dW[N,K] += dout^T @ inp ; dbias[N] += column sums (nulls skipped).
  // dinp is accumulated into, or overwritten when accumulate_dinp is false.
  void backward(float* dinp, float* dW, float* dbias, const float* dout, const float* inp,
                const float* W, int M, int K, int N, bool accumulate_dinp = true);

  // True when this CPU has native bf16 arithmetic (AVX512_BF16 or AMX-BF16).
  static bool hardware_support();
  // The backend "auto" picks: the environment variable PIPENAG_BF16 when set, else onednn on
  // AMX, avx512bf16 with AVX512_BF16, emulated otherwise. `note` (when given) receives a line
  // when a requested backend was not available and another was taken.
  static std::string bf16_backend(std::string* note = nullptr);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// fp32 -> bf16 (as raw uint16), round to nearest even; NaN stays NaN.
void to_bf16(uint16_t* dst, const float* src, size_t n);

}  // namespace pipenag::kernels
