#pragma once
// Host launchers of the CUDA kernels (csrc/cuda/*_kernel.cu), shared with the tensor glue
// (csrc/cuda/<op>.cpp). They take raw pointers to contiguous device memory, sizes and a stream, and
// no torch types, so the .cu files compile without torch headers. Each launcher enqueues its
// kernels on `stream` (the device is the current one) and returns the first CUDA error it saw
// (cudaSuccess otherwise); the glue turns that into an exception.
#include <cuda_runtime.h>

#include <cstdint>

namespace fastbert::cuda {

// Storage dtype of the data tensors. Statistics, bias and dbias are always fp32.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// ---- bias_gelu -------------------------------------------------------------------------------
// x, y: contiguous [rows, n] in dtype dt; bias: fp32 [n] or null (then z = x).
// y[r, c] = gelu(x[r, c] + bias[c]), exact (erf) or tanh approximation.
cudaError_t bias_gelu_fwd(DType dt, const void* x, const float* bias, void* y, int64_t rows, int64_t n, bool tanh,
                          cudaStream_t stream);

// Row chunking of the dbias reduction, fixed by (dt, rows, n) alone so that dbias is bitwise the
// same on every GPU: stage 1 writes one fp32 row of partial sums per chunk of rows_per_chunk rows.
struct BiasGeluBwdPlan {
  int64_t rows_per_chunk;
  int64_t chunks;  // rows of the fp32 workspace `partial` (ceil(rows / rows_per_chunk))
};
BiasGeluBwdPlan bias_gelu_bwd_plan(DType dt, int64_t rows, int64_t n);

// dy, x, dx: contiguous [rows, n] in dtype dt; bias: fp32 [n] or null.
// dx = dy * gelu'(x + bias). When dbias (fp32 [n]) is not null it receives sum over rows of dx,
// computed in fp32 without atomics (deterministic); partial is then an fp32 [plan.chunks, n]
// workspace (plan from bias_gelu_bwd_plan(dt, rows, n)). When dbias is null, partial and plan are
// unused.
cudaError_t bias_gelu_bwd(DType dt, const void* dy, const void* x, const float* bias, void* dx, float* partial,
                          float* dbias, int64_t rows, int64_t n, const BiasGeluBwdPlan& plan, bool tanh,
                          cudaStream_t stream);

// ---- layernorm_residual ----------------------------------------------------------------------
// Forward. x, residual, y: contiguous [rows, n] in dtype dt; weight, bias: fp32 [n]; x_bias: fp32 [n]
// or null; seed: int64 [1] on the device (read by the kernels) or null for no dropout; mean, rstd:
// fp32 [rows]. h = x + x_bias; with a seed h = keep ? h * philox::scale(p) : 0, the keep mask from the shared
// Philox stream (common/philox.h, element index = flat index into [rows, n]); s = h + residual;
// mean, rstd = 1 / sqrt(var + eps) of s over the row (fp32, biased variance);
// y = (s - mean) * rstd * weight + bias.
cudaError_t layernorm_residual_fwd(DType dt, const void* x, const void* residual, const float* weight,
                                   const float* bias, const float* x_bias, const int64_t* seed, double dropout_p,
                                   float eps, void* y, float* mean, float* rstd, int64_t rows, int64_t n,
                                   cudaStream_t stream);

// Backward workspaces, fixed by (rows, n) alone so that the parameter gradients are bitwise the same
// on every GPU: block b sums the column terms of rows [b * rows_per_block, (b + 1) * rows_per_block)
// into one fp32 row of partial sums.
struct LayerNormResidualBwdPlan {
  int64_t rows_per_block;
  int64_t blocks;  // rows of the workspace `partial`: fp32 [blocks, nacc, n], nacc = x_bias ? 3 : 2
  bool row_stats;  // rows too long for one block: also an fp32 [rows, 2] workspace `row_stats`
};
LayerNormResidualBwdPlan layernorm_residual_bwd_plan(int64_t rows, int64_t n);

// Backward. grad, x, residual, dresidual, dx: contiguous [rows, n] in dt; weight: fp32 [n]; x_bias,
// seed, dropout_p: as in the forward; mean, rstd: the forward's. With s recomputed,
// s_hat = (s - mean) * rstd and g = grad * weight: dresidual = ds = rstd * (g - mean(g) - s_hat *
// mean(g * s_hat)); with a seed dx = ds * keep * scale (dx may be null without one: then dx = ds).
// dweight = sum over rows of grad * s_hat, dbias = sum of grad, and (when x_bias is not null)
// dx_bias = sum of dx (ds without dropout): fp32 [n] each, deterministic (no atomics). partial,
// row_stats: fp32 workspaces sized by plan (from layernorm_residual_bwd_plan(rows, n)).
cudaError_t layernorm_residual_bwd(DType dt, const void* grad, const void* x, const void* residual, const float* weight,
                                   const float* x_bias, const int64_t* seed, double dropout_p, const float* mean,
                                   const float* rstd, void* dresidual, void* dx, float* dweight, float* dbias,
                                   float* dx_bias, float* partial, float* row_stats, int64_t rows, int64_t n,
                                   const LayerNormResidualBwdPlan& plan, cudaStream_t stream);

// ---- masked_softmax --------------------------------------------------------------------------
// Element type of the mask: none, bool (1 byte, nonzero = attend), or an additive float mask.
enum class MaskType : int { none = 0, b8 = 1, f32 = 2, f16 = 3, bf16 = 4 };

// The mask as the kernels read it, broadcast through its strides (never materialised): element
// (b, h, q, k) of the [B, H, Sq, Sk] scores reads data + b stride[0] + h stride[1] + q stride[2] +
// k stride[3] (in elements; stride 0 for a broadcast dimension). data is ignored for MaskType::none.
struct SoftmaxMask {
  MaskType type;
  const void* data;
  int64_t stride[4];
};

// Forward. scores, probs: contiguous [batch, heads, queries, keys] in dtype dt; seed: int64 [1] on the
// device (read by the kernels) or null for no dropout. Per row of keys, in fp32: x = s * scale + mask
// (bool mask: -inf where false); p = softmax(x), zeros for a row whose max is -inf. Without a seed
// probs = p and softmax is not touched; with one softmax (contiguous, like probs) = p and probs =
// keep ? p * philox::scale(p_drop) : 0, the keep mask from the shared Philox stream (common/philox.h,
// element index = flat index into [batch, heads, queries, keys]).
cudaError_t masked_softmax_fwd(DType dt, const void* scores, const SoftmaxMask& mask, float scale, const int64_t* seed,
                               double dropout_p, void* probs, void* softmax, int64_t batch, int64_t heads,
                               int64_t queries, int64_t keys, cudaStream_t stream);

// Backward. grad, softmax (the forward's pre-dropout p), dscores: contiguous [rows, keys] in dt; seed,
// dropout_p: as in the forward. g = keep ? grad * philox::scale(p_drop) : 0 with a seed (the same keep
// mask), else grad; dscores = scale * p * (g - sum over the row of g * p), in fp32.
cudaError_t masked_softmax_bwd(DType dt, const void* grad, const void* softmax, float scale, const int64_t* seed,
                               double dropout_p, void* dscores, int64_t rows, int64_t keys, cudaStream_t stream);

// ---- gather_masked ---------------------------------------------------------------------------
// Integer element type of labels / targets.
enum class IntType : int { i64 = 0, i32 = 1, i16 = 2, i8 = 3, u8 = 4 };

// Forward, stage 1 (one block, a serial loop over tiles of labels). labels: contiguous [n] of type lt;
// row i is selected iff labels[i] != ignore_index, compared in the labels' type (ignore_index
// converted to it, wrapping, as torch's `labels != ignore_index` does). slot: int64 [n], the number
// of selected rows before i where selected, else -1; index, targets: int64 with room for n, their
// first m entries = the selected i (increasing) and int64(labels[i]); count: int64 [1] on the device
// = m. Nothing is launched for n == 0 (count is then not written).
cudaError_t gather_masked_select(IntType lt, const void* labels, int64_t n, int64_t ignore_index, int64_t* slot,
                                 int64_t* index, int64_t* targets, int64_t* count, cudaStream_t stream);

// Row gather (forward stage 2 with idx = index, backward with idx = slot): src rows of width
// elements of dtype dt, row s at src + s * ld (elements; ld may differ from width); out: contiguous
// [rows, width] in dt; idx: int64 [rows] on the device. out[r] = src row idx[r] when
// 0 <= idx[r] < src_rows, zeros when idx[r] < 0, all-ones bits (NaN in every float dtype) when
// idx[r] >= src_rows. One pass writes every element of out (no separate zero fill).
cudaError_t gather_masked_rows(DType dt, const void* src, int64_t ld, int64_t src_rows, const int64_t* idx, void* out,
                               int64_t rows, int64_t width, cudaStream_t stream);

// ---- linear_cross_entropy --------------------------------------------------------------------
// Forward. logits: contiguous [rows, vocab] in dt (vocab >= 1); targets: contiguous [rows] of type
// tt (i64 or i32); loss, lse: fp32 [rows]. Per row, in fp32: lse = log(sum(exp(logits))) (max-shifted),
// loss = lse - logits[target]; loss = 0 where target == ignore_index, NaN where the target is
// outside [0, vocab) (never read).
cudaError_t linear_cross_entropy_fwd(DType dt, const void* logits, IntType tt, const void* targets,
                                     int64_t ignore_index, float* loss, float* lse, int64_t rows, int64_t vocab,
                                     cudaStream_t stream);

// Backward: the forward's loss and lse, and logits (contiguous, overwritten in place) =
// (softmax(row) - onehot(target)) * row_scale[i] (fp32 [rows]), computed in fp32 and rounded to dt;
// rows whose target is ignore_index become zeros, rows with an out-of-range target NaN.
cudaError_t linear_cross_entropy_bwd(DType dt, void* logits, IntType tt, const void* targets, const float* row_scale,
                                     int64_t ignore_index, float* loss, float* lse, int64_t rows, int64_t vocab,
                                     cudaStream_t stream);

}  // namespace fastbert::cuda
