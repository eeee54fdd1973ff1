#pragma once
// Device helpers shared by the CUDA kernel files (no torch headers): fp32 <-> storage conversions,
// 16-byte packs of adjacent elements, and a 16-byte global store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastbert::cuda {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f(float v) {
  return __float2bfloat16_rn(v);
}
__device__ __forceinline__ unsigned bits16(__half h) { return __half_as_ushort(h); }
__device__ __forceinline__ unsigned bits16(__nv_bfloat16 h) { return __bfloat16_as_ushort(h); }
template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte access

// V adjacent elements loaded as one access of up to 16 bytes (two for 8 floats).
template <typename T, int V>
struct alignas(sizeof(T) * V < 16 ? sizeof(T) * V : 16) Pack {
  T v[V];
};
template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

// 16 bytes in one st.global.v4 (the compiler may split the C++ vector store into 4-byte stores).
__device__ __forceinline__ void store16(void* p, unsigned a, unsigned b, unsigned c, unsigned d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// Rounds v to T and stores it at p (16-byte aligned when V > 1; V * sizeof(T) is then 16).
template <int V, typename T>
__device__ __forceinline__ void store(T* p, const float (&v)[V]) {
  if constexpr (V == 1) {
    *p = from_f<T>(v[0]);
  } else if constexpr (sizeof(T) == 4) {
    store16(p, __float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  } else {
    unsigned w[4];  // two halves a word, the lower address in the low bits
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = bits16(from_f<T>(v[2 * k])) | bits16(from_f<T>(v[2 * k + 1])) << 16;
    store16(p, w[0], w[1], w[2], w[3]);
  }
}

// ---- host side
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
template <typename T>
struct Tag {
  using type = T;
};  // a dtype as a value, for generic lambdas

}  // namespace fastbert::cuda
