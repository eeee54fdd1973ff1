// bias + dropout + residual + LayerNorm, backward: CUDA kernels and host launcher (launch.h; glue:
// layernorm_residual.cpp; device helpers and the thread layout: layernorm_residual_kernel.cuh).
// Per row (n columns), with s_hat = (s - mean) * rstd, y = s_hat * w + b and g = grad * w:
//   d s_hat_j / d s_i = rstd * (delta_ij - 1/n - s_hat_i * s_hat_j / n), hence
//   ds = rstd * (g - mean(g) - s_hat * mean(g * s_hat))
//   dresidual = ds;   dx = ds * keep * scale (dropout; without it dx = ds and is not written)
//   dweight = sum over rows of grad * s_hat;   dbias = sum of grad;   dx_bias = sum of dx (or ds)
// s and the keep mask are recomputed from x, x_bias, residual and the seed exactly as the forward
// does (make_s, keep_bits); mean and rstd come from the forward.
// Column sums in two deterministic stages, no atomics: block b of bwd_kernel owns rows
// [b * rows_per_block, (b + 1) * rows_per_block); its row group y takes rows y, y + groups, ... in
// order, summing into registers, then the groups add up in group order into partial[b] (fp32
// [nacc, n]); sum_partials_kernel adds partial[0 .. blocks - 1] in a fixed order. The plan depends on
// (rows, n) alone, so for the same inputs the gradients are bitwise the same on any GPU.
// Shapes (bwd_config). 8 elements a thread keep the per-thread state (the row's loads, s_hat, g and
// three column sums) in registers without spills (ptxas: 87-122 registers on the vector path); the
// next row of the row group is prefetched into L2 while this one computes:
//   n <= 256           a warp per row, 8 row groups (256 threads) a block; shuffles only
//   256 < n <= 4096    ceil(n / 8) threads a row rounded up to warps (768: 96, 1024: 128), 256 / tpr
//                      row groups a block (at least one); one barrier a row for the row sums
//   n > 4096           512 threads per segment of 4096 columns (grid.y); bwd_stats_kernel first writes
//                      each row's sums of g and g * s_hat to row_stats (a block per row, looping)
#include <algorithm>

#include "cuda/launch.h"
#include "cuda/layernorm_residual_kernel.cuh"

namespace fastbert::cuda {
namespace {
using namespace ln;

constexpr int kEpl = 8;                // elements a thread
constexpr int kMaxTpr = 512;           // threads a row (segment)
constexpr int kMaxCombineTpr = 128;    // row groups share a block only up to this tpr
constexpr int64_t kTargetBlocks = 512, kMinRowsPerGroup = 4;

// Asks for the 128-byte line holding p to be brought into L2 (no registers, no wait).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// grad, dres, dx: contiguous [rows, n] in T (dx null without dropout); weight: fp32 [n]; mean, rstd:
// fp32 [rows]; row_stats: fp32 [rows, 2] (sums of g and g * s_hat) when the row spans several
// segments (gridDim.y > 1), else null; partial: fp32 [gridDim.x, nacc, n], nacc = x_bias ? 3 : 2
// (dweight, dbias, dx_bias). rows_per_block % blockDim.y == 0, so every row group makes the same
// number of trips (the row sums contain barriers when blockDim.x > 32).
template <typename T, int EPL, bool VEC>
__global__ void __launch_bounds__(kMaxTpr)
bwd_kernel(Src<T> in, const T* __restrict__ grad, const float* __restrict__ weight, const float* __restrict__ mean,
           const float* __restrict__ rstd, const float* __restrict__ row_stats, T* __restrict__ dres,
           T* __restrict__ dx, float* __restrict__ partial, int64_t rows_per_block) {
  constexpr int V = VEC ? kVec<T> : 1, NV = EPL / V;
  __shared__ float red[2][32][2];
  __shared__ float comb[3 * EPL * kMaxCombineTpr];
  const int tpr = blockDim.x, groups = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int nacc = in.xb != nullptr ? 3 : 2;
  const int64_t n = in.n, seg0 = static_cast<int64_t>(blockIdx.y) * tpr * EPL;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < in.rows ? r0 + rows_per_block : in.rows;
  const bool drop = in.drop.seed != nullptr;
  const uint64_t seed = drop ? static_cast<uint64_t>(*in.drop.seed) : 0;
  const float inv_n = 1.0f / static_cast<float>(n);
  // Columns in 32 bits (the launcher requires n < 2^31): fewer registers than 64-bit indices.
  const int ni = static_cast<int>(n), c0 = static_cast<int>(pack_col<V, NV>(seg0, tx, 0));
  const auto col = [&](int k) { return c0 + k * 32 * V; };

  float acc[3][NV][V];  // the thread's column sums (dweight, dbias, dx_bias terms)
#pragma unroll
  for (int k = 0; k < NV; ++k)
#pragma unroll
    for (int j = 0; j < V; ++j) acc[0][k][j] = acc[1][k][j] = acc[2][k][j] = 0.0f;
  int slot = 0;
  for (int64_t row = r0 + ty; row < r0 + rows_per_block; row += groups) {
    const bool active = row < r1;  // the same for the whole row group, so warp-uniform
    if (row + groups < r1) {       // the next row's lines, while this row computes
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (col(k) >= ni) continue;
        const int64_t off = (row + groups) * n + col(k);
        prefetch_l2(in.x + off);
        prefetch_l2(in.res + off);
        prefetch_l2(grad + off);
      }
    }
    float sh[NV][V], g[NV][V], sums[2] = {0.0f, 0.0f}, rs = 0.0f;
    uint32_t keep = 0;
    if (active) {
      keep = row_keep_bits<V, NV>(in.drop, seed, row, n, seg0, tx);
      const LnRowScale rsc = ln_row_scale(mean[row], rstd[row]);  // rows of huge values: scaled s - mean
      rs = rstd[row];
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int c = col(k);
        const bool in_row = c < ni;
        const int64_t off = row * n + c;
        // weight and x_bias are re-read every row (L1 hits): registers are the scarce resource here
        const Pack<T, V> gv = in_row ? load<V>(grad + off) : Pack<T, V>{};
        const Pack<float, V> wv = in_row ? load<V>(weight + c) : Pack<float, V>{};
        const Pack<float, V> bv = in_row && in.xb != nullptr ? load<V>(in.xb + c) : Pack<float, V>{};
        float s[V];
        make_s<T, V>(s, in_row ? load<V>(in.x + off) : Pack<T, V>{}, in_row ? load<V>(in.res + off) : Pack<T, V>{},
                     bv.v, drop, keep >> (k * V), in.drop.scale);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float gr = to_f(gv.v[j]);  // zero beyond n
          sh[k][j] = in_row ? ln_s_hat(s[j], rsc) : 0.0f;
          g[k][j] = gr * wv.v[j];
          acc[0][k][j] += gr * sh[k][j];
          acc[1][k][j] += gr;
          sums[0] += g[k][j];
          sums[1] += g[k][j] * sh[k][j];
        }
      }
    }
    if (row_stats == nullptr) {
      group_sum(sums, red, slot);  // every row group, active or not: it may contain a barrier
    } else if (active) {
      sums[0] = row_stats[2 * row];
      sums[1] = row_stats[2 * row + 1];
    }
    if (active) {
      // an infinite g (dy * w): eager's row of ds is all NaN (inf - inf in LayerNorm's backward)
      const float mg = sums[0] * inv_n, mgs = isfinite(mg) ? sums[1] * inv_n : NAN;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int c = col(k);
        if (c >= ni) continue;
        float ds[V], dxv[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          ds[j] = rs * (g[k][j] - mg - sh[k][j] * mgs);
          dxv[j] = !drop ? ds[j] : (keep >> (k * V + j) & 1u) ? ds[j] * in.drop.scale : 0.0f;
          acc[2][k][j] += dxv[j];
        }
        store<V>(dres + row * n + c, ds);
        if (drop) store<V>(dx + row * n + c, dxv);
      }
    }
  }

  // Block sums: row group 0, then 1, ... add theirs through comb (the same index for the same
  // thread column in every group); the last group writes partial[blockIdx.x].
  float* out = partial + static_cast<int64_t>(blockIdx.x) * nacc * n;
  for (int yy = 0; yy < groups; ++yy) {
    if (ty == yy) {
#pragma unroll
      for (int t = 0; t < 3; ++t) {
        if (t >= nacc) break;
#pragma unroll
        for (int k = 0; k < NV; ++k) {
          float v[V];
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const int i = ((t * NV + k) * V + j) * tpr + tx;  // < 3 * EPL * kMaxCombineTpr
            v[j] = yy == 0 ? acc[t][k][j] : comb[i] + acc[t][k][j];
            if (yy + 1 < groups) comb[i] = v[j];
          }
          if (yy + 1 == groups && col(k) < ni) store_f32<V>(out + t * n + col(k), v);
        }
      }
    }
    if (yy + 1 < groups) __syncthreads();
  }
}

// Rows spanning several segments: row_stats[row] = (sum of g, sum of g * s_hat) for row blockIdx.x,
// looping over segments of blockDim.x * EPL columns with bwd_kernel's layout. blockDim.y == 1.
template <typename T, int EPL, bool VEC>
__global__ void __launch_bounds__(kMaxTpr)
bwd_stats_kernel(Src<T> in, const T* __restrict__ grad, const float* __restrict__ weight,
                 const float* __restrict__ mean, const float* __restrict__ rstd, float* __restrict__ row_stats) {
  constexpr int V = VEC ? kVec<T> : 1, NV = EPL / V;
  __shared__ float red[2][32][2];
  const int tpr = blockDim.x, tx = threadIdx.x;
  const int64_t n = in.n, row = blockIdx.x, seg = static_cast<int64_t>(tpr) * EPL;
  const uint64_t seed = in.drop.seed != nullptr ? static_cast<uint64_t>(*in.drop.seed) : 0;
  const LnRowScale rsc = ln_row_scale(mean[row], rstd[row]);  // rows of huge values: scaled s - mean
  float sums[2] = {0.0f, 0.0f}, s[V];
  for (int64_t seg0 = 0; seg0 < n; seg0 += seg) {
    const uint32_t keep = row_keep_bits<V, NV>(in.drop, seed, row, n, seg0, tx);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t c = pack_col<V, NV>(seg0, tx, k);
      if (c >= n) continue;
      load_s<T, V>(s, in, row, c, keep >> (k * V));
      const Pack<T, V> gv = load<V>(grad + row * n + c);
      const Pack<float, V> wv = load<V>(weight + c);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float g = to_f(gv.v[j]) * wv.v[j];
        sums[0] += g;
        sums[1] += g * ln_s_hat(s[j], rsc);
      }
    }
  }
  int slot = 0;
  group_sum(sums, red, slot);
  if (tx == 0) {
    row_stats[2 * row] = sums[0];
    row_stats[2 * row + 1] = sums[1];
  }
}

// Stage 2: column m of the [nacc, n] sums (m = t * n + c) = sum over j < blocks of
// partial[j, t, c], in a fixed order: thread (x, y) adds j = y, y + kSumY, ... in order, then y = 0
// adds the kSumY sums in order. Writes dweight (t = 0), dbias (1), dx_bias (2).
constexpr int kSumX = 32, kSumY = 32;
__global__ void __launch_bounds__(kSumX * kSumY)
sum_partials_kernel(const float* __restrict__ partial, int64_t blocks, int64_t n, int nacc, float* __restrict__ dweight,
                    float* __restrict__ dbias, float* __restrict__ dx_bias) {
  __shared__ float red[kSumY][kSumX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t cols = nacc * n, m = static_cast<int64_t>(blockIdx.x) * kSumX + tx;
  float s = 0.0f;
  for (int64_t j = ty; j < blocks && m < cols; j += kSumY) s += partial[j * cols + m];
  red[ty][tx] = s;
  __syncthreads();
  if (ty != 0 || m >= cols) return;
  float t = 0.0f;
#pragma unroll
  for (int j = 0; j < kSumY; ++j) t += red[j][tx];
  const int64_t which = m / n, c = m - which * n;
  (which == 0 ? dweight : which == 1 ? dbias : dx_bias)[c] = t;
}

// ---- host side ------------------------------------------------------------------------------------
struct BwdConfig {
  int tpr, groups;   // threads a row (segment), row groups a block
  int64_t segments;  // column segments of tpr * kEpl (grid.y)
};

BwdConfig bwd_config(int64_t n) {
  if (n <= 32 * kEpl) return {32, 8, 1};
  const int64_t tpr = ceil_div(ceil_div(n, kEpl), 32) * 32;
  if (tpr <= kMaxTpr) return {static_cast<int>(tpr), tpr <= kMaxCombineTpr ? static_cast<int>(256 / tpr) : 1, 1};
  return {kMaxTpr, 1, ceil_div(n, int64_t{kMaxTpr} * kEpl)};
}

template <typename T, bool VEC>
cudaError_t launch_bwd(const Src<T>& in, const BwdConfig& cfg, const LayerNormResidualBwdPlan& plan, const T* grad,
                       const float* weight, const float* mean, const float* rstd, T* dres, T* dx, float* partial,
                       float* row_stats, cudaStream_t stream) {
  if (cfg.segments > 1) {
    bwd_stats_kernel<T, kEpl, VEC>
        <<<static_cast<unsigned>(in.rows), cfg.tpr, 0, stream>>>(in, grad, weight, mean, rstd, row_stats);
    if (const cudaError_t err = cudaGetLastError()) return err;
  }
  const dim3 grid(static_cast<unsigned>(plan.blocks), static_cast<unsigned>(cfg.segments));
  bwd_kernel<T, kEpl, VEC><<<grid, dim3(cfg.tpr, cfg.groups), 0, stream>>>(
      in, grad, weight, mean, rstd, cfg.segments > 1 ? row_stats : nullptr, dres, dx, partial, plan.rows_per_block);
  return cudaGetLastError();
}

}  // namespace

LayerNormResidualBwdPlan layernorm_residual_bwd_plan(int64_t rows, int64_t n) {
  if (rows <= 0 || n <= 0) return {1, 0, false};
  const BwdConfig cfg = bwd_config(n);
  const int64_t per_group = std::max(kMinRowsPerGroup, ceil_div(rows, kTargetBlocks * cfg.groups));
  const int64_t rows_per_block = per_group * cfg.groups;
  return {rows_per_block, ceil_div(rows, rows_per_block), cfg.segments > 1};
}

cudaError_t layernorm_residual_bwd(DType dt, const void* grad, const void* x, const void* residual, const float* weight,
                                   const float* x_bias, const int64_t* seed, double dropout_p, const float* mean,
                                   const float* rstd, void* dresidual, void* dx, float* dweight, float* dbias,
                                   float* dx_bias, float* partial, float* row_stats, int64_t rows, int64_t n,
                                   const LayerNormResidualBwdPlan& plan, cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  const BwdConfig cfg = bwd_config(n);
  const LayerNormResidualBwdPlan want = layernorm_residual_bwd_plan(rows, n);
  const bool bad_plan =
      plan.rows_per_block != want.rows_per_block || plan.blocks != want.blocks || plan.row_stats != want.row_stats;
  const bool missing = partial == nullptr || (plan.row_stats && row_stats == nullptr) ||
                       (seed != nullptr && dx == nullptr) || (x_bias != nullptr && dx_bias == nullptr);
  const bool too_large = n > 0x7fffffff - 32 * kEpl * kMaxTpr || cfg.segments > 65535 ||
                         (cfg.segments > 1 && rows > 0x7fffffff);  // int columns; grid limits
  if (bad_plan || missing || too_large) return cudaErrorInvalidValue;
  const int nacc = x_bias != nullptr ? 3 : 2;
  const Dropout drop{seed, seed != nullptr ? philox::threshold(dropout_p) : 0u,
                     seed != nullptr ? philox::scale(dropout_p) : 1.0f};
  const auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Src<T> in{static_cast<const T*>(x), static_cast<const T*>(residual), x_bias, drop, rows, n};
    const bool vec = n % kVec<T> == 0 && aligned16(grad) && aligned16(x) && aligned16(residual) &&
                     aligned16(dresidual) && (seed == nullptr || aligned16(dx)) && aligned16(weight) &&
                     (x_bias == nullptr || aligned16(x_bias)) && aligned16(partial);
    const auto* g = static_cast<const T*>(grad);
    auto* dr = static_cast<T*>(dresidual);
    auto* dxp = static_cast<T*>(dx);
    return vec ? launch_bwd<T, true>(in, cfg, plan, g, weight, mean, rstd, dr, dxp, partial, row_stats, stream)
               : launch_bwd<T, false>(in, cfg, plan, g, weight, mean, rstd, dr, dxp, partial, row_stats, stream);
  };
  cudaError_t err = cudaErrorInvalidValue;
  switch (dt) {
    case DType::f32: err = run(Tag<float>{}); break;
    case DType::f16: err = run(Tag<__half>{}); break;
    case DType::bf16: err = run(Tag<__nv_bfloat16>{}); break;
  }
  if (err) return err;
  const unsigned sum_grid = static_cast<unsigned>(ceil_div(nacc * n, kSumX));
  sum_partials_kernel<<<sum_grid, dim3(kSumX, kSumY), 0, stream>>>(partial, plan.blocks, n, nacc, dweight, dbias,
                                                                   dx_bias);
  return cudaGetLastError();
}

}  // namespace fastbert::cuda
