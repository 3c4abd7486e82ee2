// Forward and backward kernels for every op of the GPT: pure functions over raw row-major
// pointers and shapes, templated over the scalar type T (instantiated for float, the training
// type, and double, which the gradient-check tests use). They allocate nothing (callers pass any
// scratch), keep no state, and parallelise with OpenMP over independent outputs only, so a result
// never depends on the number of threads (bit-identical with 1 or 2 threads).
//
// Gradient convention: every backward ACCUMULATES (+=) into every gradient output, parameter or
// activation; callers zero the buffers they need zeroed. A null gradient pointer means "not
// needed" and is skipped. Where a caller would only zero a buffer to accumulate into it once,
// an `accumulate = false` argument overwrites it instead (same values, one memory pass less).
//
// Scalar arguments that are not pointers (alpha, beta, grad_scale) never take part in deducing T,
// so a call with float pointers and a double literal still picks T = float. The context length
// is spelled T_ in parameter lists (T names the scalar type); shapes in comments say T.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

namespace pipenag::kernels {

// ---- matmul (our own GEMM, src/kernels/gemm.h) ----------------------------------------------------
// Row-major C[M,N] = alpha * op(A) op(B) + beta * C; op(A) is [M,K], op(B) is [K,N]. Each element
// is one fused multiply-add chain over k in order, starting from beta * C with alpha folded into
// A: bit-identical for any thread count and any instruction set. (Float and double; the name is
// kept from the fp32-only days.)
template <typename T>
void sgemm(bool trans_a, bool trans_b, int M, int N, int K, std::type_identity_t<T> alpha,
           const T* A, int lda, const T* B, int ldb, std::type_identity_t<T> beta, T* C, int ldc);

// The instruction set of the float microkernel: "avx512", "avx2" or "generic". The first GEMM
// picks the widest this CPU has, or the one the environment variable PIPENAG_ISA names.
const char* gemm_isa();
// Selects it by name ("auto", "avx512", "avx2", "generic"). Throws std::invalid_argument for
// another name; a set this CPU lacks falls back to the widest available and the returned note
// says so (empty otherwise). Call it before any GEMM runs, not during one.
std::string set_gemm_isa(const std::string& name);

// Linear layer, PyTorch layout: W is [N (out), K (in)], bias [N] or null.
// out[M,N] = inp[M,K] @ W^T + bias          (out is overwritten)
template <typename T>
void linear_forward(T* out, const T* inp, const T* W, const T* bias, int M, int K, int N);
// dinp[M,K] += dout @ W ; dW[N,K] += dout^T @ inp ; dbias[N] += column sums of dout
template <typename T>
void linear_backward(T* dinp, T* dW, T* dbias, const T* dout, const T* inp, const T* W, int M,
                     int K, int N);

// ---- layernorm (over the last dim C, eps 1e-5 as PyTorch) --------------------------------------
// out = (inp - mean) * rstd * w + b; mean[M], rstd[M] saved for the backward.
template <typename T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* w, const T* b, int M,
                       int C);
template <typename T>
void layernorm_backward(T* dinp, T* dw, T* db, const T* dout, const T* inp, const T* w,
                        const T* mean, const T* rstd, int M, int C);

// ---- causal multi-head self-attention core -------------------------------------------------------
// qkv [B,T,3C]: q = columns [0,C), k = [C,2C), v = [2C,3C); head h uses columns h*hs..(h+1)*hs
// of each (hs = C/NH). out [B,T,C] (heads concatenated, overwritten).
// att [B,NH,T,T]: softmax probabilities saved for the backward (entries above the diagonal are
// unspecified: the backward takes att exactly as the forward left it). Scale 1/sqrt(hs).
template <typename T>
void attention_forward(T* out, T* att, const T* qkv, int B, int T_, int C, int NH);
// Elements (of the kernel's T) of scratch the backward needs: enough for omp_get_max_threads()
// threads as it is when this is called, so call it after choosing the thread count.
size_t attention_backward_scratch_floats(int B, int T, int C, int NH);
template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* att, int B, int T_, int C,
                        int NH, T* scratch, bool accumulate = true);

// ---- elementwise ----------------------------------------------------------------------------------
template <typename T>
void relu_forward(T* out, const T* inp, size_t n);
template <typename T>
void relu_backward(T* dinp, const T* dout, const T* inp, size_t n, bool accumulate = true);
// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), as PyTorch's nn.GELU() default (the float version
// uses a rational erf approximation accurate to a few ulp).
template <typename T>
void gelu_forward(T* out, const T* inp, size_t n);
template <typename T>
void gelu_backward(T* dinp, const T* dout, const T* inp, size_t n, bool accumulate = true);
// out = a + b
template <typename T>
void add(T* out, const T* a, const T* b, size_t n);

// ---- embedding -----------------------------------------------------------------------------------
// out[B,T,C] = wte[tokens[b,t]] + wpe[t]. Tokens must be < vocab (checked by the caller).
template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, const T* wpe, int B, int T_,
                       int C);
// dwte[tokens[b,t]] += dout[b,t]; dwpe[t] += dout[b,t]  (either may be null)
template <typename T>
void embedding_backward(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, int B, int T_,
                        int C);

// ---- fused softmax + cross-entropy ---------------------------------------------------------------
// losses[m] = -log softmax(logits[m])[targets[m]]. Returns the mean of losses (summed in double).
// A target < 0 is ignored (loss 0, gradient 0, not counted in the mean; the mean of no rows is 0).
template <typename T>
double softmax_xent_forward(T* losses, const T* logits, const int32_t* targets, int M, int V);
// Forward and backward in one call, in place: logits[M,V] is overwritten by
// dlogits = (softmax(logits) - onehot(target)) * grad_scale. Returns the mean loss.
template <typename T>
double softmax_xent_forward_backward(T* logits, T* losses, const int32_t* targets, int M, int V,
                                     std::type_identity_t<T> grad_scale);
// In place: row-wise softmax of logits[M,V] (for sampling).
template <typename T>
void softmax_rows(T* logits, int M, int V);

}  // namespace pipenag::kernels
