#pragma once
// The shared dropout stream (csrc/common/philox.h) on CPU vectors: W counters at a time. Included by
// kernel files only (compiled per ISA), after common/simd.h.
#include "common/philox.h"
#include "common/simd.h"

namespace fastbert::cpu {
namespace {
using namespace fastbert::simd;

// (high, low) 32-bit halves of a * m per lane.
inline void mulhilo(vu a, uint32_t m, vu& hi, vu& lo) {
#if defined(__AVX512F__)
  const __m512i av = bitcast<__m512i>(a), mv = _mm512_set1_epi32(static_cast<int>(m));
  const __m512i even = _mm512_mul_epu32(av, mv), odd = _mm512_mul_epu32(_mm512_srli_epi64(av, 32), mv);
  hi = bitcast<vu>(_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd));
  lo = bitcast<vu>(_mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32)));
#elif defined(__AVX2__)
  const __m256i av = bitcast<__m256i>(a), mv = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i even = _mm256_mul_epu32(av, mv), odd = _mm256_mul_epu32(_mm256_srli_epi64(av, 32), mv);
  hi = bitcast<vu>(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA));
  lo = bitcast<vu>(_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA));
#else
  for (int i = 0; i < W; ++i) {
    const uint64_t p = static_cast<uint64_t>(a[i]) * m;
    hi[i] = static_cast<uint32_t>(p >> 32);
    lo[i] = static_cast<uint32_t>(p);
  }
#endif
}

// Philox4x32-10 of the W counters counter0 + lane.
inline void philox_w(uint64_t seed, uint64_t counter0, vu out[4]) {
  vu c0, c1, c2 = vu{}, c3 = vu{};
  for (int i = 0; i < W; ++i) {
    c0[i] = static_cast<uint32_t>(counter0 + i);
    c1[i] = static_cast<uint32_t>((counter0 + i) >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < philox::kRounds; ++r) {
    vu hi0, lo0, hi1, lo1;
    mulhilo(c0, philox::kM0, hi0, lo0);
    mulhilo(c2, philox::kM1, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c2 = hi0 ^ c3 ^ k1;
    c1 = lo1;
    c3 = lo0;
    k0 += philox::kW0;
    k1 += philox::kW1;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

// The draws of elements [e0, e0 + len) into r[0 .. len): whole 64-element groups from 16 counters
// each (output q of counter 16 g + j is element 64 g + 16 q + j), copied out for the partial ends.
inline void philox_elements(uint64_t seed, uint64_t e0, int64_t len, uint32_t* r) {
  static_assert(16 % W == 0, "a group's 16 counters must be whole vectors");
  alignas(64) uint32_t group[64];
  const uint64_t end = e0 + static_cast<uint64_t>(len);
  for (uint64_t g = e0 >> 6; (g << 6) < end; ++g) {
    for (int q = 0; q < 16; q += W) {
      vu out[4];
      philox_w(seed, (g << 4) + q, out);
      for (int k = 0; k < 4; ++k) std::memcpy(group + 16 * k + q, &out[k], sizeof(vu));
    }
    const uint64_t lo = (g << 6) > e0 ? (g << 6) : e0, hi = ((g + 1) << 6) < end ? ((g + 1) << 6) : end;
    std::memcpy(r + (lo - e0), group + (lo - (g << 6)), (hi - lo) * sizeof(uint32_t));
  }
}

}  // namespace
}  // namespace fastbert::cpu
