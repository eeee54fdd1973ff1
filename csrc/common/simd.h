#pragma once
// A small portable SIMD layer for the CPU kernels, built on GCC/Clang vector extensions.
//
// Kernel files (csrc/cpu/*_kernel.cpp) are compiled once per instruction set by setup.py
// (-mavx512f... -mavx512bf16, -mavx512f..., -mavx2 -mfma -mf16c, or no flags). The lane count W
// follows those flags, so the same source becomes 16-, 8- or 4-wide code (the 4-wide generic build
// lowers to SSE2 on x86-64 and NEON on arm64). No torch headers here: kernel files stay cheap to
// compile four times.
//
// Storage types: float, f16 (IEEE half) and bf16 are loaded into fp32 lanes and stored back with
// round-to-nearest-even. All arithmetic is fp32.
#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace fastbert::simd {

#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX2__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));

struct f16 {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};

template <typename To, typename From>
inline To bitcast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bitcast size mismatch");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

inline vf splat(float a) { return vf{} + a; }

// min/max map to single instructions where the ISA has them (a compare + blend
// otherwise, which costs twice as much in these compute-bound kernels).
inline vf vmin(vf a, vf b) {
#if defined(__AVX512F__)
  return bitcast<vf>(_mm512_min_ps(bitcast<__m512>(a), bitcast<__m512>(b)));
#elif defined(__AVX2__)
  return bitcast<vf>(_mm256_min_ps(bitcast<__m256>(a), bitcast<__m256>(b)));
#elif defined(__SSE2__)
  return bitcast<vf>(_mm_min_ps(bitcast<__m128>(a), bitcast<__m128>(b)));
#else
  return a < b ? a : b;
#endif
}
inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
  return bitcast<vf>(_mm512_max_ps(bitcast<__m512>(a), bitcast<__m512>(b)));
#elif defined(__AVX2__)
  return bitcast<vf>(_mm256_max_ps(bitcast<__m256>(a), bitcast<__m256>(b)));
#elif defined(__SSE2__)
  return bitcast<vf>(_mm_max_ps(bitcast<__m128>(a), bitcast<__m128>(b)));
#else
  return a > b ? a : b;
#endif
}
// Lane-wise: a where the sign bit of s is set (negative s, -0 included), else b.
inline vf vselect_neg(vf s, vf a, vf b) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  return bitcast<vf>(
      _mm512_mask_blend_ps(_mm512_movepi32_mask(bitcast<__m512i>(s)), bitcast<__m512>(b), bitcast<__m512>(a)));
#elif defined(__AVX2__)
  return bitcast<vf>(_mm256_blendv_ps(bitcast<__m256>(b), bitcast<__m256>(a), bitcast<__m256>(s)));
#else
  return bitcast<vi>(s) < 0 ? a : b;
#endif
}
inline vf vmin(vf a, float b) { return vmin(a, splat(b)); }
inline vf vmax(vf a, float b) { return vmax(a, splat(b)); }
inline vf vabs(vf a) { return bitcast<vf>(bitcast<vu>(a) & 0x7fffffffu); }

// ---- fp16 <-> fp32 (bit manipulation unless the F16C instructions are available) ----
inline vf half_to_float(vh h) {
#if defined(__AVX512F__)
  __m256i raw;
  std::memcpy(&raw, &h, sizeof raw);
  return bitcast<vf>(_mm512_cvtph_ps(raw));
#elif defined(__F16C__) && defined(__AVX2__)
  __m128i raw;
  std::memcpy(&raw, &h, sizeof raw);
  return bitcast<vf>(_mm256_cvtph_ps(raw));
#else
  const vu u = __builtin_convertvector(h, vu);
  const vu shifted_exp = vu{} + (0x7c00u << 13);
  vu o = (u & 0x7fffu) << 13;               // exponent and mantissa, moved into place
  const vu exp = o & shifted_exp;
  o += (127u - 15u) << 23;                  // rebias the exponent
  o = exp == shifted_exp ? o + ((128u - 16u) << 23) : o;  // inf / nan
  const vf denorm = bitcast<vf>(o + (1u << 23)) - bitcast<vf>(vu{} + (113u << 23));
  o = exp == 0 ? bitcast<vu>(denorm) : o;   // zero / subnormal
  return bitcast<vf>(o | ((u & 0x8000u) << 16));
#endif
}

inline vh float_to_half(vf f) {
#if defined(__AVX512F__)
  __m256i raw = _mm512_cvtps_ph(bitcast<__m512>(f), _MM_FROUND_TO_NEAREST_INT);
  return bitcast<vh>(raw);
#elif defined(__F16C__) && defined(__AVX2__)
  __m128i raw = _mm256_cvtps_ph(bitcast<__m256>(f), _MM_FROUND_TO_NEAREST_INT);
  return bitcast<vh>(raw);
#else
  vu u = bitcast<vu>(f);
  const vu sign = u & 0x80000000u;
  u ^= sign;
  const vu f16max = vu{} + ((127u + 16u) << 23);
  const vu naninf = u > (255u << 23) ? vu{} + 0x7e00u : vu{} + 0x7c00u;
  const vu magic = vu{} + (((127u - 15u) + (23u - 10u) + 1u) << 23);
  const vu sub = bitcast<vu>(bitcast<vf>(u) + bitcast<vf>(magic)) - magic;  // subnormal, rounded
  const vu odd = (u >> 13) & 1u;
  const vu norm = (u + ((15u - 127u) << 23) + 0xfffu + odd) >> 13;       // normal, rounded to even
  vu o = u >= f16max ? naninf : (u < (113u << 23) ? sub : norm);
  return __builtin_convertvector(o | (sign >> 16), vh);
#endif
}

// ---- bf16 <-> fp32 ----
inline vf bf16_to_float(vh h) { return bitcast<vf>(__builtin_convertvector(h, vu) << 16); }

// Every bf16 store (store, store_partial, store_stream) goes through float_to_bf16. With AVX512-BF16
// it is one VCVTNEPS2BF16: round to nearest even like the bit arithmetic (overflow to inf included),
// NaN kept a quiet NaN (with its sign and top payload bits, where the bit arithmetic and torch write
// 0x7fc0); but it treats denormal inputs as zero and flushes denormal outputs (DAZ/FTZ, whatever
// MXCSR says): for 0 < |x| < 2^-126 (1.2e-38) it writes a zero of x's sign where the bit arithmetic
// (and torch) keep a bf16 subnormal. Every other value converts to the same bits.
inline vh float_to_bf16(vf f) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  return bitcast<vh>(_mm512_cvtneps_pbh(bitcast<__m512>(f)));
#else
  const vu u = bitcast<vu>(f);
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  const vu out = f != f ? vu{} + 0x7fc0u : rounded;            // keep NaN a quiet NaN
  return __builtin_convertvector(out, vh);
#endif
}

// ---- loads and stores of W lanes, full or partial (n < W, the rest zero) ----
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf load(const f16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return half_to_float(h);
}
inline vf load(const bf16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return bf16_to_float(h);
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store(f16* p, vf v) {
  vh h = float_to_half(v);
  std::memcpy(p, &h, sizeof h);
}
inline void store(bf16* p, vf v) {
  vh h = float_to_bf16(v);
  std::memcpy(p, &h, sizeof h);
}

// Non-temporal (streaming) stores of W lanes to memory aligned to the vector's size: they bypass
// the caches and skip the read-for-ownership of each written line, for outputs far larger than the
// last-level cache. The caller issues stream_fence() before its results are read elsewhere.
template <typename V>
inline void stream_bits(void* p, V v) {
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
  if constexpr (sizeof(V) == 64) {
    _mm512_stream_si512(static_cast<__m512i*>(p), bitcast<__m512i>(v));
  } else if constexpr (sizeof(V) == 32) {
    _mm256_stream_si256(static_cast<__m256i*>(p), bitcast<__m256i>(v));
  } else if constexpr (sizeof(V) == 16) {
    _mm_stream_si128(static_cast<__m128i*>(p), bitcast<__m128i>(v));
  } else {
    static_assert(sizeof(V) == 8, "stream_bits: 8 to 64 bytes");
    _mm_stream_si64(static_cast<long long*>(p), bitcast<long long>(v));
  }
#else
  std::memcpy(p, &v, sizeof v);
#endif
}
inline void store_stream(float* p, vf v) { stream_bits(p, v); }
inline void store_stream(f16* p, vf v) { stream_bits(p, float_to_half(v)); }
inline void store_stream(bf16* p, vf v) { stream_bits(p, float_to_bf16(v)); }
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <typename T>
inline vf load_partial(const T* p, int64_t n) {
  T tmp[W];
  std::memset(tmp, 0, sizeof tmp);
  std::memcpy(tmp, p, n * sizeof(T));
  return load(tmp);
}
template <typename T>
inline void store_partial(T* p, vf v, int64_t n) {
  T tmp[W];
  store(tmp, v);
  std::memcpy(p, tmp, n * sizeof(T));
}

// ---- math ----
// exp(x): x = n ln2 + r (ln2 split in two so r is exact), |r| <= ln2/2, Cephes' polynomial for e^r,
// 2^n added to the exponent bits. About 1 ulp. x is clamped to [-86, 88] so results stay finite
// and normal (exp(-86) = 4e-38 stands in for anything smaller).
inline vf vexp(vf x) {
  x = vmin(vmax(x, -86.0f), 88.0f);
  const vf k = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds, n in the low bits
  const vf n = k - 12582912.0f;
  vf r = x - n * 0.693359375f;                           // ln2 = 0.693359375 - 2.12194440e-4
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return bitcast<vf>(bitcast<vu>(p) + (bitcast<vu>(k) << 23));  // p * 2^n
}

// 2^f for |f| <= 1/2: the degree-5 minimax polynomial (7.6e-8 relative).
inline vf exp2_poly(vf f) {
  vf p = splat(1.328230404e-03f);
  p = p * f + 9.675590381e-03f;
  p = p * f + 5.550695255e-02f;
  p = p * f + 2.402211850e-01f;
  p = p * f + 6.931469781e-01f;
  return p * f + 1.000000072e+00f;
}

// 2^t for t in [-125, 127] (not checked: callers guarantee the range): t = n + f, |f| <= 1/2,
// exp2_poly(f), 2^n added to the exponent bits. Cheaper than
// vexp where the argument is known to be in range and ~2e-7 relative is enough.
inline vf vexp2_unchecked(vf t) {
  const vf k = t + 12582912.0f;  // 1.5 * 2^23: rounds, n in the low bits
  const vf p = exp2_poly(t - (k - 12582912.0f));
  return bitcast<vf>(bitcast<vu>(p) + (bitcast<vu>(k) << 23));  // p * 2^n
}

}  // namespace fastbert::simd
