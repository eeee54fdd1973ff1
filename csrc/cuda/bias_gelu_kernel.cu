// bias + GELU: CUDA kernels and host launchers (launch.h; glue: bias_gelu.cpp). fp32 maths, int64 offsets.
// Forward   z = x + b,  exact: y = z * Phi(z),  Phi(z) = (1 + erf(z / sqrt 2)) / 2
//                       tanh:  y = 0.5 z (1 + tanh u) = z * s,  s = sigmoid(2u),
//                              u = sqrt(2/pi) (z + 0.044715 z^3)
// Backward  dz = dy * gelu'(z)   (z recomputed from x and b; nothing is saved)
//           exact: gelu'(z) = Phi(z) + z phi(z),      phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
//           tanh:  gelu'(z) = s + 2 z s (1 - s) u',   u' = sqrt(2/pi) (1 + 3 * 0.044715 z^2)
//           dx = dz; dbias[c] = sum over rows of dz[r, c] (fp32, two deterministic stages).
// Cost: an fp16 forward moves 4 bytes an element, so at 3.35 TB/s (H100) ~35 instructions an element
// make it compute-bound. SASS per element, sm_90: erff 32, normcdff 66, normcdff + expf 79, the
// rationals below ~20-24. So exact forward: Phi from the CPU kernel's erfcx rational (accurate in the
// tails, where 0.5 + erff / 2 cancels); exact backward: the CPU kernel's fitted rational for gelu'
// (scripts/fit_gelu.py); tanh: e = exp(-2|u|) <= 1, s = 1 / (1 + e)
// (u >= 0) or e / (1 + e) (u < 0), s (1 - s) = e / (1 + e)^2: no overflow, no cancellation.
// Same arithmetic as the Triton kernels (fastbert/triton/bias_gelu.py), operation for operation, with
// the PTX instructions Triton emits for fp32 `/` and tl.exp2 (div_full, exp2_ftz below), so the two
// GPU backends agree to the ulp. div.full.f32 (2 ulp, full range) rather than IEEE div.rn.f32
// (__fdiv_rn, tl.div_rn): div.rn's slow-path call made ew_kernel spill at its 32-register budget
// (16-44 bytes on sm_80/sm_90) and the backward tile kernels too (8-16 bytes).
// NaN and +-inf z give a NaN gradient, as torch's gelu backward (and the reference backend) do: the
// clamps below would otherwise turn them into finite values, so gelu_grad adds z - z (0 for finite z)
// to the clamped argument.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/wave.cuh"

namespace fastbert::cuda {
namespace {

constexpr float kSqrt1_2 = 0.70710678118654752f, kSqrt2OverPi = 0.79788456080286536f, kCubic = 0.044715f;
constexpr float kMinus2Log2e = -2.88539008177792682f;  // exp(-2 v) = exp2(kMinus2Log2e * v)

// a / b and 2^x as Triton compiles fp32 `/` and tl.exp2: div.full.f32, ex2.approx.ftz.f32 (one
// MUFU.EX2; results below 2^-126 flush to 0).
__device__ __forceinline__ float div_full(float a, float b) {
  float r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float exp2_ftz(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// Phi(z) without cancellation, as the CPU kernel computes it: a = |z| / sqrt 2 (clamped at 9, and
// erfc(a) / 2 taken as 0 beyond, so z * Phi(z) is -0 for finite z << 0 (the clamped value gave -62
// for z = -3e38) and NaN for -inf, as eager), erfc(a) = exp(-a^2) P(a) / Q(a) (erfcx fitted to 7e-8
// relative, scripts/fit_gelu.py forward), Phi = erfc(a) / 2 for z < 0, 1 - erfc(a) / 2 otherwise.
// ~20 instructions with one MUFU.EX2.
__device__ __forceinline__ float normal_cdf(float z) {
  const float a_raw = fabsf(z) * kSqrt1_2;
  const float a = fminf(a_raw, 9.0f);
  const float e = exp2_ftz(a * a * -1.44269504088896341f);  // >= 2^-117: never flushed
  const float p = ((0.5f * 7.583220580e-02f * a + 0.5f * 4.137109122e-01f) * a + 0.5f * 9.406895939e-01f) * a +
                  0.5f * 9.999999283e-01f;
  const float q =
      (((1.344987700e-01f * a + 7.316200554e-01f) * a + 1.748460695e+00f) * a + 2.069064260e+00f) * a + 1.0f;
  const float half_erfc = a_raw > 9.0f ? 0.0f : div_full(e * p, q);  // q in [1, 1.6e3]
  return z < 0.0f ? half_erfc : 1.0f - half_erfc;
}

template <bool TANH>
__device__ __forceinline__ float gelu(float z) {
  if (TANH) {
    const float u = kSqrt2OverPi * z * (1.0f + kCubic * z * z);
    const float e = exp2_ftz(kMinus2Log2e * fabsf(u));
    return div_full(u >= 0.0f ? z : z * e, 1.0f + e);
  }
  return z * normal_cdf(z);
}

template <bool TANH>
__device__ __forceinline__ float gelu_grad(float z) {
  // z - z (0 for finite z, NaN for NaN and +-inf) added to the clamped argument carries a NaN through
  if (TANH) {  // |z| >= 10 saturates (e < 1e-38); the clamp keeps z^2 finite so 0 * inf cannot occur
    const float c = fminf(fmaxf(z, -10.0f), 10.0f) + (z - z);
    const float c2 = c * c, u = kSqrt2OverPi * c * (1.0f + kCubic * c2);
    const float e = exp2_ftz(kMinus2Log2e * fabsf(u));
    const float r = div_full(1.0f, 1.0f + e), s = u >= 0.0f ? r : e * r;
    const float du = kSqrt2OverPi * (1.0f + 0.134145f * c2);  // 3 * 0.044715, rounded once (as Triton)
    return s + 2.0f * c * (e * r * r) * du;
  }
  // h(x) = gelu'(z) - 1/2 with x = z / sqrt 2 is odd and tends to 0 like z phi(z): x P(x^2) / Q(x^2)
  // fits it to 6.3e-8 on |x| <= 4.3 (clamped beyond, where |h - 1/2| < 3e-8).
  const float x = fminf(fmaxf(z * kSqrt1_2, -4.3f), 4.3f) + (z - z), x2 = x * x;
  const float P[8] = {-2.202739187e-09f, 1.984200941e-07f, -1.614478798e-06f, 7.645411882e-04f,
                      -1.271909522e-03f, 8.187313760e-02f, -1.109946955e-01f, 1.128379771e+00f};
  const float Q[6] = {2.031874595e-04f, 2.551617771e-03f, 2.463029804e-02f, 1.513924648e-01f, 5.683082142e-01f, 1.0f};
  float p = P[0], q = Q[0];
  for (int i = 1; i < 8; ++i) p = p * x2 + P[i];  // constant trip counts: fully unrolled, the
  for (int i = 1; i < 6; ++i) q = q * x2 + Q[i];  // coefficients folded into the FFMAs
  return div_full(x * p, q) + 0.5f;
}

// ---- elementwise: forward, and backward without dbias -------------------------------------------
constexpr int kBlock = 256;
// out = gelu(z) (BWD = false; dy unused) or dy * gelu'(z) (BWD = true), z = x + bias[col], over a
// contiguous [rows, n] view taken as nvec packs of V elements. V == 1 or n % V == 0 (and 16-byte
// aligned pointers), so a pack never straddles two rows: its columns are col .. col + V - 1.
// Grid-stride loop; col advances by a fixed step per stride (no division in the loop). <= 32
// registers, so 8 blocks fill an SM (ptxas needs no spills for it).
template <typename T, int V, bool TANH, bool BWD>
__global__ void __launch_bounds__(kBlock, 8)
ew_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ bias, T* __restrict__ out,
          int64_t nvec, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBlock;  // in packs
  const int64_t step = stride * V % n;                               // column advance per stride
  int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  int64_t col = i * V % n;
  for (; i < nvec; i += stride) {
    const Pack<T, V> xv = load<V>(x + i * V);
    const Pack<float, V> bv = bias != nullptr ? load<V>(bias + col) : Pack<float, V>{};
    const Pack<T, V> gv = BWD ? load<V>(dy + i * V) : Pack<T, V>{};
    float o[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float z = to_f(xv.v[k]) + bv.v[k];
      o[k] = BWD ? to_f(gv.v[k]) * gelu_grad<TANH>(z) : gelu<TANH>(z);
    }
    store<V>(out + i * V, o);
    col += step;  // col < n and step < n: one subtraction wraps it
    if (col >= n) col -= n;
  }
}

// ---- backward with dbias, stage 1 ---------------------------------------------------------------
// dx[r, c] = dy[r, c] * gelu'(x[r, c] + bias[c]) and partial[blockIdx.y, c] = sum of dz[r, c] (fp32,
// before rounding) over a chunk of rows [r0, r1) (blockIdx.y), on a tile of W = kTileX * V columns
// [c0, c0 + W) (blockIdx.x). One warp spans the tile: a warp reads 512 bytes of a row (128 fp32 /
// 256 fp16 columns, four whole 128-byte lines), and W divides the BERT widths 768, 1024, 3072 and
// 4096, so no lane idles. Warp ty takes rows r0 + ty, r0 + ty + kTileY, ... in ascending order, with
// V fp32 column sums per thread in registers; the block then adds the warps' sums in warp order.
// A thread's k-th column in the tile is tx * V + k (VEC: V adjacent columns loaded as one pack) or
// k * kTileX + tx (scalar path for any n or alignment, still coalesced across the warp).
constexpr int kTileX = 32, kTileY = 8;
template <typename T, bool VEC, bool TANH>
__global__ void __launch_bounds__(kTileX * kTileY)
bwd_tile_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ bias, T* __restrict__ dx,
                float* __restrict__ partial, int64_t rows, int64_t n, int64_t rows_per_chunk) {
  constexpr int V = kVec<T>, W = kTileX * V;
  __shared__ float red[kTileY][W];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * W;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  const auto col = [&](int k) { return VEC ? tx * V + k : k * kTileX + tx; };  // in the tile
  float b[V], acc[V] = {};  // bias of the thread's columns, sums of dz (__fadd_rn: never fused)
#pragma unroll
  for (int k = 0; k < V; ++k) b[k] = bias != nullptr && c0 + col(k) < n ? bias[c0 + col(k)] : 0.0f;
  for (int64_t r = r0 + ty; r < r1; r += kTileY) {
    const int64_t off = r * n + c0;  // element (r, c0)
    if constexpr (VEC) {
      if (c0 + tx * V >= n) break;  // n % V == 0: a pack lies wholly inside the row or outside
      const Pack<T, V> xv = load<V>(x + off + tx * V), gv = load<V>(dy + off + tx * V);
      float dz[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        dz[k] = to_f(gv.v[k]) * gelu_grad<TANH>(to_f(xv.v[k]) + b[k]);
        acc[k] = __fadd_rn(acc[k], dz[k]);
      }
      store<V>(dx + off + tx * V, dz);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int c = col(k);
        if (c0 + c >= n) continue;
        const float dz = to_f(dy[off + c]) * gelu_grad<TANH>(to_f(x[off + c]) + b[k]);
        dx[off + c] = from_f<T>(dz);
        acc[k] = __fadd_rn(acc[k], dz);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) red[ty][col(k)] = acc[k];
  __syncthreads();
  for (int c = ty * kTileX + tx; c < W; c += kTileX * kTileY) {
    if (c0 + c >= n) continue;
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < kTileY; ++j) s += red[j][c];
    partial[blockIdx.y * n + c0 + c] = s;
  }
}

// ---- backward with dbias, stage 2 ---------------------------------------------------------------
// dbias[c] = sum of partial[j, c] over j < chunks (<= kMaxChunks). Block = kTileX columns x kSumY:
// thread (x, y) adds chunks y, y + kSumY, ... in order, then y = 0 adds the kSumY sums in order.
constexpr int kSumY = 32;
__global__ void __launch_bounds__(kTileX * kSumY)
sum_partials_kernel(const float* __restrict__ partial, float* __restrict__ dbias, int64_t chunks, int64_t n) {
  __shared__ float red[kSumY][kTileX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileX + tx;
  float s = 0.0f;
#pragma unroll 4
  for (int64_t j = ty; j < chunks && c < n; j += kSumY) s += partial[j * n + c];
  red[ty][tx] = s;
  __syncthreads();
  if (ty != 0 || c >= n) return;
  float t = 0.0f;
#pragma unroll
  for (int j = 0; j < kSumY; ++j) t += red[j][tx];
  dbias[c] = t;
}

// ---- host side ----------------------------------------------------------------------------------
// Stage 1 aims at >= kTargetBlocks blocks (1-2 waves on an H100) with 16 rows a thread, halved down
// to 2 (below that the workspace costs > 8% extra traffic) for smaller inputs; kMaxChunks bounds the
// workspace, stage 2's serial work and gridDim.y. Depends on the shape alone: same dbias on any GPU.
constexpr int64_t kTargetBlocks = 1024, kMaxPerThread = 16, kMinPerThread = 2, kMaxChunks = 1024;

template <typename F>
cudaError_t dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: return f(Tag<float>{});
    case DType::f16: return f(Tag<__half>{});
    case DType::bf16: return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Grid: one resident wave (SMs x blocks per SM at the kernel's occupancy, cached per device: wave.cuh),
// fewer for less work.
template <typename T, int V, bool TANH, bool BWD>
cudaError_t launch_ew(const void* dy, const void* x, const float* bias, void* out, int64_t nvec, int64_t n,
                      cudaStream_t stream) {
  int64_t wave = 0;
  if (const cudaError_t err = resident_wave<ew_kernel<T, V, TANH, BWD>, kBlock>(&wave)) return err;
  const int64_t grid = ceil_div(nvec, kBlock) < wave ? ceil_div(nvec, kBlock) : wave;
  ew_kernel<T, V, TANH, BWD><<<static_cast<unsigned>(grid), kBlock, 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), bias, static_cast<T*>(out), nvec, n);
  return cudaGetLastError();
}

// 16-byte packs when every row holds whole packs and all pointers are 16-byte aligned, else V = 1.
template <typename T, bool BWD>
cudaError_t elementwise(const void* dy, const void* x, const float* bias, void* out, int64_t total, int64_t n,
                        bool tanh, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const bool vec =
      n % V == 0 && aligned16(x) && aligned16(out) && (!BWD || aligned16(dy)) && (bias == nullptr || aligned16(bias));
  const int64_t nvec = total / (vec ? V : 1);
  return vec ? (tanh ? launch_ew<T, V, true, BWD>(dy, x, bias, out, nvec, n, stream)
                     : launch_ew<T, V, false, BWD>(dy, x, bias, out, nvec, n, stream))
             : (tanh ? launch_ew<T, 1, true, BWD>(dy, x, bias, out, nvec, n, stream)
                     : launch_ew<T, 1, false, BWD>(dy, x, bias, out, nvec, n, stream));
}

}  // namespace

cudaError_t bias_gelu_fwd(DType dt, const void* x, const float* bias, void* y, int64_t rows, int64_t n, bool tanh,
                          cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  return dispatch(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return elementwise<T, false>(nullptr, x, bias, y, rows * n, n, tanh, stream);
  });
}

BiasGeluBwdPlan bias_gelu_bwd_plan(DType dt, int64_t rows, int64_t n) {
  if (rows <= 0 || n <= 0) return {1, 0};
  const int64_t tiles = ceil_div(n, kTileX * (dt == DType::f32 ? 4 : 8));
  int64_t rows_per_chunk = kTileY * kMaxPerThread;  // halved while too few blocks
  while (rows_per_chunk > kTileY * kMinPerThread && tiles * ceil_div(rows, rows_per_chunk) < kTargetBlocks)
    rows_per_chunk /= 2;
  if (ceil_div(rows, rows_per_chunk) > kMaxChunks)
    rows_per_chunk = ceil_div(ceil_div(rows, kMaxChunks), kTileY) * kTileY;
  return {rows_per_chunk, ceil_div(rows, rows_per_chunk)};
}

cudaError_t bias_gelu_bwd(DType dt, const void* dy, const void* x, const float* bias, void* dx, float* partial,
                          float* dbias, int64_t rows, int64_t n, const BiasGeluBwdPlan& plan, bool tanh,
                          cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  const int64_t chunks = plan.chunks, rpc = plan.rows_per_chunk;
  if (dbias != nullptr && (chunks < 1 || chunks > kMaxChunks || chunks * rpc < rows))
    return cudaErrorInvalidValue;  // not a plan from bias_gelu_bwd_plan(dt, rows, n)
  return dispatch(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (dbias == nullptr) return elementwise<T, true>(dy, x, bias, dx, rows * n, n, tanh, stream);
    const bool vec = n % kVec<T> == 0 && aligned16(dy) && aligned16(x) && aligned16(dx);
    const auto tile = vec ? (tanh ? bwd_tile_kernel<T, true, true> : bwd_tile_kernel<T, true, false>)
                          : (tanh ? bwd_tile_kernel<T, false, true> : bwd_tile_kernel<T, false, false>);
    const dim3 grid(static_cast<unsigned>(ceil_div(n, kTileX * kVec<T>)), static_cast<unsigned>(chunks));
    tile<<<grid, dim3(kTileX, kTileY), 0, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(x), bias,
                                                    static_cast<T*>(dx), partial, rows, n, rpc);
    if (const cudaError_t err = cudaGetLastError()) return err;
    const unsigned sum_grid = static_cast<unsigned>(ceil_div(n, kTileX));
    sum_partials_kernel<<<sum_grid, dim3(kTileX, kSumY), 0, stream>>>(partial, dbias, chunks, n);
    return cudaGetLastError();
  });
}

}  // namespace fastbert::cuda
