#pragma once
// The dropout random stream every backend shares (fastbert/philox.py is the specification):
// Philox4x32-10 with key (seed low, seed high) and counter (c low, c high, 0, 0), as Triton's
// tl.randint4x. Element e of a [rows, n] tensor (flat index) takes output (e % 64) / 16 of counter
// 16 * (e / 64) + e % 16; it is kept when (r >> 8) >= threshold(p), and kept values are scaled by
// scale(p). Host and device (nvcc) code.
#include <cstdint>

#if defined(__CUDACC__)
#define FASTBERT_HD __host__ __device__ __forceinline__
#else
#define FASTBERT_HD inline
#endif

namespace fastbert::philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key increments
constexpr int kRounds = 10;

struct U4 {
  uint32_t v[4];
};

FASTBERT_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

FASTBERT_HD U4 philox4x32(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int i = 0; i < kRounds; ++i) {
    const uint32_t n0 = mulhi(kM1, c2) ^ c1 ^ k0, n2 = mulhi(kM0, c0) ^ c3 ^ k1;
    c1 = kM1 * c2;
    c3 = kM0 * c0;
    c0 = n0;
    c2 = n2;
    k0 += kW0;
    k1 += kW1;
  }
  return {{c0, c1, c2, c3}};
}

// The counter of element e and which of its four outputs e takes.
FASTBERT_HD uint64_t counter_of(uint64_t e) { return ((e >> 6) << 4) | (e & 15); }
FASTBERT_HD int output_of(uint64_t e) { return static_cast<int>((e & 63) >> 4); }

// The 32-bit draw of element e (one Philox call per element: for scalar/tail code; vector code
// computes a whole group of 64 elements from 16 counters).
FASTBERT_HD uint32_t element(uint64_t seed, uint64_t e) { return philox4x32(seed, counter_of(e)).v[output_of(e)]; }

FASTBERT_HD uint32_t threshold(double p) { return static_cast<uint32_t>(p * 16777216.0 + 0.5); }
FASTBERT_HD float scale(double p) { return static_cast<float>(1.0 / (1.0 - p)); }
FASTBERT_HD bool keep(uint32_t r, uint32_t thr) { return (r >> 8) >= thr; }

}  // namespace fastbert::philox
