#pragma once
// Device helpers of the masked_softmax kernels (masked_softmax_{fwd,bwd}_kernel.cu): the thread
// layout, row-group reductions, the dropout keep bits of a thread's packs (shared Philox stream,
// common/philox.h; the warp-collective generator ln::keep_bits of layernorm_residual_kernel.cuh) and
// the scaled, masked scores.
//
// Row layout (forward and backward). A row of Sk columns (for very long rows: a segment of it starting
// at column seg0) is held by a row group of G = blockDim.x threads: a power of two <= 32 (threadIdx.y
// then picks one of several row groups of the block, rows blockIdx.x * blockDim.y + threadIdx.y), or a
// multiple of 32 (the whole block, blockDim.y == 1). Thread t holds NV packs of V adjacent elements;
// pack k covers columns
//   col(seg0, G, t, k) = seg0 + (k G + t) V  ..  + V - 1,
// so at each k the group's packs are consecutive (coalesced). V = 16 / sizeof(T) (16-byte accesses)
// when Sk % V == 0 and the data pointers are 16-byte aligned, else 1. Columns >= Sk are padding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/philox.h"
#include "cuda/common.cuh"
#include "cuda/layernorm_residual_kernel.cuh"

namespace fastbert::cuda::sm {

using ln::Dropout;

struct NoMask {};  // the mask element type of calls without a mask (never read)

// First column of pack k of thread t (layout above). Columns are 32-bit (fewer registers than 64-bit
// ones): the launchers require Sk <= kMaxSk, so seg0 + G NV V stays below 2^31.
constexpr int64_t kMaxSk = 0x7fffffff - (1 << 16);
template <int V>
__device__ __forceinline__ int pack_col(int seg0, int G, int t, int k) {
  return seg0 + (k * G + t) * V;
}

// floor(n / d) for 0 <= n < 2^50 and d >= 1, given inv_d = 1.0 / d: the fp64 estimate is off by at
// most one, which the two tests correct (no 64-bit integer division, a slow subroutine call).
__device__ __forceinline__ int64_t div_floor(int64_t n, int64_t d, double inv_d) {
  int64_t q = static_cast<int64_t>(static_cast<double>(n) * inv_d);
  if (q * d > n)
    --q;
  else if ((q + 1) * d <= n)
    ++q;
  return q;
}

// ---- forward inputs -------------------------------------------------------------------------------
// scores, probs, soft: contiguous [rows, Sk] in T, rows = B * H * Sq (soft: the pre-dropout softmax,
// written only with dropout). mask: element (b, h, q, k) at mask + b ms[0] + h ms[1] + q ms[2] + k ms[3]
// (strides in elements, 0 for broadcast dims); M = uint8_t (bool: nonzero = attend), float, __half,
// __nv_bfloat16, or NoMask. mvec: ms[3] == 1 and every row's mask is aligned for V-element packs.
template <typename T, typename M>
struct FwdArgs {
  const T* scores;
  T* probs;
  T* soft;
  const M* mask;
  int64_t ms[4];
  int64_t H, Sq;
  double inv_H, inv_Sq;  // 1.0 / H, 1.0 / Sq
  bool mvec;
  float scale;
  Dropout drop;
  int64_t rows;
  int Sk;
};

// The mask row of row `row` = (b, h, q) (b major); null without a mask.
template <typename T, typename M>
__device__ __forceinline__ const M* mask_row(const FwdArgs<T, M>& a, int64_t row) {
  if constexpr (std::is_same_v<M, NoMask>) {
    return nullptr;
  } else {
    const int64_t bh = div_floor(row, a.Sq, a.inv_Sq), b = div_floor(bh, a.H, a.inv_H);
    return a.mask + b * a.ms[0] + (bh - b * a.H) * a.ms[1] + (row - bh * a.Sq) * a.ms[2];
  }
}

// x = s * scale + mask for the pack at column c (bool masks: s * scale where true, -inf where
// false, as masked_fill). mrow: the row's mask (mask_row).
template <typename T, typename M, int V>
__device__ __forceinline__ void scaled_masked(float (&x)[V], const Pack<T, V>& sv, float scale, const M* mrow, int c,
                                              int64_t mk, bool mvec) {
  if constexpr (std::is_same_v<M, NoMask>) {
#pragma unroll
    for (int j = 0; j < V; ++j) x[j] = to_f(sv.v[j]) * scale;
  } else {
    M mv[V];
    if (V > 1 && mvec) {
      const Pack<M, V> p = load<V>(mrow + c);
#pragma unroll
      for (int j = 0; j < V; ++j) mv[j] = p.v[j];
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) mv[j] = mrow[static_cast<int64_t>(c + j) * mk];
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if constexpr (std::is_same_v<M, uint8_t>) {
        x[j] = mv[j] != 0 ? to_f(sv.v[j]) * scale : -INFINITY;
      } else {
        x[j] = fmaf(to_f(sv.v[j]), scale, to_f(mv[j]));
      }
    }
  }
}

// x of the thread's NV packs of row `row` in the segment at seg0; -inf for padding (columns >= Sk)
// and for inactive rows (row >= rows).
template <typename T, typename M, int V, int NV>
__device__ __forceinline__ void load_x(float (&x)[NV][V], const FwdArgs<T, M>& a, int64_t row, bool active,
                                       const M* mrow, int seg0, int G, int t) {
  const T* srow = a.scores + row * a.Sk;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int c = pack_col<V>(seg0, G, t, k);
    if (active && c < a.Sk) {
      scaled_masked<T, M, V>(x[k], load<V>(srow + c), a.scale, mrow, c, a.ms[3], a.mvec);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) x[k][j] = -INFINITY;
    }
  }
}

// probs (and, with dropout, soft) of one pack at flat offset off: soft = p; probs = keep ? p * scale
// : 0 (bit j of keep for element j); without dropout probs = p.
template <typename T, int V>
__device__ __forceinline__ void store_probs(T* probs, T* soft, int64_t off, const float (&p)[V], const Dropout& drop,
                                            uint32_t keep) {
  if (drop.seed == nullptr) {
    store<V>(probs + off, p);
    return;
  }
  store<V>(soft + off, p);
  float q[V];
#pragma unroll
  for (int j = 0; j < V; ++j) q[j] = (keep >> j & 1u) ? p[j] * drop.scale : 0.0f;
  store<V>(probs + off, q);
}

// ---- backward inputs ------------------------------------------------------------------------------
// grad, soft, dscores: contiguous [rows, Sk] in T. dscores = scale * p * (g - sum(g * p)).
template <typename T>
struct BwdArgs {
  const T* grad;
  const T* soft;
  T* dscores;
  float scale;
  Dropout drop;
  int64_t rows;
  int Sk;
};

// ---- reductions -----------------------------------------------------------------------------------
// Max (kMax) or sum of v over the row group; every thread of the group ends with the same bits.
// G <= 32: butterfly shuffles within aligned groups of G lanes (each pair combines the same two
// values, and a + b == b + a). G > 32 (blockDim.y == 1): lane 0 of each warp writes to red[slot][warp],
// one barrier, then every thread combines the warps in warp order. The slot alternates between
// calls, so one barrier per call suffices (a thread writing at call k + 2 has passed call k + 1's
// barrier, which every thread reaches only after reading call k's slot). G > 32: every thread of the
// block must make the call. G <= 32: all 32 lanes of the warp (full-mask shuffles).
template <bool kMax>
__device__ __forceinline__ float group_reduce(float v, float (&red)[2][32], int& slot) {
  const int G = blockDim.x;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    if (off >= G) continue;
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  if (G <= 32) return v;
  if ((threadIdx.x & 31) == 0) red[slot][threadIdx.x >> 5] = v;
  __syncthreads();
  float r = red[slot][0];
  for (int w = 1; w < (G >> 5); ++w) r = kMax ? fmaxf(r, red[slot][w]) : r + red[slot][w];
  slot ^= 1;
  return r;
}

// ---- dropout --------------------------------------------------------------------------------------
// Keep bits of thread t's NV packs of row `row` in the segment at seg0 (bit k V + j: element j of
// pack k, flat element index e = row Sk + col; NV V <= 32); all ones without dropout. Warp-collective:
// all 32 lanes of the warp must call it together. When the warp's 32 packs at step k are 32 V
// consecutive elements of the flat [rows, Sk] index ("chunked": G >= 32, or G < 32 with one pack a
// thread and G V == Sk, the warp then covering 32 / G whole consecutive rows), ln::keep_bits draws
// them a whole 64-element Philox group at a time (one Philox call per 4 elements when aligned);
// otherwise (short rows with padding) each element draws its own (philox::element). seed: *drop.seed.
template <int V, int NV>
__device__ __forceinline__ uint32_t row_keep(const Dropout& drop, uint64_t seed, int64_t row, int Sk, int seg0, int G,
                                             int t) {
  if (drop.seed == nullptr) return 0xffffffffu;
  const int lane = (threadIdx.y * G + t) & 31;
  const bool chunked = G >= 32 || (NV == 1 && G * V == Sk);
  uint32_t keep = 0;
#pragma unroll 1
  for (int k = 0; k < NV; ++k) {
    const int c = pack_col<V>(seg0, G, t, k);
    const uint64_t e = static_cast<uint64_t>(row * Sk + c);
    if (chunked) {
      // the warp's first element e - lane V; G >= 32: skip chunks wholly beyond the row (warp-uniform)
      if (G < 32 || c - lane * V < Sk)
        keep |= ln::keep_bits<V>(seed, e - static_cast<uint64_t>(lane) * V, drop.thr, lane) << (k * V);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (c + j < Sk)
          keep |= static_cast<uint32_t>(philox::keep(philox::element(seed, e + j), drop.thr)) << (k * V + j);
    }
  }
  return keep;
}

__device__ __forceinline__ uint64_t read_seed(const Dropout& drop) {
  return drop.seed != nullptr ? static_cast<uint64_t>(*drop.seed) : 0;
}

// ---- host side: launch shapes ---------------------------------------------------------------------
struct Config {
  int nv, tpr, rows_per_block;  // packs a thread, threads a row (G), rows a block
  bool stream;
};

inline int64_t pow2_at_least(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// Rows of Sk <= warp_max_sk: G = the power of two >= the row's V-packs (at most 32) threads a row,
// rows_threads / G rows a block. Longer rows: one block a row, block_epl elements a thread, up to
// max_tpr threads; beyond that the streaming kernel (max_tpr threads). nv: the packs a thread needs
// (the launchers pick the smallest instantiated count >= nv).
inline Config row_config(int64_t Sk, int V, int64_t warp_max_sk, int64_t block_epl, int64_t max_tpr,
                         int64_t rows_threads) {
  const int64_t packs = ceil_div(Sk, V);
  if (Sk <= warp_max_sk) {
    const int64_t G = pow2_at_least(packs < 32 ? packs : 32);
    return {static_cast<int>(ceil_div(packs, G)), static_cast<int>(G), static_cast<int>(rows_threads / G), false};
  }
  const int nv = static_cast<int>(block_epl / V);
  if (Sk <= max_tpr * block_epl) return {nv, static_cast<int>(ceil_div(ceil_div(Sk, block_epl), 32) * 32), 1, false};
  return {nv, static_cast<int>(max_tpr), 1, true};
}

}  // namespace fastbert::cuda::sm
