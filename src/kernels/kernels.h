// Forward and backward kernels for every op of the GPT: pure functions over raw row-major fp32
// pointers and shapes. They allocate nothing (callers pass any scratch), keep no state, and
// parallelise with OpenMP over independent outputs only, so a result never depends on the
// number of threads (bit-identical with 1 or 2 threads).
//
// Gradient convention: every backward ACCUMULATES (+=) into every gradient output, parameter or
// activation; callers zero the buffers they need zeroed. A null gradient pointer means "not
// needed" and is skipped.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pipenag::kernels {

// ---- matmul (BLAS) ----------------------------------------------------------------------------
// Row-major C[M,N] = alpha * op(A) op(B) + beta * C; op(A) is [M,K], op(B) is [K,N].
void sgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc);

// Linear layer, PyTorch layout: W is [N (out), K (in)], bias [N] or null.
// out[M,N] = inp[M,K] @ W^T + bias          (out is overwritten)
void linear_forward(float* out, const float* inp, const float* W, const float* bias, int M, int K,
                    int N);
// dinp[M,K] += dout @ W ; dW[N,K] += dout^T @ inp ; dbias[N] += column sums of dout
void linear_backward(float* dinp, float* dW, float* dbias, const float* dout, const float* inp,
                     const float* W, int M, int K, int N);

// ---- layernorm (over the last dim C, eps 1e-5 as PyTorch) --------------------------------------
// out = (inp - mean) * rstd * w + b; mean[M], rstd[M] saved for the backward.
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                       const float* b, int M, int C);
void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                        const float* w, const float* mean, const float* rstd, int M, int C);

// ---- causal multi-head self-attention core -------------------------------------------------------
// qkv [B,T,3C]: q = columns [0,C), k = [C,2C), v = [2C,3C); head h uses columns h*hs..(h+1)*hs
// of each (hs = C/NH). out [B,T,C] (heads concatenated, overwritten).
// att [B,NH,T,T]: softmax probabilities saved for the backward (entries above the diagonal are
// unspecified). Scale 1/sqrt(hs).
void attention_forward(float* out, float* att, const float* qkv, int B, int T, int C, int NH);
// Floats of scratch the backward needs (for all threads that may run it).
size_t attention_backward_scratch_floats(int B, int T, int C, int NH);
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* att, int B,
                        int T, int C, int NH, float* scratch);

// ---- elementwise ----------------------------------------------------------------------------------
void relu_forward(float* out, const float* inp, size_t n);
void relu_backward(float* dinp, const float* dout, const float* inp, size_t n);
// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), as PyTorch's nn.GELU() default.
void gelu_forward(float* out, const float* inp, size_t n);
void gelu_backward(float* dinp, const float* dout, const float* inp, size_t n);
// out = a + b
void add(float* out, const float* a, const float* b, size_t n);

// ---- embedding -----------------------------------------------------------------------------------
// out[B,T,C] = wte[tokens[b,t]] + wpe[t]. Tokens must be < vocab (checked by the caller).
void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe, int B,
                       int T, int C);
// dwte[tokens[b,t]] += dout[b,t]; dwpe[t] += dout[b,t]  (either may be null)
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int B,
                        int T, int C);

// ---- fused softmax + cross-entropy ---------------------------------------------------------------
// losses[m] = -log softmax(logits[m])[targets[m]]. Returns the mean of losses (summed in double).
// A target < 0 is ignored (loss 0, gradient 0, not counted in the mean).
double softmax_xent_forward(float* losses, const float* logits, const int32_t* targets, int M, int V);
// Forward and backward in one pass, in place: logits[M,V] is overwritten by
// dlogits = (softmax(logits) - onehot(target)) * grad_scale. Returns the mean loss.
double softmax_xent_forward_backward(float* logits, float* losses, const int32_t* targets, int M,
                                     int V, float grad_scale);
// In place: row-wise softmax of logits[M,V] (for sampling).
void softmax_rows(float* logits, int M, int V);

}  // namespace pipenag::kernels
