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
cudaError_t bias_gelu_fwd(DType dt, const void* x, const float* bias, void* y, int64_t rows,
                          int64_t n, bool tanh, cudaStream_t stream);

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
cudaError_t bias_gelu_bwd(DType dt, const void* dy, const void* x, const float* bias, void* dx,
                          float* partial, float* dbias, int64_t rows, int64_t n,
                          const BiasGeluBwdPlan& plan, bool tanh, cudaStream_t stream);

}  // namespace fastbert::cuda
