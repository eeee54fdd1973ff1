// Masked softmax (+ dropout), forward: CUDA kernels and host launcher (launch.h; glue:
// masked_softmax.cpp; device helpers and the thread layout: masked_softmax_kernel.cuh). Per row of
// Sk keys, in fp32:
//   x = s * scale + mask  (bool mask: x = s * scale where true, -inf where false)
//   m = max(x);  e = exp(x - m);  p = e / sum(e)        (m == -inf, a fully excluded row: p = 0)
//   with dropout: soft = p, probs = keep ? p * scale_p : 0 (shared Philox stream, element index =
//   flat index into the contiguous [B, H, Sq, Sk] output); without: probs = p.
//
// Kernel shapes by Sk (fwd_config; V = 16 / sizeof(T) on the vector path, else 1):
//   Sk <= 1024          a row group of G = min(32, pow2 >= ceil(Sk / V)) lanes per row, 128 / G rows a
//                       block, NV packs a lane (the smallest listed in launch_nv >= ceil(Sk / (G V)));
//                       the row stays in registers, shuffles only. BERT: Sk = 128 is 16 lanes x one
//                       16-byte pack (fp16/bf16, two rows a warp) or 32 lanes x one pack (fp32);
//                       Sk = 512 is 32 lanes x 2 packs (fp16/bf16) or 4 packs (fp32).
//   1024 < Sk <= 8192   a block per row, 16 elements a thread, ceil(Sk / 16) threads rounded up to
//                       warps; the row stays in registers, two block reductions.
//   Sk > 8192           fwd_stream_kernel: a block of 512 threads per row loops over segments of 8192
//                       columns twice: an online max / sum, then the normalised output.
// Launch bounds: 128 threads for more than 16 elements a thread (the warp shapes), else 512 (ptxas
// then may use 128 registers a thread); with these ptxas reports no spills on sm_80 / sm_90.
#include "cuda/launch.h"
#include "cuda/masked_softmax_kernel.cuh"

namespace fastbert::cuda {
namespace {
using namespace sm;

constexpr int kMaxTpr = 512;  // threads a block (so 128 registers a thread)
constexpr int kRowsThreads = 128;  // threads a block of the warp shapes
constexpr int64_t kWarpMaxSk = 1024, kBlockEpl = 16;

// Rows held in registers: row blockIdx.x * blockDim.y + threadIdx.y, layout of masked_softmax_kernel.cuh
// with seg0 = 0 and G NV V >= Sk. No early return before the reductions and row_keep (warp
// collectives): inactive row groups (row >= rows) compute on padding and store nothing.
template <typename T, typename M, int V, int NV>
__global__ void __launch_bounds__(NV * V > 16 ? kRowsThreads : kMaxTpr) fwd_rows_kernel(FwdArgs<T, M> a) {
  __shared__ float red[2][32];
  int slot = 0;
  const int G = blockDim.x, t = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < a.rows;
  const uint64_t seed = read_seed(a.drop);
  float x[NV][V];
  load_x<T, M, V, NV>(x, a, row, active, active ? mask_row(a, row) : nullptr, 0, G, t);

  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < NV; ++k)
#pragma unroll
    for (int j = 0; j < V; ++j) m = fmaxf(m, x[k][j]);
  m = group_reduce<true>(m, red, slot);
  const float mz = m == -INFINITY ? 0.0f : m;  // fully excluded row: every e = exp(-inf) = 0
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < NV; ++k)
#pragma unroll
    for (int j = 0; j < V; ++j) {
      x[k][j] = expf(x[k][j] - mz);  // padding: 0
      s += x[k][j];
    }
  s = group_reduce<false>(s, red, slot);
  const uint32_t keep = row_keep<V, NV>(a.drop, seed, row, a.Sk, 0, G, t);
  if (!active) return;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int c = pack_col<V>(0, G, t, k);
    if (c >= a.Sk) continue;
    float p[V];
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = s == 0.0f ? 0.0f : x[k][j] / s;
    store_probs<T, V>(a.probs, a.soft, row * a.Sk + c, p, a.drop, keep >> (k * V));
  }
}

// Rows longer than a block holds in registers: row blockIdx.x (blockDim.y == 1), segments of
// G NV V columns. Pass 1: per thread a running (max m, sum s of exp(x - m)), rescaling s when m grows;
// the block then takes M = max m and S = sum s exp(m - M). Pass 2 reloads x and writes exp(x - M) / S.
template <typename T, typename M, int V, int NV>
__global__ void __launch_bounds__(kMaxTpr) fwd_stream_kernel(FwdArgs<T, M> a) {
  __shared__ float red[2][32];
  int slot = 0;
  const int G = blockDim.x, t = threadIdx.x;
  const int64_t row = blockIdx.x;
  const int seg = G * NV * V;
  const uint64_t seed = read_seed(a.drop);
  const M* mrow = mask_row(a, row);
  float x[NV][V], m = -INFINITY, s = 0.0f;
  for (int seg0 = 0; seg0 < a.Sk; seg0 += seg) {
    load_x<T, M, V, NV>(x, a, row, true, mrow, seg0, G, t);
    float mx = m;
    bool nan = false;
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) mx = fmaxf(mx, x[k][j]), nan |= x[k][j] != x[k][j];
    if (mx == -INFINITY) {  // nothing but excluded keys so far (s == 0)
      if (nan) s = NAN;     // (fmaxf drops NaN: a NaN beside only excluded keys still makes the row NaN)
      continue;
    }
    float add = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) add += expf(x[k][j] - mx);
    s = s * expf(m - mx) + add;  // m == -inf: s == 0 and exp(-inf) == 0
    m = mx;
  }
  const float mmax = group_reduce<true>(m, red, slot);
  const float S = group_reduce<false>(m == -INFINITY ? s * 0.0f : s * expf(m - mmax), red, slot);  // NaN stays
  const float mz = mmax == -INFINITY ? 0.0f : mmax;
  for (int seg0 = 0; seg0 < a.Sk; seg0 += seg) {
    load_x<T, M, V, NV>(x, a, row, true, mrow, seg0, G, t);
    const uint32_t keep = row_keep<V, NV>(a.drop, seed, row, a.Sk, seg0, G, t);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = pack_col<V>(seg0, G, t, k);
      if (c >= a.Sk) continue;
      float p[V];
#pragma unroll
      for (int j = 0; j < V; ++j) p[j] = S == 0.0f ? 0.0f : expf(x[k][j] - mz) / S;
      store_probs<T, V>(a.probs, a.soft, row * a.Sk + c, p, a.drop, keep >> (k * V));
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------
Config fwd_config(int64_t Sk, int V) { return row_config(Sk, V, kWarpMaxSk, kBlockEpl, kMaxTpr, kRowsThreads); }

template <typename T, typename M, int V, int NV>
cudaError_t launch(const FwdArgs<T, M>& a, const Config& cfg, cudaStream_t stream) {
  if constexpr (NV * V == kBlockEpl) {
    if (cfg.stream) {
      if (a.rows > 0x7fffffff) return cudaErrorInvalidValue;
      fwd_stream_kernel<T, M, V, NV><<<static_cast<unsigned>(a.rows), cfg.tpr, 0, stream>>>(a);
      return cudaGetLastError();
    }
  }
  const int64_t blocks = ceil_div(a.rows, cfg.rows_per_block);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  fwd_rows_kernel<T, M, V, NV><<<static_cast<unsigned>(blocks), dim3(cfg.tpr, cfg.rows_per_block), 0, stream>>>(a);
  return cudaGetLastError();
}

// The instantiated pack counts per V (EPL = NV V <= 32; 16 is the block and stream shape).
template <typename T, typename M, int V>
cudaError_t launch_nv(const FwdArgs<T, M>& a, const Config& cfg, cudaStream_t stream) {
  const int nv = cfg.nv;
  if constexpr (V == 8) {  // 16-bit types: 256, 512, 768, 1024 keys with 32 lanes
    if (nv <= 1) return launch<T, M, V, 1>(a, cfg, stream);
    if (nv <= 2) return launch<T, M, V, 2>(a, cfg, stream);
    if (nv <= 3) return launch<T, M, V, 3>(a, cfg, stream);
    if (nv <= 4) return launch<T, M, V, 4>(a, cfg, stream);
  } else if constexpr (V == 4) {  // fp32: 128, 256, 512, 768, 1024
    if (nv <= 1) return launch<T, M, V, 1>(a, cfg, stream);
    if (nv <= 2) return launch<T, M, V, 2>(a, cfg, stream);
    if (nv <= 4) return launch<T, M, V, 4>(a, cfg, stream);
    if (nv <= 6) return launch<T, M, V, 6>(a, cfg, stream);
    if (nv <= 8) return launch<T, M, V, 8>(a, cfg, stream);
  } else {  // scalar: 32, 64, 128, 256, 512, 768, 1024
    if (nv <= 1) return launch<T, M, V, 1>(a, cfg, stream);
    if (nv <= 2) return launch<T, M, V, 2>(a, cfg, stream);
    if (nv <= 4) return launch<T, M, V, 4>(a, cfg, stream);
    if (nv <= 8) return launch<T, M, V, 8>(a, cfg, stream);
    if (nv <= 16) return launch<T, M, V, 16>(a, cfg, stream);
    if (nv <= 24) return launch<T, M, V, 24>(a, cfg, stream);
    if (nv <= 32) return launch<T, M, V, 32>(a, cfg, stream);
  }
  return cudaErrorInvalidValue;
}

// Whether the mask rows may be read as V-element packs: key stride 1, and the base pointer and every
// used stride aligned to the pack's alignment.
template <typename M, int V>
bool mask_vec_ok(const SoftmaxMask& mask) {
  if constexpr (std::is_same_v<M, NoMask> || V == 1) {
    return false;
  } else {
    constexpr int64_t A = alignof(Pack<M, V>);
    bool ok = mask.stride[3] == 1 && reinterpret_cast<uintptr_t>(mask.data) % A == 0;
    for (int d = 0; d < 3; ++d) ok = ok && (mask.stride[d] * static_cast<int64_t>(sizeof(M))) % A == 0;
    return ok;
  }
}

template <typename T, typename M>
cudaError_t run(const void* scores, const SoftmaxMask& mask, float scale, const Dropout& drop, void* probs, void* soft,
                int64_t B, int64_t H, int64_t Sq, int64_t Sk, cudaStream_t stream) {
  FwdArgs<T, M> a{static_cast<const T*>(scores),
                  static_cast<T*>(probs),
                  static_cast<T*>(soft),
                  static_cast<const M*>(mask.data),
                  {mask.stride[0], mask.stride[1], mask.stride[2], mask.stride[3]},
                  H,
                  Sq,
                  1.0 / static_cast<double>(H),
                  1.0 / static_cast<double>(Sq),
                  false,
                  scale,
                  drop,
                  B * H * Sq,
                  static_cast<int>(Sk)};
  const bool vec = Sk % kVec<T> == 0 && aligned16(scores) && aligned16(probs) && (soft == nullptr || aligned16(soft));
  if (vec) {
    a.mvec = mask_vec_ok<M, kVec<T>>(mask);
    return launch_nv<T, M, kVec<T>>(a, fwd_config(Sk, kVec<T>), stream);
  }
  return launch_nv<T, M, 1>(a, fwd_config(Sk, 1), stream);
}

template <typename T>
cudaError_t run_mask(const void* scores, const SoftmaxMask& mask, float scale, const Dropout& drop, void* probs,
                     void* soft, int64_t B, int64_t H, int64_t Sq, int64_t Sk, cudaStream_t stream) {
  switch (mask.type) {
    case MaskType::none: return run<T, NoMask>(scores, mask, scale, drop, probs, soft, B, H, Sq, Sk, stream);
    case MaskType::b8: return run<T, uint8_t>(scores, mask, scale, drop, probs, soft, B, H, Sq, Sk, stream);
    case MaskType::f32: return run<T, float>(scores, mask, scale, drop, probs, soft, B, H, Sq, Sk, stream);
    // 16-bit masks only of the scores' own type (the glue converts others to fp32): fewer instances
    case MaskType::f16:
      if constexpr (std::is_same_v<T, __half>)
        return run<T, __half>(scores, mask, scale, drop, probs, soft, B, H, Sq, Sk, stream);
      break;
    case MaskType::bf16:
      if constexpr (std::is_same_v<T, __nv_bfloat16>)
        return run<T, __nv_bfloat16>(scores, mask, scale, drop, probs, soft, B, H, Sq, Sk, stream);
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t masked_softmax_fwd(DType dt, const void* scores, const SoftmaxMask& mask, float scale, const int64_t* seed,
                               double dropout_p, void* probs, void* softmax, int64_t batch, int64_t heads,
                               int64_t queries, int64_t keys, cudaStream_t stream) {
  if (batch <= 0 || heads <= 0 || queries <= 0 || keys <= 0) return cudaSuccess;
  if (keys > sm::kMaxSk || (seed != nullptr && softmax == nullptr)) return cudaErrorInvalidValue;
  const Dropout drop{seed, seed != nullptr ? philox::threshold(dropout_p) : 0u,
                     seed != nullptr ? philox::scale(dropout_p) : 1.0f};
  void* soft = seed != nullptr ? softmax : nullptr;
  switch (dt) {
    case DType::f32:
      return run_mask<float>(scores, mask, scale, drop, probs, soft, batch, heads, queries, keys, stream);
    case DType::f16:
      return run_mask<__half>(scores, mask, scale, drop, probs, soft, batch, heads, queries, keys, stream);
    case DType::bf16:
      return run_mask<__nv_bfloat16>(scores, mask, scale, drop, probs, soft, batch, heads, queries, keys, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastbert::cuda
