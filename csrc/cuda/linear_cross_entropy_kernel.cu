// Fused softmax cross-entropy over a logits chunk: CUDA kernels and host launchers (launch.h; glue:
// linear_cross_entropy.cpp). Per row x[0..V) with target t, in fp32:
//   pass 1   running (m, s) per thread: m = max seen, s = sum exp(x - sh(m)), rescaled by
//            exp(sh(m_old) - sh(m_new)) when m grows; sh(m) = m if finite, else 0 (as torch's
//            logsumexp: a +inf max gives lse = +inf, an all -inf row lse = -inf, never inf - inf),
//            then a block reduction of the pairs (the same rescaling); lse = sh(M) + log(S).
//   loss     lse - x[t]; 0 when t == ignore_index; NaN when t is outside [0, V) (x[t] never read).
//   pass 2   (backward only) x <- (exp(x - sh(M)) / S - [c == t]) * row_scale[row], rounded to the
//            logits' dtype (the gradient of row_scale * loss); ignored rows <- 0; out-of-range t <- NaN.
// Kernel shape: one block per row, 32..512 threads (a power of two, ~4 packs a thread, 512 for the
// BERT vocabularies). At most 32 registers a thread (__launch_bounds__ minimum of 4 blocks), so four
// 512-thread blocks fill an SM: one wave is 432 rows on an A100 (108 SMs) and 528 on an H100 (132),
// and the default chunk of BERT's vocabulary (fastbert/ops/linear_cross_entropy.py: 400 fp16/bf16
// rows, 192 fp32) is one wave on both. Uncapped, the sm_90 backward took 40 registers (3 blocks an
// SM, 396 rows a wave): a 400-row chunk ran a second wave of 4 rows. A row is walked as a scalar head up to its first
// 16-byte boundary, 16-byte packs, and a scalar tail, so rows of any length and alignment (V = 30522 fp16 rows start 4
// bytes apart mod 16) read and write whole 16-byte packs.
#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace fastbert::cuda {
namespace {

constexpr int kMaxThreads = 512;

__device__ __forceinline__ float sh(float m) { return fabsf(m) == INFINITY ? 0.0f : m; }

// s (a sum of exp(x - sh(m))) re-expressed against a new max M >= m. s == 0 (m == -inf, nothing
// but -inf seen) stays 0; NaN stays NaN.
__device__ __forceinline__ float rescale(float s, float m, float M) {
  return s == 0.0f || m == M ? s : s * expf(sh(m) - sh(M));
}

struct Stats {
  float m = -INFINITY, s = 0.0f;
  template <int N>
  __device__ __forceinline__ void add(const float (&x)[N]) {
    float M = m;
#pragma unroll
    for (int j = 0; j < N; ++j) M = fmaxf(M, x[j]);  // fmaxf drops NaN; exp(NaN) makes s NaN below
    float a = rescale(s, m, M);
    const float o = sh(M);
#pragma unroll
    for (int j = 0; j < N; ++j) a += expf(x[j] - o);
    m = M;
    s = a;
  }
  __device__ __forceinline__ void merge(float m2, float s2) {
    const float M = fmaxf(m, m2);
    s = rescale(s, m, M) + rescale(s2, m2, M);
    m = M;
  }
};

// The block's (M, S) (blockDim.x a multiple of 32), returned to every thread.
__device__ __forceinline__ Stats block_stats(Stats st) {
  __shared__ float sm[32], ss[32];
  __shared__ Stats out;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    st.merge(__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off));
  if (lane == 0) {
    sm[w] = st.m;
    ss[w] = st.s;
  }
  __syncthreads();
  if (w == 0) {
    Stats r;
    if (lane < static_cast<int>(blockDim.x >> 5)) r = Stats{sm[lane], ss[lane]};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
      r.merge(__shfl_xor_sync(0xffffffffu, r.m, off), __shfl_xor_sync(0xffffffffu, r.s, off));
    if (lane == 0) out = r;
  }
  __syncthreads();
  return out;
}

// Calls scalar(c) for the head and tail columns and pack(c) for the packs [c, c + V) of the row
// (V = kVec<T>), thread t taking t, t + blockDim.x, ... of each part. Head: [0, h), h < V, up to the
// first 16-byte boundary; body: nb packs from h; tail: the < V columns left.
template <typename T, typename FS, typename FP>
__device__ __forceinline__ void for_row(const T* row, int64_t vocab, FS&& scalar, FP&& pack) {
  constexpr int V = kVec<T>;
  const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(row) % 16 / sizeof(T));
  const int64_t h = mis == 0 ? 0 : (V - mis < vocab ? V - mis : vocab);
  const int64_t nb = (vocab - h) / V, tail0 = h + nb * V;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) scalar(c);
#pragma unroll 2
  for (int64_t p = threadIdx.x; p < nb; p += blockDim.x) pack(h + p * V);
  for (int64_t c = tail0 + threadIdx.x; c < vocab; c += blockDim.x) scalar(c);
}

// Row blockIdx.x of logits [rows, vocab] (contiguous). targets [rows] (type I); loss, lse: fp32 [rows].
// BWD: also overwrites the row in place (pass 2) with the gradient scaled by row_scale[row] (fp32).
template <typename T, typename I, bool BWD>
__global__ void __launch_bounds__(kMaxThreads, 4)
ce_kernel(T* logits, const I* __restrict__ targets, const float* __restrict__ row_scale, int64_t ignore,
          float* __restrict__ loss, float* __restrict__ lse_out, int64_t vocab) {
  constexpr int V = kVec<T>;
  const int64_t row = blockIdx.x;
  T* x = logits + row * vocab;
  Stats st;
  for_row(
      x, vocab, [&](int64_t c) { st.add<1>({to_f(x[c])}); },
      [&](int64_t c) {
        const Pack<T, V> v = load<V>(x + c);
        float f[V];
#pragma unroll
        for (int j = 0; j < V; ++j) f[j] = to_f(v.v[j]);
        st.add(f);
      });
  st = block_stats(st);
  const float lse = sh(st.m) + logf(st.s);  // S == 0 (all -inf): -inf
  const int64_t t = static_cast<int64_t>(targets[row]);
  const bool valid = t != ignore, in_range = t >= 0 && t < vocab;
  if (threadIdx.x == 0) {
    lse_out[row] = lse;
    loss[row] = !valid ? 0.0f : in_range ? lse - to_f(x[t]) : __int_as_float(0x7fffffff);
  }
  if constexpr (BWD) {
    if (valid) {
      __syncthreads();  // thread 0 has read x[t] before it is overwritten
      // g = (p - onehot) * scale with p = exp(x - sh(M)) / S (not exp(x - lse): lse's rounding would
      // scale every p by up to |lse| ulps); a NaN scale marks an out-of-range target
      const float scale = in_range ? row_scale[row] : __int_as_float(0x7fffffff);
      const float off = sh(st.m), inv = 1.0f / st.s;
      // an inf or NaN scale: the target's gradient is NaN, as eager's -scale + p_t scale (not -inf)
      const float one = isfinite(scale) ? 1.0f : __int_as_float(0x7fffffff);
      for_row(
          x, vocab,
          [&](int64_t c) { x[c] = from_f<T>((expf(to_f(x[c]) - off) * inv - (c == t ? one : 0.0f)) * scale); },
          [&](int64_t c) {
            const Pack<T, V> v = load<V>(x + c);
            float g[V];
#pragma unroll
            for (int j = 0; j < V; ++j) g[j] = (expf(to_f(v.v[j]) - off) * inv - (c + j == t ? one : 0.0f)) * scale;
            store<V>(x + c, g);
          });
    } else {  // ignored row: zeros (whatever the logits, inf or NaN included)
      const float zero[V] = {};
      for_row(x, vocab, [&](int64_t c) { x[c] = from_f<T>(0.0f); }, [&](int64_t c) { store<V>(x + c, zero); });
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------
// Threads a row: a power of two from 32 to 512, doubled while a thread would get more than 4 packs.
int threads_for(int64_t vocab, int vec) {
  const int64_t packs = ceil_div(vocab, vec);
  int t = 32;
  while (t < kMaxThreads && t * int64_t{4} < packs) t *= 2;
  return t;
}

template <bool BWD>
cudaError_t run(DType dt, void* logits, IntType tt, const void* targets, const float* row_scale, int64_t ignore,
                float* loss, float* lse, int64_t rows, int64_t vocab, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (vocab <= 0 || rows > 0x7fffffff || (tt != IntType::i64 && tt != IntType::i32)) return cudaErrorInvalidValue;
  const auto go = [&](auto tag, auto itag) {
    using T = typename decltype(tag)::type;
    using I = typename decltype(itag)::type;
    ce_kernel<T, I, BWD><<<static_cast<unsigned>(rows), threads_for(vocab, kVec<T>), 0, stream>>>(
        static_cast<T*>(logits), static_cast<const I*>(targets), row_scale, ignore, loss, lse, vocab);
    return cudaGetLastError();
  };
  const auto by_target = [&](auto tag) {
    return tt == IntType::i64 ? go(tag, Tag<int64_t>{}) : go(tag, Tag<int32_t>{});
  };
  switch (dt) {
    case DType::f32: return by_target(Tag<float>{});
    case DType::f16: return by_target(Tag<__half>{});
    case DType::bf16: return by_target(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t linear_cross_entropy_fwd(DType dt, const void* logits, IntType tt, const void* targets,
                                     int64_t ignore_index, float* loss, float* lse, int64_t rows, int64_t vocab,
                                     cudaStream_t stream) {
  // the forward kernel only reads logits (BWD = false never stores through the pointer)
  return run<false>(dt, const_cast<void*>(logits), tt, targets, nullptr, ignore_index, loss, lse, rows, vocab, stream);
}

cudaError_t linear_cross_entropy_bwd(DType dt, void* logits, IntType tt, const void* targets, const float* row_scale,
                                     int64_t ignore_index, float* loss, float* lse, int64_t rows, int64_t vocab,
                                     cudaStream_t stream) {
  return run<true>(dt, logits, tt, targets, row_scale, ignore_index, loss, lse, rows, vocab, stream);
}

}  // namespace fastbert::cuda
