// The linear layer with bf16 matrix products and fp32 accumulation, through oneDNN's matmul
// (AMX on Sapphire Rapids and later, AVX512_BF16 before). Same semantics as linear_forward /
// linear_backward in kernels.h: weights stay fp32 masters owned by the caller; inputs, weights
// and output gradients are rounded to bf16 (nearest even) for the products only, and results
// and gradients are fp32.
//
// Unlike the pure kernels this is an object: it holds the oneDNN engine, the compiled
// primitives (one per shape, compiled on first use) and the bf16 conversion buffers (grown on
// first use, so steady-state training allocates nothing).
#pragma once
#include <cstdint>
#include <memory>

namespace pipenag::kernels {

class Bf16Linear {
 public:
  Bf16Linear();
  ~Bf16Linear();
  Bf16Linear(const Bf16Linear&) = delete;
  Bf16Linear& operator=(const Bf16Linear&) = delete;

  // out[M,N] = inp[M,K] @ W^T + bias (bias may be null); W is [N,K].
  void forward(float* out, const float* inp, const float* W, const float* bias, int M, int K, int N);
  // dinp[M,K] += dout @ W ; dW[N,K] += dout^T @ inp ; dbias[N] += column sums (nulls skipped).
  void backward(float* dinp, float* dW, float* dbias, const float* dout, const float* inp,
                const float* W, int M, int K, int N);

  // True when this CPU has native bf16 arithmetic (AVX512_BF16 or AMX-BF16).
  static bool hardware_support();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// fp32 -> bf16 (as raw uint16), round to nearest even; NaN stays NaN.
void to_bf16(uint16_t* dst, const float* src, size_t n);

}  // namespace pipenag::kernels
