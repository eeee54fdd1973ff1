// bias + dropout + residual + LayerNorm, forward: CUDA kernels and host launcher (launch.h; glue:
// layernorm_residual.cpp; device helpers and the thread layout: layernorm_residual_kernel.cuh).
//   h = x + x_bias;  h = keep ? h * scale : 0 (dropout, when a seed is given);  s = h + residual
//   mean = sum(s) / n,  var = sum((s - mean)^2) / n,  rstd = 1 / sqrt(var + eps)
//   y = (s - mean) * rstd * weight + bias                  (fp32 maths, y rounded to x's dtype)
// Statistics stay accurate when |mean| >> spread (e.g. values ~1e3 with spread 1): a first sum gives
// m1 = sum(s) / n; a second sums d = s - m1 (exact for s near m1, and small) and d^2, so
// delta = sum(d) / n corrects the mean (mean = m1 + delta) and var = sum(d^2) / n - delta^2 has no
// cancellation (delta is m1's rounding error, tiny against the spread); y uses (d - delta).
// Rows of huge values (sum |s| > 2^50): the statistics are taken on s * 2^-76 (exact) so that the fp32
// sums of s and d^2 cannot overflow (one -1e30 element made d^2 inf), mean and rstd stored unscaled
// (layernorm_residual_kernel.cuh: kLnDown, ln_row_scale).
//
// Kernel shapes by n (fwd_config; the row stays in registers, read once, written once):
//   n <= 1024          a warp per row, 4 rows a block, EPL = 8, 16, 24 or 32 elements a lane
//                      (768: 24 = three 16-byte packs of fp16 or six of fp32; 1024: 32); shuffles only.
//   1024 < n <= 16384  a block per row, 16 elements a thread, ceil(n / 16) threads rounded up to warps.
//   n > 16384          fwd_stats_kernel (a block per row looping over segments of 16384 columns, two
//                      passes) writes mean and rstd; then fwd_kernel normalises one segment per block.
#include "cuda/launch.h"
#include "cuda/layernorm_residual_kernel.cuh"

namespace fastbert::cuda {
namespace {
using namespace ln;

// mean and rstd from m1 and q = (sum of d, sum of d^2), d = s - m1; delta = mean - m1.
// big: the sums are of s * 2^-76; mean and rstd then stay in those scaled units (rstd = 1 / sqrt(var +
// eps) / sc, where eps * sc^2 underflows: min(1 / sqrt(var), 1 / (sqrt(eps) sc))).
__device__ __forceinline__ void finish_stats(float m1, const float (&q)[2], int64_t n, float eps, bool big,
                                             float& delta, float& mean, float& rstd) {
  const float inv_n = 1.0f / static_cast<float>(n);
  delta = q[0] * inv_n;
  const float var = fmaxf(q[1] * inv_n - delta * delta, 0.0f);
  mean = m1 + delta;
  rstd = big ? fminf(1.0f / sqrtf(var), kLnUp / sqrtf(eps))
             : 1.0f / sqrtf(var + eps);  // correctly rounded sqrt and division (once per row)
}

// Row threadIdx.y of block blockIdx.x (blockDim.y rows a block), segment blockIdx.y of
// blockDim.x * EPL columns. One segment (gridDim.y == 1): computes and writes mean / rstd.
// Several: reads them (written by fwd_stats_kernel). y: contiguous [rows, n] in T; weight, bias:
// fp32 [n]; mean, rstd: fp32 [rows]. Only the blockDim.x == 32 shape has several rows a block.
template <typename T, int EPL, bool VEC>
__global__ void __launch_bounds__(EPL > 16 ? 128 : 1024) fwd_kernel(Src<T> in, const float* __restrict__ weight,
                                                    const float* __restrict__ bias, T* __restrict__ y,
                                                    float* __restrict__ mean, float* __restrict__ rstd, float eps) {
  constexpr int V = VEC ? kVec<T> : 1, NV = EPL / V;
  __shared__ float red[2][32][2];
  const int tpr = blockDim.x, tx = threadIdx.x;
  const int64_t n = in.n, row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= in.rows) return;  // whole warps, and only when blockDim.y > 1 (no barriers then)
  const int64_t seg0 = static_cast<int64_t>(blockIdx.y) * tpr * EPL;
  const uint64_t seed = in.drop.seed != nullptr ? static_cast<uint64_t>(*in.drop.seed) : 0;
  const auto col = [&](int k) { return pack_col<V, NV>(seg0, tx, k); };

  const uint32_t keep = row_keep_bits<V, NV>(in.drop, seed, row, n, seg0, tx);
  float s[NV][V], sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    load_s<T, V>(s[k], in, row, col(k), keep >> (k * V));
#pragma unroll
    for (int j = 0; j < V; ++j) sum[0] += s[k][j], sum[1] += fabsf(s[k][j]) * kLnDown;  // zeros beyond n
  }
  float m1, delta = 0.0f, r;
  if (gridDim.y == 1) {
    int slot = 0;
    group_sum(sum, red, slot);
    const bool big = sum[1] > kLnBigSum;  // the same for the whole row (every thread of a multi-warp row)
    if (big) {  // rare: statistics (and y) on s * 2^-76
      float t[1] = {0.0f};
#pragma unroll
      for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int j = 0; j < V; ++j) s[k][j] *= kLnDown, t[0] += s[k][j];
      group_sum(t, red, slot);
      sum[0] = t[0];
    }
    m1 = sum[0] / static_cast<float>(n);
    float q[2] = {0.0f, 0.0f};
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (col(k) >= n) continue;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = s[k][j] - m1;
        q[0] += d;
        q[1] += d * d;
      }
    }
    group_sum(q, red, slot);
    float mu;
    finish_stats(m1, q, n, eps, big, delta, mu, r);
    if (tx == 0) {
      mean[row] = big ? mu * kLnUp : mu;
      rstd[row] = big ? r * kLnDown : r;
    }
  } else {
    const LnRowScale t = ln_row_scale(mean[row], rstd[row]);
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) s[k][j] *= t.sc;
    m1 = t.msc;
    r = t.rsc;
  }
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c = col(k);
    if (c >= n) continue;
    const Pack<float, V> w = load<V>(weight + c), b = load<V>(bias + c);
    float o[V];
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = ((s[k][j] - m1) - delta) * r * w.v[j] + b.v[j];
    store<V>(y + row * n + c, o);
  }
}

// Rows longer than one block holds: mean and rstd of row blockIdx.x, looping over segments of
// blockDim.x * EPL columns with fwd_kernel's layout; pass 1 sums s, pass 2 recomputes s and sums d
// and d^2. blockDim.y == 1.
template <typename T, int EPL, bool VEC>
__global__ void __launch_bounds__(
    1024) fwd_stats_kernel(Src<T> in, float* __restrict__ mean, float* __restrict__ rstd, float eps) {
  constexpr int V = VEC ? kVec<T> : 1, NV = EPL / V;
  __shared__ float red[2][32][2];
  const int tpr = blockDim.x, tx = threadIdx.x;
  const int64_t n = in.n, row = blockIdx.x, seg = static_cast<int64_t>(tpr) * EPL;
  const uint64_t seed = in.drop.seed != nullptr ? static_cast<uint64_t>(*in.drop.seed) : 0;
  int slot = 0;
  float sum[2] = {0.0f, 0.0f}, q[2] = {0.0f, 0.0f}, s[V];
  for (int64_t seg0 = 0; seg0 < n; seg0 += seg) {
    const uint32_t keep = row_keep_bits<V, NV>(in.drop, seed, row, n, seg0, tx);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      load_s<T, V>(s, in, row, pack_col<V, NV>(seg0, tx, k), keep >> (k * V));
#pragma unroll
      for (int j = 0; j < V; ++j) sum[0] += s[j], sum[1] += fabsf(s[j]) * kLnDown;
    }
  }
  group_sum(sum, red, slot);
  const bool big = sum[1] > kLnBigSum;  // rows of huge values: statistics of s * 2^-76
  const float sc = big ? kLnDown : 1.0f;
  if (big) {  // rare: the sum again, scaled
    float t[1] = {0.0f};
    for (int64_t seg0 = 0; seg0 < n; seg0 += seg) {
      const uint32_t keep = row_keep_bits<V, NV>(in.drop, seed, row, n, seg0, tx);
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        load_s<T, V>(s, in, row, pack_col<V, NV>(seg0, tx, k), keep >> (k * V));
#pragma unroll
        for (int j = 0; j < V; ++j) t[0] += s[j] * sc;
      }
    }
    group_sum(t, red, slot);
    sum[0] = t[0];
  }
  const float m1 = sum[0] / static_cast<float>(n);
  for (int64_t seg0 = 0; seg0 < n; seg0 += seg) {
    const uint32_t keep = row_keep_bits<V, NV>(in.drop, seed, row, n, seg0, tx);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t c = pack_col<V, NV>(seg0, tx, k);
      if (c >= n) continue;
      load_s<T, V>(s, in, row, c, keep >> (k * V));
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = s[j] * sc - m1;
        q[0] += d;
        q[1] += d * d;
      }
    }
  }
  group_sum(q, red, slot);
  float delta, mu, r;
  finish_stats(m1, q, n, eps, big, delta, mu, r);
  if (tx == 0) {
    mean[row] = big ? mu * kLnUp : mu;
    rstd[row] = big ? r * kLnDown : r;
  }
}

// ---- host side ------------------------------------------------------------------------------------
constexpr int64_t kWarpMaxN = 32 * 32, kBlockEpl = 16, kMaxTpr = 1024;

struct FwdConfig {
  int epl, tpr, rows_per_block;  // elements a thread, threads a row, rows a block
  int64_t segments;              // column segments of tpr * epl (grid.y)
};

FwdConfig fwd_config(int64_t n) {
  if (n <= kWarpMaxN) return {static_cast<int>(ceil_div(ceil_div(n, 32), 8) * 8), 32, 4, 1};
  if (n <= kMaxTpr * kBlockEpl)
    return {static_cast<int>(kBlockEpl), static_cast<int>(ceil_div(ceil_div(n, kBlockEpl), 32) * 32), 1, 1};
  return {static_cast<int>(kBlockEpl), static_cast<int>(kMaxTpr), 1, ceil_div(n, kMaxTpr * kBlockEpl)};
}

template <typename T, int EPL, bool VEC>
cudaError_t launch_fwd(const Src<T>& in, const FwdConfig& cfg, const float* w, const float* b, T* y, float* mean,
                       float* rstd, float eps, cudaStream_t stream) {
  const int64_t blocks = ceil_div(in.rows, cfg.rows_per_block);
  if (blocks > 0x7fffffff || cfg.segments > 65535) return cudaErrorInvalidValue;  // grid too large
  if constexpr (EPL == kBlockEpl) {
    if (cfg.segments > 1) {
      fwd_stats_kernel<T, EPL, VEC><<<static_cast<unsigned>(in.rows), cfg.tpr, 0, stream>>>(in, mean, rstd, eps);
      if (const cudaError_t err = cudaGetLastError()) return err;
    }
  }
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(cfg.segments));
  fwd_kernel<T, EPL, VEC><<<grid, dim3(cfg.tpr, cfg.rows_per_block), 0, stream>>>(in, w, b, y, mean, rstd, eps);
  return cudaGetLastError();
}

template <typename T, bool VEC>
cudaError_t launch_fwd_epl(const Src<T>& in, const FwdConfig& cfg, const float* w, const float* b, T* y, float* mean,
                           float* rstd, float eps, cudaStream_t stream) {
  switch (cfg.epl) {
    case 8: return launch_fwd<T, 8, VEC>(in, cfg, w, b, y, mean, rstd, eps, stream);
    case 16: return launch_fwd<T, 16, VEC>(in, cfg, w, b, y, mean, rstd, eps, stream);
    case 24: return launch_fwd<T, 24, VEC>(in, cfg, w, b, y, mean, rstd, eps, stream);
    case 32: return launch_fwd<T, 32, VEC>(in, cfg, w, b, y, mean, rstd, eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t layernorm_residual_fwd(DType dt, const void* x, const void* residual, const float* weight,
                                   const float* bias, const float* x_bias, const int64_t* seed, double dropout_p,
                                   float eps, void* y, float* mean, float* rstd, int64_t rows, int64_t n,
                                   cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  const FwdConfig cfg = fwd_config(n);
  const Dropout drop{seed, seed != nullptr ? philox::threshold(dropout_p) : 0u,
                     seed != nullptr ? philox::scale(dropout_p) : 1.0f};
  const auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Src<T> in{static_cast<const T*>(x), static_cast<const T*>(residual), x_bias, drop, rows, n};
    const bool vec = n % kVec<T> == 0 && aligned16(x) && aligned16(residual) && aligned16(y) && aligned16(weight) &&
                     aligned16(bias) && (x_bias == nullptr || aligned16(x_bias));
    T* out = static_cast<T*>(y);
    return vec ? launch_fwd_epl<T, true>(in, cfg, weight, bias, out, mean, rstd, eps, stream)
               : launch_fwd_epl<T, false>(in, cfg, weight, bias, out, mean, rstd, eps, stream);
  };
  switch (dt) {
    case DType::f32: return run(Tag<float>{});
    case DType::f16: return run(Tag<__half>{});
    case DType::bf16: return run(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastbert::cuda
