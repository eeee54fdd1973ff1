#pragma once
// Declarations of the per-ISA CPU kernels (csrc/cpu/*_kernel.cpp). setup.py compiles each kernel
// file once per instruction set with -DFASTBERT_ISA=<isa>, which puts its definitions in
// fastbert::cpu::<isa>; csrc/cpu/dispatch.h picks the namespace at run time. Kernels see raw
// pointers to contiguous memory only (the glue in csrc/cpu/<op>.cpp handles tensors and threads).
#include <cstdint>

namespace fastbert::cpu {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

// Widest column tile a backward kernel call takes (its fp32 group sums live on the stack).
constexpr int64_t kMaxColTile = 4096;

// Dropout from the shared Philox stream (common/philox.h); kernels take a null pointer without it.
struct Dropout {
  uint64_t seed;
  uint32_t threshold;  // philox::threshold(p)
  float scale;         // philox::scale(p)
};

// layernorm_residual: contiguous [rows, n] x, residual (and grad, outputs) in the op's dtype;
// weight, bias, x_bias in fp32 (fp64 for f64 data); mean/rstd per row in fp32 (fp64 for f64 data).
struct LayerNormArgs {
  int64_t n = 0;
  double eps = 0;
  const void *x = nullptr, *residual = nullptr, *weight = nullptr, *bias = nullptr;
  const void* x_bias = nullptr;            // may be null
  const void* grad = nullptr;              // backward: dL/dy
  void *y = nullptr, *mean = nullptr, *rstd = nullptr;  // forward writes all three; backward reads mean, rstd
  void *dresidual = nullptr, *dx = nullptr;             // backward; dx null without dropout (dx = dresidual)
  double *dweight = nullptr, *dbias = nullptr, *dx_bias = nullptr;  // backward: the task's fp64 column
                                                                    // sums, written (dx_bias may be null)
  const Dropout* dropout = nullptr;
  bool stream = false;  // outputs (y; dresidual, dx) with streaming stores: the glue sets it for large ones
};

// masked_softmax over rows of k keys of a contiguous [batch, heads, queries, k] tensor (row r is
// (b, h, q) in row-major order). The mask (may be null) is read at b * mask_stride[0] + h *
// mask_stride[1] + q * mask_stride[2] + i * mask_stride[3] (stride 0 on broadcast dims; the key
// stride is 0 or 1), as bool (True = attend) when mask_is_bool, else additive in mask_dtype.
struct SoftmaxArgs {
  int64_t heads = 0, queries = 0, k = 0;
  float scale = 1.0f;
  double scale64 = 1.0;
  const void* scores = nullptr;
  const void* mask = nullptr;
  bool mask_is_bool = false;
  DType mask_dtype = DType::f32;
  int64_t mask_stride[4] = {0, 0, 0, 0};
  void* probs = nullptr;  // forward output (after dropout)
  void* softmax = nullptr;  // forward: pre-dropout p, written only with dropout
  const void* grad = nullptr;  // backward: dL/dprobs
  const void* saved = nullptr;  // backward: the softmax the forward saved
  void* dscores = nullptr;  // backward output
  const Dropout* dropout = nullptr;
  bool stream = false;  // outputs far larger than the caches: streaming stores
};

// Cross-entropy over rows of v logits (linear_cross_entropy's fused step): contiguous [rows, v]
// logits in the op's dtype, int64 targets, per-row loss and lse (and row_scale) in fp32 (fp64 for
// f64 data). The backward overwrites `grad` (the logits themselves, in place) with
// (softmax - onehot(target)) * row_scale; a row whose target is ignore_index gets loss 0 (and zeros).
struct CrossEntropyArgs {
  int64_t v = 0, ignore_index = -100;
  const void* logits = nullptr;
  const int64_t* targets = nullptr;
  const void* row_scale = nullptr;  // backward only
  void* grad = nullptr;  // backward only: may equal logits
  void *loss = nullptr, *lse = nullptr;
};

// One line per kernel; each takes the storage dtype of its tensor arguments.
#define FASTBERT_CPU_KERNELS                                                                                      \
  /* y[e] = gelu(x[e] + bias[e % n]) for flat elements [e0, e1) of a contiguous [rows, n] x.  */                  \
  /* bias is fp32 (or fp64 for f64 data) and may be null. */                                                      \
  void bias_gelu_fwd(DType dt, const void* x, const void* bias, void* y, int64_t n, int64_t e0, int64_t e1,       \
                     bool tanh);                                                                                  \
  /* dx = dy * gelu'(x + bias) on the tile rows [r0, r1) x cols [c0, c1), c1 - c0 <= */                           \
  /* kMaxColTile; when dbias (fp64 [n]) is not null, dbias[c] += sum over the tile's rows of dx. */               \
  void bias_gelu_bwd(DType dt, const void* dy, const void* x, const void* bias, void* dx, void* dbias, int64_t n, \
                     int64_t r0, int64_t r1, int64_t c0, int64_t c1, bool tanh);                                  \
  /* LayerNorm(dropout(x + x_bias) + residual) forward / backward over rows [r0, r1). */                          \
  void layernorm_residual_fwd(DType dt, const LayerNormArgs& a, int64_t r0, int64_t r1);                          \
  void layernorm_residual_bwd(DType dt, const LayerNormArgs& a, int64_t r0, int64_t r1);                          \
  /* dropout(softmax(scores * scale + mask)) forward / backward over rows [r0, r1). */                            \
  void masked_softmax_fwd(DType dt, const SoftmaxArgs& a, int64_t r0, int64_t r1);                                \
  void masked_softmax_bwd(DType dt, const SoftmaxArgs& a, int64_t r0, int64_t r1);                                \
  /* loss, lse (and with a.grad the logits' gradient) of rows [r0, r1). */                                        \
  void cross_entropy_rows(DType dt, const CrossEntropyArgs& a, int64_t r0, int64_t r1);

namespace generic {
FASTBERT_CPU_KERNELS
}
namespace avx2 {
FASTBERT_CPU_KERNELS
}
namespace avx512 {
FASTBERT_CPU_KERNELS
}
namespace avx512bf16 {  // avx512 + AVX512-BF16 conversions (only where the compiler has them)
FASTBERT_CPU_KERNELS
}

}  // namespace fastbert::cpu

// ---- varlen_attention (csrc/cpu/varlen_attention.cpp) -------------------------------------------
namespace fastbert::cpu {

// One (sequence, head) pair of n tokens: contiguous [n, n] scratch in the accumulation type (fp32;
// fp64 for f64 data). Dropout element of query row i, key j is e0 + i * e_step + j.
struct VarlenSoftmaxArgs {
  int64_t n = 0;
  void* s = nullptr;  // in: the scaled scores; out: the probabilities after dropout
  void* dp = nullptr;  // backward: in dO v^T, out dS = p (dp * keep / (1 - p_drop) - D)
  void* lse = nullptr;  // [n]: the forward writes it (the backward recomputes max and sum instead)
  const Dropout* dropout = nullptr;
  uint64_t e0 = 0, e_step = 0;
};

#define FASTBERT_CPU_VARLEN_KERNELS                                                                        \
  /* softmax (lse, dropout) of a pair's scores / its backward; acc is f32 or f64. */                       \
  void varlen_softmax_fwd(DType acc, const VarlenSoftmaxArgs& a);                                          \
  void varlen_softmax_bwd(DType acc, const VarlenSoftmaxArgs& a);                                          \
  /* dst[r * d + c] = src[r * ld_src + c] (storage dtype dt -> fp32; nothing for f64) and back. */         \
  void varlen_rows_to_f32(DType dt, const void* src, int64_t ld_src, int64_t rows, int64_t d, float* dst); \
  void varlen_rows_from_f32(DType dt, const float* src, int64_t rows, int64_t d, void* dst, int64_t ld_dst);

namespace generic {
FASTBERT_CPU_VARLEN_KERNELS
}
namespace avx2 {
FASTBERT_CPU_VARLEN_KERNELS
}
namespace avx512 {
FASTBERT_CPU_VARLEN_KERNELS
}
namespace avx512bf16 {  // avx512 + AVX512-BF16 conversions (only where the compiler has them)
FASTBERT_CPU_VARLEN_KERNELS
}

}  // namespace fastbert::cpu
