// Masked-token gather: CUDA kernels and host launchers (launch.h; glue: gather_masked.cpp).
// Forward   f[i] = labels[i] != ignore_index;  slot[i] = f[i] ? sum_{j < i} f[j] : -1  (exclusive
//           prefix sum); index[slot[i]] = i, targets[slot[i]] = labels[i]; count = sum f = M.
//           Then (after the glue reads M) rows[m] = hidden[index[m]].
// Backward  dhidden[n] = slot[n] >= 0 ? grad[slot[n]] : 0, every element written by one kernel.
//
// Kernel shapes:
//   select_kernel       ONE block of 1024 threads walks the labels in tiles of 8192 (8 a thread,
//                       coalesced: element t0 + k * 1024 + threadIdx.x), carrying the running count
//                       across tiles, so it is serial in N / 8192 (BERT: N = 4k..64k, 1..8 tiles).
//                       Scan of a tile: warp ballots give the selected lanes' ranks (popc of the
//                       lower lanes) and each warp's count; warp 0 scans the 8 x 32 (k, warp) counts.
//   rows_kernel         grid-stride copy over rows x units, 256 threads, one resident wave; a unit
//                       is the widest of 16 / 8 / 4 / 2 bytes that divides the row, the source row
//                       stride and both base pointers (H = 768 fp16: 16 bytes; odd H fp16: 2 bytes).
#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/wave.cuh"

namespace fastbert::cuda {
namespace {

// ---- forward, stage 1: flags, exclusive scan, slot / index / targets / count ----------------------
constexpr int kScanThreads = 1024, kScanItems = 8, kScanTile = kScanThreads * kScanItems;
constexpr int kWarps = kScanThreads / 32, kCounts = kScanItems * kWarps;  // (k, warp) entries a tile

// labels: [n] contiguous; ign: ignore_index in the labels' type. slot: int64 [n]; index, targets:
// int64 [>= M]; count: int64 [1]. Element i = t0 + k * 1024 + w * 32 + lane of tile t0 has scan rank
// (k, w, lane): entry e = k * 32 + w of base[] holds, after warp 0's scan, the number of selected
// elements before that warp's 32 at step k (over all tiles so far); a lane adds the selected lanes
// below it (popc(ballot & lanemask_lt)). base[] is double-buffered by tile parity: tile j + 2 writes
// buffer j & 1 only after every thread has passed tile j + 1's first barrier, i.e. finished reading
// tile j's, so two barriers a tile suffice (cnt[], read by warp 0 only between the two barriers of a
// tile, needs one buffer). Every thread runs every tile (uniform trip count): the
// ballots and barriers are never divergent; elements i >= n count as not selected and store nothing.
template <typename L>
__global__ void __launch_bounds__(kScanThreads)
select_kernel(const L* __restrict__ labels, int64_t n, L ign, int64_t* __restrict__ slot, int64_t* __restrict__ index,
              int64_t* __restrict__ targets, int64_t* __restrict__ count) {
  __shared__ int64_t base[2][kCounts];
  __shared__ int cnt[kCounts];  // the (k, warp) counts of the tile, before warp 0's scan
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const unsigned below = (1u << lane) - 1u;  // lanemask_lt
  int64_t total = 0;                         // warp 0: selected elements in the tiles before this one
  int buf = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kScanTile, buf ^= 1) {
    L lab[kScanItems];
    unsigned bal[kScanItems];
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {  // all loads first: 8 in flight a thread
      const int64_t i = t0 + k * kScanThreads + threadIdx.x;
      lab[k] = i < n ? labels[i] : ign;
    }
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      bal[k] = __ballot_sync(0xffffffffu, lab[k] != ign);
      if (lane == 0) cnt[k * kWarps + w] = __popc(bal[k]);
    }
    __syncthreads();
    if (w == 0) {  // lane l scans entries [l * E, l * E + E) (contiguous in rank order), then the lanes
      constexpr int E = kCounts / 32;
      int c[E], own = 0;
#pragma unroll
      for (int j = 0; j < E; ++j) {
        c[j] = cnt[lane * E + j];
        own += c[j];
      }
      int incl = own;  // inclusive scan over the lanes (Kogge-Stone shuffles); <= 8192: int
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
      }
      int64_t run = total + (incl - own);  // exclusive: everything before entry l * E
#pragma unroll
      for (int j = 0; j < E; ++j) {
        base[buf][lane * E + j] = run;
        run += c[j];
      }
      total += __shfl_sync(0xffffffffu, incl, 31);  // the tile's count, same in every lane of warp 0
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      const int64_t i = t0 + k * kScanThreads + threadIdx.x;
      if (i >= n) continue;
      const bool sel = (bal[k] >> lane) & 1u;
      const int64_t pos = base[buf][k * kWarps + w] + __popc(bal[k] & below);
      slot[i] = sel ? pos : -1;
      if (sel) {
        index[pos] = i;
        targets[pos] = static_cast<int64_t>(lab[k]);
      }
    }
  }
  if (threadIdx.x == 0) *count = total;
}

// ---- row gather (forward stage 2 and backward) ----------------------------------------------------
constexpr int kCopyThreads = 256;

template <typename U>
__device__ __forceinline__ U splat(unsigned b);
template <>
__device__ __forceinline__ uint4 splat(unsigned b) {
  return make_uint4(b, b, b, b);
}
template <>
__device__ __forceinline__ uint2 splat(unsigned b) {
  return make_uint2(b, b);
}
template <>
__device__ __forceinline__ unsigned splat(unsigned b) {
  return b;
}
template <>
__device__ __forceinline__ unsigned short splat(unsigned b) {
  return static_cast<unsigned short>(b);
}

// Raw copy in units U (uint4 / uint2 / unsigned / unsigned short: bit patterns, no conversion).
// src: row s at src + s * ld (ld in units); idx: int64 [rows]; out: contiguous [rows, width] units.
// Flat unit i = r * width + c, grid-stride; (r, c) advance by a fixed (dr, dc) per stride, so there
// is no division in the loop. out[r] = src[idx[r]] when idx[r] in [0, src_rows), 0 when idx[r] < 0,
// all-ones bits (NaN) for an out-of-range idx (never read).
template <typename U>
__global__ void __launch_bounds__(kCopyThreads)
rows_kernel(const U* __restrict__ src, int64_t ld, int64_t src_rows, const int64_t* __restrict__ idx,
            U* __restrict__ out, int64_t rows, int64_t width) {
  const int64_t total = rows * width, stride = static_cast<int64_t>(gridDim.x) * kCopyThreads;
  int64_t i = static_cast<int64_t>(blockIdx.x) * kCopyThreads + threadIdx.x;
  if (i >= total) return;
  int64_t r = i / width, c = i - r * width;
  const int64_t dr = stride / width, dc = stride - dr * width;
  for (; i < total; i += stride) {
    const int64_t s = idx[r];
    const U v = s >= 0 && s < src_rows ? src[s * ld + c] : splat<U>(s < 0 ? 0u : ~0u);
    if constexpr (sizeof(U) == 16) {
      store16(out + i, v.x, v.y, v.z, v.w);
    } else {
      out[i] = v;
    }
    r += dr;
    c += dc;  // c < width and dc < width: one subtraction wraps it
    if (c >= width) {
      c -= width;
      ++r;
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------
template <typename L>
cudaError_t select(const void* labels, int64_t n, int64_t ignore_index, int64_t* slot, int64_t* index, int64_t* targets,
                   int64_t* count, cudaStream_t stream) {
  // torch's `labels != ignore_index` converts the int scalar to the labels' type (wrapping)
  select_kernel<L><<<1, kScanThreads, 0, stream>>>(static_cast<const L*>(labels), n, static_cast<L>(ignore_index), slot,
                                                   index, targets, count);
  return cudaGetLastError();
}

template <typename U>
cudaError_t copy_rows(const void* src, int64_t ld_bytes, int64_t src_rows, const int64_t* idx, void* out, int64_t rows,
                      int64_t row_bytes, cudaStream_t stream) {
  constexpr int64_t u = sizeof(U);
  int64_t wave = 0;  // SMs x blocks per SM, cached per device (wave.cuh)
  if (const cudaError_t err = resident_wave<rows_kernel<U>, kCopyThreads>(&wave)) return err;
  const int64_t width = row_bytes / u, blocks = ceil_div(rows * width, kCopyThreads);
  rows_kernel<U><<<static_cast<unsigned>(blocks < wave ? blocks : wave), kCopyThreads, 0, stream>>>(
      static_cast<const U*>(src), ld_bytes / u, src_rows, idx, static_cast<U*>(out), rows, width);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gather_masked_select(IntType lt, const void* labels, int64_t n, int64_t ignore_index, int64_t* slot,
                                 int64_t* index, int64_t* targets, int64_t* count, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (lt) {
    case IntType::i64: return select<int64_t>(labels, n, ignore_index, slot, index, targets, count, stream);
    case IntType::i32: return select<int32_t>(labels, n, ignore_index, slot, index, targets, count, stream);
    case IntType::i16: return select<int16_t>(labels, n, ignore_index, slot, index, targets, count, stream);
    case IntType::i8: return select<int8_t>(labels, n, ignore_index, slot, index, targets, count, stream);
    case IntType::u8: return select<uint8_t>(labels, n, ignore_index, slot, index, targets, count, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t gather_masked_rows(DType dt, const void* src, int64_t ld, int64_t src_rows, const int64_t* idx, void* out,
                               int64_t rows, int64_t width, cudaStream_t stream) {
  if (rows <= 0 || width <= 0) return cudaSuccess;
  const int64_t esize = dt == DType::f32 ? 4 : 2, row_bytes = width * esize, ld_bytes = ld * esize;
  const auto fits = [&](int64_t u) {  // whole units per row and per source stride, aligned bases
    return row_bytes % u == 0 && ld_bytes % u == 0 && reinterpret_cast<uintptr_t>(src) % u == 0 &&
           reinterpret_cast<uintptr_t>(out) % u == 0;
  };
  if (fits(16)) return copy_rows<uint4>(src, ld_bytes, src_rows, idx, out, rows, row_bytes, stream);
  if (fits(8)) return copy_rows<uint2>(src, ld_bytes, src_rows, idx, out, rows, row_bytes, stream);
  if (fits(4)) return copy_rows<unsigned>(src, ld_bytes, src_rows, idx, out, rows, row_bytes, stream);
  return copy_rows<unsigned short>(src, ld_bytes, src_rows, idx, out, rows, row_bytes, stream);
}

}  // namespace fastbert::cuda
