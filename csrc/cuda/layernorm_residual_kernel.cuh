#pragma once
// Device helpers of the layernorm_residual kernels (layernorm_residual_{fwd,bwd}_kernel.cu):
// fp32 16-byte stores (storage helpers: cuda/common.cuh), the dropout keep bits of a warp's chunk (shared Philox
// stream, common/philox.h), the row-group sum and the recomputation of s = dropout(x + x_bias) + res.
//
// Row layout (forward and backward): a row (or, for very long rows, a column segment of it starting
// at column seg0) is held by a row group of tpr = blockDim.x threads (a warp, or a whole block);
// threadIdx.y picks the row group. Thread tx = 32 w + lane holds NV packs of V adjacent elements,
// EPL = NV V elements; pack k covers columns
//   pack_col(seg0, tx, k) = seg0 + ((w NV + k) 32 + lane) V  ..  + V - 1,
// so warp w owns 32 EPL consecutive columns, and at each k its 32 packs are consecutive (a "chunk" of
// 32 V columns: coalesced loads, and the unit of the dropout keep bits). A thread's packs lie at
// compile-time distances (k 32 V), so one base address serves all of them (few registers).
// V = 16 / sizeof(T) (16-byte accesses) when n % V == 0 and every pointer is 16-byte aligned, else 1.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/philox.h"
#include "cuda/common.cuh"

namespace fastbert::cuda::ln {

// V fp32 values to p (16-byte aligned when V > 1): V / 4 16-byte stores.
template <int V>
__device__ __forceinline__ void store_f32(float* p, const float (&v)[V]) {
  if constexpr (V == 1) {
    *p = v[0];
  } else {
#pragma unroll
    for (int k = 0; k < V; k += 4)
      store16(p + k, __float_as_uint(v[k]), __float_as_uint(v[k + 1]), __float_as_uint(v[k + 2]),
              __float_as_uint(v[k + 3]));
  }
}

// First column of pack k of thread tx in a segment starting at column seg0 (layout above).
template <int V, int NV>
__device__ __forceinline__ int64_t pack_col(int64_t seg0, int tx, int k) {
  return seg0 + (static_cast<int64_t>((tx >> 5) * NV + k) * 32 + (tx & 31)) * V;
}

// ---- dropout --------------------------------------------------------------------------------------
// Dropout of one call: seed (int64 [1] on the device, read in the kernels) is null when inactive;
// keep iff (r >> 8) >= thr; kept values are multiplied by scale (philox::threshold / scale of p).
struct Dropout {
  const int64_t* seed;
  uint32_t thr;
  float scale;
};

// Keep bits of a warp's chunk of 32 * V consecutive elements e0 .. e0 + 32V - 1 of the flat [rows, n]
// index (e0 % V == 0, any e0 % 64); lane L gets the bits of its pack e0 + L V .. e0 + L V + V - 1
// (bit j for element e0 + L V + j). Warp-collective: all 32 lanes must call it together.
// Stream (philox.h): element e = 64 g + 16 o + i takes output o of counter 16 g + i. The chunk spans
// groups g0 .. g0 + ng - 1 (ng <= kMaxGroups); lane L computes counter L % 16 of groups g0 + 2q + L / 16
// for q < ceil(ng / 2), and a ballot per output gives every lane the bits: bit m of word (q, o) =
// keep of element 64 (g0 + 2q + m / 16) + 16 o + m % 16. Cost: one Philox call per 4 elements when
// the chunk is 64-aligned and V >= 2 (the vector path with n % 64 == 0: 768, 1024, ...), up to 2x
// that for other alignments, one per element on the scalar path (V = 1).
// A lane's V elements lie in one run of 16 (their first index is a multiple of V, and V divides 16),
// so they share (q, o) and take V adjacent bits of one word.
template <int V>
__device__ __forceinline__ uint32_t keep_bits(uint64_t seed, uint64_t e0, uint32_t thr, int lane) {
  constexpr int kMaxGroups = (32 * V + 62) / 64 + 1, kMaxQ = (kMaxGroups + 1) / 2;
  const uint64_t g0 = e0 >> 6;
  const int ng = static_cast<int>(((e0 + 32 * V - 1) >> 6) - g0) + 1;
  const uint64_t e = e0 + static_cast<uint64_t>(lane) * V;
  const int G = static_cast<int>((e >> 6) - g0), q = G >> 1, o = static_cast<int>(e >> 4) & 3;
  const int m = ((G & 1) << 4) | static_cast<int>(e & 15);
  uint32_t word = 0;
#pragma unroll
  for (int qq = 0; qq < kMaxQ; ++qq) {
    if (2 * qq >= ng) break;  // warp-uniform
    const uint64_t counter = 16 * (g0 + 2 * qq + (lane >> 4)) + (lane & 15);
    const philox::U4 r = philox::philox4x32(seed, counter);
#pragma unroll
    for (int oo = 0; oo < 4; ++oo) {
      const uint32_t w = __ballot_sync(0xffffffffu, philox::keep(r.v[oo], thr));
      word = qq == q && oo == o ? w : word;  // selects: no local-memory array
    }
  }
  return (word >> m) & ((1u << V) - 1u);
}

// s = dropout(x + x_bias) + residual for one pack, in fp32: h = x + xb; h = keep ? h * scale : 0;
// s = h + res, each step rounded like eager fp32 (no FMA contraction), so forward and backward
// recompute the same s.
template <typename T, int V>
__device__ __forceinline__ void make_s(float (&s)[V], const Pack<T, V>& xv, const Pack<T, V>& rv, const float (&xb)[V],
                                       bool drop, uint32_t keep, float scale) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    float h = __fadd_rn(to_f(xv.v[j]), xb[j]);
    if (drop) h = (keep >> j & 1u) ? __fmul_rn(h, scale) : 0.0f;
    s[j] = __fadd_rn(h, to_f(rv.v[j]));
  }
}

// ---- inputs ---------------------------------------------------------------------------------------
// Pointers and sizes of one call, all contiguous: x, res [rows, n] in T; xb fp32 [n] or null.
template <typename T>
struct Src {
  const T* x;
  const T* res;
  const float* xb;
  Dropout drop;
  int64_t rows, n;
};

// Keep bits of the thread's NV packs of row `row` in a segment starting at column seg0 (bit k V + j:
// element j of pack k; EPL = NV V <= 32 bits); all ones without dropout. Warp-collective. The loop
// over packs is not unrolled, so the Philox rounds of different packs are not interleaved (that
// raised register pressure into spills).
template <int V, int NV>
__device__ __forceinline__ uint32_t row_keep_bits(const Dropout& drop, uint64_t seed, int64_t row, int64_t n,
                                                  int64_t seg0, int tx) {
  if (drop.seed == nullptr) return 0xffffffffu;
  const int lane = tx & 31;
  uint32_t keep = 0;
#pragma unroll 1
  for (int k = 0; k < NV; ++k) {
    const int64_t cw = pack_col<V, NV>(seg0, tx - lane, k);  // the warp's chunk
    if (cw < n) keep |= keep_bits<V>(seed, static_cast<uint64_t>(row * n + cw), drop.thr, lane) << (k * V);
  }
  return keep;
}

// s of the pack of V elements at column c of row `row` (c a multiple of V; c >= n: zeros), keep:
// the pack's keep bits (bit j for element j).
template <typename T, int V>
__device__ __forceinline__ void load_s(float (&s)[V], const Src<T>& in, int64_t row, int64_t c, uint32_t keep) {
  if (c < in.n) {
    float xb[V] = {};
    if (in.xb != nullptr) {
      const Pack<float, V> b = load<V>(in.xb + c);
#pragma unroll
      for (int j = 0; j < V; ++j) xb[j] = b.v[j];
    }
    const int64_t off = row * in.n + c;
    make_s<T, V>(s, load<V>(in.x + off), load<V>(in.res + off), xb, in.drop.seed != nullptr, keep, in.drop.scale);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) s[j] = 0.0f;
  }
}

// ---- row-group sums -------------------------------------------------------------------------------
// Sums v[0 .. N-1] (N <= 2) over the row group (the blockDim.x threads of row group threadIdx.y);
// every thread of the group ends with the same bits. Warp: butterfly shuffles (each pair adds the
// same two values, a + b == b + a). blockDim.x > 32: lane 0 of each warp writes its sums to
// red[slot][warp], one barrier, then every thread adds its group's warps in warp order. The slot
// alternates between calls, so one barrier per call suffices (a thread at call k + 2 has passed call
// k + 1's barrier, which every thread reaches only after reading call k's slot). With
// blockDim.x > 32 every thread of the block must make the call (it contains __syncthreads).
template <int N>
__device__ __forceinline__ void group_sum(float (&v)[N], float (&red)[2][32][2], int& slot);

// Rows of huge values (sum |s| above 2^50, e.g. one -1e30 or +-3e38 elements) would overflow fp32
// sums of s and of (s - mean)^2: their statistics are taken on s * 2^-76 (a power of two: exact), and
// mean / rstd are stored unscaled (rstd may be subnormal). kBigSum: 2^50 * 2^-76, the test on
// sum(|s| * 2^-76). Rows below are untouched (scale 1: the same bits as without it).
constexpr float kLnDown = 0x1p-76f, kLnUp = 0x1p76f, kLnBigSum = 0x1p-26f;

// (s - mean) * rstd from the saved statistics: for rows of huge values (|mean| > 2^50 or rstd < 2^-50)
// as (s sc - mean sc) (rstd / sc), so that s - mean cannot overflow and a subnormal rstd is scaled
// up before it multiplies. ln_row_scale gives (sc, mean sc, rstd / sc) once per row.
struct LnRowScale {
  float sc, msc, rsc;
};
__device__ __forceinline__ LnRowScale ln_row_scale(float mean, float rstd) {
  const bool big = fabsf(mean) > 0x1p50f || rstd < 0x1p-50f;
  const float sc = big ? kLnDown : 1.0f;
  return {sc, mean * sc, rstd * (big ? kLnUp : 1.0f)};
}
__device__ __forceinline__ float ln_s_hat(float s, const LnRowScale& t) { return (s * t.sc - t.msc) * t.rsc; }

template <int N>
__device__ __forceinline__ void group_sum(float (&v)[N], float (&red)[2][32][2], int& slot) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  if (blockDim.x == 32) return;
  const int nw = blockDim.x >> 5, w0 = threadIdx.y * nw;
  if ((threadIdx.x & 31) == 0)
#pragma unroll
    for (int i = 0; i < N; ++i) red[slot][w0 + (threadIdx.x >> 5)][i] = v[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float t = 0.0f;
    for (int k = 0; k < nw; ++k) t += red[slot][w0 + k][i];
    v[i] = t;
  }
  slot ^= 1;
}

}  // namespace fastbert::cuda::ln
