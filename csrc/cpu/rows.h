#pragma once
// Row loops shared by the CPU kernel files (included by them only, after common/simd.h; compiled per
// ISA like them, so everything here sits in an anonymous namespace of the kernel's ISA namespace).
#include <cstdint>

#include "common/simd.h"
#include "cpu/kernels.h"

namespace fastbert::cpu::FASTBERT_ISA {
namespace {
using namespace fastbert::simd;

// Runs body(i, m) over a row's vectors: m = W for whole ones (a constant once inlined, so the
// `m == W ? load : load_partial` choices fold away), m < W for the tail. flush() follows every kBlock
// vectors and the tail: row sums accumulate in fp32 lanes per block and in fp64 across blocks, so
// rounding does not grow with the row length (a 4099-long row in 4 lanes would lose ~2 digits).
constexpr int64_t kBlock = 16;
template <typename Body, typename Flush>
inline void for_row(int64_t n, Body&& body, Flush&& flush) {
  const int64_t whole = n / W * W;
  int64_t i = 0;
  while (i < whole) {
    const int64_t end = i + kBlock * W < whole ? i + kBlock * W : whole;
    for (; i < end; i += W) body(i, int64_t{W});
    flush();
  }
  if (i < n) {
    body(i, n - i);
    flush();
  }
}
template <typename Body>
inline void for_row(int64_t n, Body&& body) {
  for_row(n, body, [] {});
}

template <typename T>
inline vf ld(const T* p, int64_t m) {
  return m == W ? load(p) : load_partial(p, m);
}
template <typename T>
inline void st(T* p, vf v, int64_t m) {
  m == W ? store(p, v) : store_partial(p, v, m);
}
inline vf head(vf v, int64_t m) { return m == W ? v : load_partial(&v[0], m); }  // lanes >= m zeroed

struct Sum {  // a row sum: fp32 lanes within a block, fp64 across blocks
  vf acc = vf{};
  double total = 0.0;
  void flush() {
    for (int k = 0; k < W; ++k) total += acc[k];
    acc = vf{};
  }
};

}  // namespace
}  // namespace fastbert::cpu::FASTBERT_ISA

// The body of a kernel entry point: `vec_fn<T>(args...)` for the vectorised storage types,
// `scalar_fn(args...)` (the float64 path) for DType::f64.
#define FASTBERT_CPU_BY_DTYPE(dt, vec_fn, scalar_fn, ...) \
  switch (dt) {                                           \
    case DType::f32: return vec_fn<float>(__VA_ARGS__);   \
    case DType::f16: return vec_fn<f16>(__VA_ARGS__);     \
    case DType::bf16: return vec_fn<bf16>(__VA_ARGS__);   \
    case DType::f64: return scalar_fn(__VA_ARGS__);       \
  }
