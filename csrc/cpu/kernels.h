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

// One line per kernel; each takes the storage dtype of its tensor arguments.
#define FASTBERT_CPU_KERNELS                                                                      \
  /* y[e] = gelu(x[e] + bias[e % n]) for flat elements [e0, e1) of a contiguous [rows, n] x.  */  \
  /* bias is fp32 (or fp64 for f64 data) and may be null. */                                     \
  void bias_gelu_fwd(DType dt, const void* x, const void* bias, void* y, int64_t n, int64_t e0,   \
                     int64_t e1, bool tanh);                                                      \
  /* dx = dy * gelu'(x + bias) on the tile rows [r0, r1) x cols [c0, c1), c1 - c0 <= */           \
  /* kMaxColTile; when dbias (fp64 [n]) is not null, dbias[c] += sum over the tile's rows of dx. */ \
  void bias_gelu_bwd(DType dt, const void* dy, const void* x, const void* bias, void* dx,         \
                     void* dbias, int64_t n, int64_t r0, int64_t r1, int64_t c0, int64_t c1,      \
                     bool tanh);

namespace generic { FASTBERT_CPU_KERNELS }
namespace avx2 { FASTBERT_CPU_KERNELS }
namespace avx512 { FASTBERT_CPU_KERNELS }

}  // namespace fastbert::cpu
