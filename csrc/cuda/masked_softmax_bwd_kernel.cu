// Masked softmax (+ dropout), backward: CUDA kernels and host launcher (launch.h; glue:
// masked_softmax.cpp; device helpers and the thread layout: masked_softmax_kernel.cuh).
// With p the saved (pre-dropout) softmax of a row and x = s * scale + mask, dp_j / dx_i =
// p_j (delta_ij - p_i); dropout's backward gives g = keep ? grad * scale_p : 0 (the keep mask
// regenerated from the seed at the flat index of the [B, H, Sq, Sk] output; no dropout: g = grad), so
//   dx = p * (g - sum(g * p)),   dscores = scale * dx        (fp32; the mask has no gradient)
// A fully excluded row has p = 0, hence dscores = 0.
//
// Kernel shapes by Sk (bwd_config; V = 16 / sizeof(T) on the vector path, else 1). Each thread holds
// g and p of its packs, so the block shape holds 8 elements a thread:
//   Sk <= 1024         as the forward: G = min(32, pow2 >= ceil(Sk / V)) lanes a row, 128 / G rows a
//                      block; shuffles only
//   1024 < Sk <= 8192  a block per row, 8 elements a thread, ceil(Sk / 8) threads rounded up to warps
//   Sk > 8192          bwd_stream_kernel: 1024 threads per row, segments of 8192 columns, two passes
//                      (sum(g * p), then the output)
#include "cuda/launch.h"
#include "cuda/masked_softmax_kernel.cuh"

namespace fastbert::cuda {
namespace {
using namespace sm;

// g (after dropout's backward) and p of the thread's NV packs of row `row` in the segment at seg0;
// zeros for padding and inactive rows. Returns the thread's sum of g * p.
template <typename T, int V, int NV>
__device__ __forceinline__ float load_gp(float (&g)[NV][V], float (&p)[NV][V], const BwdArgs<T>& a, int64_t row,
                                         bool active, int seg0, int G, int t, uint32_t keep) {
  float dot = 0.0f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int c = pack_col<V>(seg0, G, t, k);
    const bool in_row = active && c < a.Sk;
    const int64_t off = row * a.Sk + c;
    const Pack<T, V> gv = in_row ? load<V>(a.grad + off) : Pack<T, V>{};
    const Pack<T, V> pv = in_row ? load<V>(a.soft + off) : Pack<T, V>{};
#pragma unroll
    for (int j = 0; j < V; ++j) {
      g[k][j] = to_f(gv.v[j]);
      if (a.drop.seed != nullptr) g[k][j] = (keep >> (k * V + j) & 1u) ? g[k][j] * a.drop.scale : 0.0f;
      p[k][j] = to_f(pv.v[j]);
      dot += g[k][j] * p[k][j];
    }
  }
  return dot;
}

// dscores of the thread's packs, given the row's sum(g * p).
template <typename T, int V, int NV>
__device__ __forceinline__ void store_ds(const float (&g)[NV][V], const float (&p)[NV][V], const BwdArgs<T>& a,
                                         int64_t row, int seg0, int G, int t, float dot) {
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int c = pack_col<V>(seg0, G, t, k);
    if (c >= a.Sk) continue;
    float o[V];
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = a.scale * (p[k][j] * (g[k][j] - dot));
    store<V>(a.dscores + row * a.Sk + c, o);
  }
}

// Rows held in registers: row blockIdx.x * blockDim.y + threadIdx.y (layout of
// masked_softmax_kernel.cuh, seg0 = 0, G NV V >= Sk). Inactive row groups take part in the warp
// collectives and store nothing.
template <typename T, int V, int NV>
__global__ void __launch_bounds__(NV * V > 8 ? 128 : 1024) bwd_rows_kernel(BwdArgs<T> a) {
  __shared__ float red[2][32];
  int slot = 0;
  const int G = blockDim.x, t = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < a.rows;
  const uint32_t keep = row_keep<V, NV>(a.drop, read_seed(a.drop), row, a.Sk, 0, G, t);
  float g[NV][V], p[NV][V];
  const float dot = group_reduce<false>(load_gp<T, V, NV>(g, p, a, row, active, 0, G, t, keep), red, slot);
  if (active) store_ds<T, V, NV>(g, p, a, row, 0, G, t, dot);
}

// Rows longer than a block holds: row blockIdx.x (blockDim.y == 1), segments of G NV V columns;
// pass 1 sums g * p, pass 2 reloads g and p (and regenerates the keep bits) and writes dscores.
template <typename T, int V, int NV>
__global__ void __launch_bounds__(1024) bwd_stream_kernel(BwdArgs<T> a) {
  __shared__ float red[2][32];
  int slot = 0;
  const int G = blockDim.x, t = threadIdx.x;
  const int64_t row = blockIdx.x;
  const int seg = G * NV * V;
  const uint64_t seed = read_seed(a.drop);
  float g[NV][V], p[NV][V], dot = 0.0f;
  for (int seg0 = 0; seg0 < a.Sk; seg0 += seg)
    dot += load_gp<T, V, NV>(g, p, a, row, true, seg0, G, t, row_keep<V, NV>(a.drop, seed, row, a.Sk, seg0, G, t));
  dot = group_reduce<false>(dot, red, slot);
  for (int seg0 = 0; seg0 < a.Sk; seg0 += seg) {
    load_gp<T, V, NV>(g, p, a, row, true, seg0, G, t, row_keep<V, NV>(a.drop, seed, row, a.Sk, seg0, G, t));
    store_ds<T, V, NV>(g, p, a, row, seg0, G, t, dot);
  }
}

// ---- host side ------------------------------------------------------------------------------------
constexpr int64_t kWarpMaxSk = 1024, kBlockEpl = 8, kMaxTpr = 1024, kRowsThreads = 128;

Config bwd_config(int64_t Sk, int V) { return row_config(Sk, V, kWarpMaxSk, kBlockEpl, kMaxTpr, kRowsThreads); }

template <typename T, int V, int NV>
cudaError_t launch(const BwdArgs<T>& a, const Config& cfg, cudaStream_t stream) {
  if constexpr (NV * V == kBlockEpl) {
    if (cfg.stream) {
      if (a.rows > 0x7fffffff) return cudaErrorInvalidValue;
      bwd_stream_kernel<T, V, NV><<<static_cast<unsigned>(a.rows), cfg.tpr, 0, stream>>>(a);
      return cudaGetLastError();
    }
  }
  const int64_t blocks = ceil_div(a.rows, cfg.rows_per_block);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  bwd_rows_kernel<T, V, NV><<<static_cast<unsigned>(blocks), dim3(cfg.tpr, cfg.rows_per_block), 0, stream>>>(a);
  return cudaGetLastError();
}

// The instantiated pack counts per V, as the forward's (8 elements a thread is the block / stream shape).
template <typename T, int V>
cudaError_t launch_nv(const BwdArgs<T>& a, const Config& cfg, cudaStream_t stream) {
  const int nv = cfg.nv;
  if constexpr (V == 8) {
    if (nv <= 1) return launch<T, V, 1>(a, cfg, stream);
    if (nv <= 2) return launch<T, V, 2>(a, cfg, stream);
    if (nv <= 3) return launch<T, V, 3>(a, cfg, stream);
    if (nv <= 4) return launch<T, V, 4>(a, cfg, stream);
  } else if constexpr (V == 4) {
    if (nv <= 1) return launch<T, V, 1>(a, cfg, stream);
    if (nv <= 2) return launch<T, V, 2>(a, cfg, stream);
    if (nv <= 4) return launch<T, V, 4>(a, cfg, stream);
    if (nv <= 6) return launch<T, V, 6>(a, cfg, stream);
    if (nv <= 8) return launch<T, V, 8>(a, cfg, stream);
  } else {
    if (nv <= 1) return launch<T, V, 1>(a, cfg, stream);
    if (nv <= 2) return launch<T, V, 2>(a, cfg, stream);
    if (nv <= 4) return launch<T, V, 4>(a, cfg, stream);
    if (nv <= 8) return launch<T, V, 8>(a, cfg, stream);
    if (nv <= 16) return launch<T, V, 16>(a, cfg, stream);
    if (nv <= 24) return launch<T, V, 24>(a, cfg, stream);
    if (nv <= 32) return launch<T, V, 32>(a, cfg, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t run(const void* grad, const void* softmax, float scale, const Dropout& drop, void* dscores, int64_t rows,
                int64_t Sk, cudaStream_t stream) {
  const BwdArgs<T> a{
      static_cast<const T*>(grad), static_cast<const T*>(softmax), static_cast<T*>(dscores), scale, drop, rows,
      static_cast<int>(Sk)};
  const bool vec = Sk % kVec<T> == 0 && aligned16(grad) && aligned16(softmax) && aligned16(dscores);
  return vec ? launch_nv<T, kVec<T>>(a, bwd_config(Sk, kVec<T>), stream)
             : launch_nv<T, 1>(a, bwd_config(Sk, 1), stream);
}

}  // namespace

cudaError_t masked_softmax_bwd(DType dt, const void* grad, const void* softmax, float scale, const int64_t* seed,
                               double dropout_p, void* dscores, int64_t rows, int64_t keys, cudaStream_t stream) {
  if (rows <= 0 || keys <= 0) return cudaSuccess;
  if (keys > sm::kMaxSk) return cudaErrorInvalidValue;
  const Dropout drop{seed, seed != nullptr ? philox::threshold(dropout_p) : 0u,
                     seed != nullptr ? philox::scale(dropout_p) : 1.0f};
  switch (dt) {
    case DType::f32: return run<float>(grad, softmax, scale, drop, dscores, rows, keys, stream);
    case DType::f16: return run<__half>(grad, softmax, scale, drop, dscores, rows, keys, stream);
    case DType::bf16: return run<__nv_bfloat16>(grad, softmax, scale, drop, dscores, rows, keys, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastbert::cuda
