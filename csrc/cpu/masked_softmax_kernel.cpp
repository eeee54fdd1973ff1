// Attention softmax, CPU kernels. Compiled once per ISA (see csrc/cpu/kernels.h).
//
// Forward, per row of k keys (fp32 maths):  x = s * scale + mask;  m = max(x);  e = exp(x - m);
//   p = e / sum(e);  with dropout probs = keep ? p * scale_p : 0 and p is written to `softmax` for the
//   backward, otherwise probs = p. A row with m = -inf (every key excluded) gives zeros, never NaN.
//   NaN and inf propagate as in eager PyTorch: a row with a NaN x (a NaN score, scale or mask value
//   at a key that is not bool-excluded) or a +inf x is all NaN (+inf is the row max; a NaN is the max
//   or makes the row sum NaN, the exp keeping it: such rows are then filled with NaN).
//   Masks: bool (False -> x = -inf, whatever the score: masked_fill, so a NaN score at an excluded
//   key weighs nothing) or additive float, converted once per distinct mask row into an fp32 row
//   buffer (a [B, 1, 1, k] mask is converted once per batch entry of the task, not per row); a float64
//   mask's finite values are clamped to float's range (finfo(float64).min stays finite, as in eager's
//   float64 sum; -inf stays -inf).
// Backward:  g = keep ? grad * scale_p : 0 (the mask regenerated; g = grad without dropout);
//   dscores = scale * p * (g - sum(g * p)).
// Rows live in a thread-local fp32 buffer between passes (the fp32 backward without dropout rereads
// its row from L1 instead), so scores and grad are read from memory once. Row sums accumulate in fp32 lanes per block
// of vectors and in fp64 across blocks.
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/simd.h"
#include "cpu/kernels.h"
#include "cpu/philox_simd.h"
#include "cpu/rows.h"

namespace fastbert::cpu::FASTBERT_ISA {
namespace {
using namespace fastbert::simd;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kFloatMax = std::numeric_limits<float>::max();

// A float64 mask value as float: finite values clamped to float's range (so that a finite
// finfo(float64).min stays a finite large negative value, as it is in eager's float64 arithmetic),
// +-inf and NaN unchanged.
inline float mask_to_float(double m) {
  return static_cast<float>(m < -kFloatMax && m > -INFINITY ? -kFloatMax
                            : m > kFloatMax && m < INFINITY ? kFloatMax
                                                            : m);
}

struct RowBuffers {  // per thread, grown to the row length (+ one vector of padding)
  std::vector<float> x, mask;
  std::vector<uint32_t> rnd;
  int64_t mask_off = -1;  // the mask row held in `mask` (reset at every kernel call)
  void fit(int64_t k, bool dropout) {
    if (static_cast<int64_t>(x.size()) < k + W) x.resize(k + W), mask.resize(k + W);
    if (dropout && static_cast<int64_t>(rnd.size()) < k + W) rnd.resize(k + W);
    mask_off = -1;
  }
};
thread_local RowBuffers buffers;

// An output store: streaming (non-temporal) for whole vectors when `nt` (the row is vector-aligned).
template <typename T>
inline void st_out(T* p, vf v, int64_t m, bool nt) {
  nt&& m == W ? store_stream(p, v) : st(p, v, m);
}
template <typename T>
inline bool aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (W * sizeof(T)) == 0;
}

// The lanes' max (a NaN lane may or may not show: the callers find NaN rows either way).
inline float hmax(vf v) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  const __m256 a = bitcast<__m256>(v);
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
#else
  float r = v[0];
  for (int i = 1; i < W; ++i) r = v[i] > r ? v[i] : r;
  return r;
#endif
}

// rows.h's Sum (fp32 lanes per block of vectors, fp64 across blocks) with the flush as a vector fp64
// sum under AVX2: a 128-key row is one block, and the scalar flush was ~25 instructions a row.
struct RowSum {
  vf acc = vf{};
  double total = 0.0;
  void flush() {
#if defined(__AVX2__) && !defined(__AVX512F__)
    const __m256 a = bitcast<__m256>(acc);
    const __m256d d =
        _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
    total += _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
#else
    for (int k = 0; k < W; ++k) total += acc[k];
#endif
    acc = vf{};
  }
};

// e^(x - max) as 2^t, t = x log2(e) - max log2(e) in one fused multiply-add (`mlog2e` = the
// rounded max log2(e)): its rounding error is the same for the whole row, a common factor that the
// normalisation cancels, so this is as accurate as rounding (x - max) first. t <= 0, so no overflow
// check. 2^t = p(f) 2^n (n = round(t), |f| <= 1/2, the degree-5 polynomial of simd.h's vexp2_unchecked)
// with t clamped at -127 and 2^n built as a float from the bits n + 127: +0 at n = -127, so excluded
// keys (x = -inf) weigh exactly nothing with no compare and mask (12 vector instructions per W
// elements). The clamp keeps a NaN t (max_ps returns its second operand), so a NaN x makes the row
// sum NaN: the caller finds NaN rows from the sum, not with a compare per element.
constexpr float kLog2e = 1.44269504088896341f;
// Rows whose |max log2(e)| is not below this are shifted by the max first (x - max, exact near the
// max) and use mlog2e = 0: above 2^24 the rounding error of mlog2e passes 1. Without a fused
// multiply-add (the generic build) x log2(e) itself rounds, by a different amount per key: always shift.
#ifdef __FMA__
constexpr float kShiftAbove = 0x1p24f;
#else
constexpr float kShiftAbove = 0.0f;
#endif
// 1.5 * 2^23 + 127: t + kRound holds round(t) + 127 in its low mantissa bits (for t in [-127, 0]).
constexpr float kRound = 12582912.0f + 127.0f;

inline vf exp_or_zero(vf x, float mlog2e) {
  const vf t = vmax(splat(-127.0f), x * kLog2e - mlog2e);  // NaN t stays NaN (second operand)
  const vf k = t + kRound;
  return exp2_poly(t - (k - kRound)) *
         bitcast<vf>(bitcast<vu>(k) << 23);  // exponent field n + 127, mantissa 0: 2^n, or +0
}

// Dropout of v: keep ? v * scale : 0, a select (a dropped element is 0 even when v is NaN or inf,
// as eager's torch.where; v * 0 would let NaN through).
inline vf dropout_apply(const Dropout& d, const uint32_t* rnd, vf v) {
  vu r;
  std::memcpy(&r, rnd, sizeof r);
  return (r >> 8) >= d.threshold ? v * d.scale : vf{};
}

inline int64_t mask_offset(const SoftmaxArgs& a, int64_t r) {
  const int64_t q = r % a.queries, h = (r / a.queries) % a.heads, b = r / (a.queries * a.heads);
  return b * a.mask_stride[0] + h * a.mask_stride[1] + q * a.mask_stride[2];
}

template <typename M>
void convert_mask(const M* m, int64_t stride, int64_t k, float* out) {
  if (stride == 0) {
    const float v = load_partial(m, 1)[0];
    for (int64_t i = 0; i < k; ++i) out[i] = v;
  } else {
    for_row(k, [&](int64_t i, int64_t w) { st(out + i, ld(m + i, w), w); });
  }
}

// The row's additive mask as k floats, or null without a mask.
const float* mask_row(const SoftmaxArgs& a, int64_t r, RowBuffers& buf) {
  if (!a.mask) return nullptr;
  const int64_t off = mask_offset(a, r), ks = a.mask_stride[3], k = a.k;
  if (!a.mask_is_bool && a.mask_dtype == DType::f32 && ks == 1) return static_cast<const float*>(a.mask) + off;
  float* out = buf.mask.data();
  if (off == buf.mask_off) return out;
  buf.mask_off = off;
  if (a.mask_is_bool) {
    const uint8_t* m = static_cast<const uint8_t*>(a.mask) + off;
    for (int64_t i = 0; i < k; ++i) out[i] = m[i * ks] ? 0.0f : kNegInf;
    return out;
  }
  switch (a.mask_dtype) {
    case DType::f32: convert_mask(static_cast<const float*>(a.mask) + off, ks, k, out); break;
    case DType::f16: convert_mask(static_cast<const f16*>(a.mask) + off, ks, k, out); break;
    case DType::bf16: convert_mask(static_cast<const bf16*>(a.mask) + off, ks, k, out); break;
    case DType::f64: {
      const double* m = static_cast<const double*>(a.mask) + off;
      for (int64_t i = 0; i < k; ++i) out[i] = mask_to_float(m[i * ks]);
      break;
    }
  }
  return out;
}

// A row of NaN (dropped elements are 0 even here: a select), and NaN in the pre-dropout softmax.
template <typename T>
void nan_row(const Dropout* drop, int64_t off, int64_t k, uint32_t* rnd, T* probs, T* soft) {
  if (drop) philox_elements(drop->seed, off, k, rnd);
  for_row(k, [&](int64_t i, int64_t m) {
    st(probs + off + i, drop ? dropout_apply(*drop, rnd + i, splat(kNaN)) : splat(kNaN), m);
    if (drop) st(soft + off + i, splat(kNaN), m);
  });
}

template <typename T>
void fwd_rows(const SoftmaxArgs& a, int64_t r0, int64_t r1) {
  const int64_t k = a.k;
  RowBuffers& buf = buffers;
  buf.fit(k, a.dropout != nullptr);
  const T* s = static_cast<const T*>(a.scores);
  T* probs = static_cast<T*>(a.probs);
  T* soft = static_cast<T*>(a.softmax);
  float* x = buf.x.data();
  uint32_t* rnd = buf.rnd.data();
  const float scale = a.scale;
  const Dropout* drop = a.dropout;  // locals: the row stores could alias `a` as far as the compiler knows
  const bool bool_mask = a.mask_is_bool;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * k;
    const float* madd = mask_row(a, r, buf);
    vf vmx = splat(kNegInf);
    for_row(k, [&](int64_t i, int64_t m) {  // pass 1: x = s * scale + mask, the row max
      vf v = ld(s + off + i, m) * scale;
      if (madd) {
        const vf mv = ld(madd + i, m);
        v = bool_mask ? (mv < 0.0f ? splat(kNegInf) : v) : v + mv;  // bool: excluded -> -inf, even NaN
      }
      for (int64_t j = m; j < W; ++j) v[j] = kNegInf;  // tail lanes: no weight
      store(x + i, v);
      vmx = vmax(vmx, v);  // a NaN lane may or may not end up in the max: both are handled below
    });
    const float mx = hmax(vmx);
    // A NaN (or +inf: inf - inf = NaN) in the row makes it all NaN, as eager. +inf shows in the max; a
    // NaN shows in the max (then found by the scan below) or in the row sum of pass 2.
    if (mx == -kNegInf) {
      nan_row(drop, off, k, rnd, probs, soft);
      continue;
    }
    if (!(mx > kNegInf)) {  // every key excluded (zeros), or a NaN max
      bool nan = false;
      for (int64_t i = 0; i < k; ++i) nan |= x[i] != x[i];
      if (nan) {
        nan_row(drop, off, k, rnd, probs, soft);
      } else {
        std::memset(static_cast<void*>(probs + off), 0, k * sizeof(T));
        if (drop) std::memset(static_cast<void*>(soft + off), 0, k * sizeof(T));
      }
      continue;
    }
    float mlog2e = mx * kLog2e;
    // A large max (a finite finfo.min mask on every key, a score of 1e30): the rounding error of
    // mlog2e, 2^-24 |mlog2e|, is no longer a harmless common factor (2^(7e22): inf / inf = NaN).
    if (!(std::fabs(mlog2e) < kShiftAbove)) {
      for_row(k, [&](int64_t i, int64_t) { store(x + i, load(x + i) - mx); });  // shift first, no overflow
      mlog2e = 0.0f;
    }
    RowSum sum;
    for_row(
        k,
        [&](int64_t i, int64_t) {  // pass 2: e = exp(x - max), the row sum
          const vf e = exp_or_zero(load(x + i), mlog2e);
          store(x + i, e);
          sum.acc += e;
        },
        [&] { sum.flush(); });
    if (sum.total != sum.total) {  // a NaN x (exp keeps NaN)
      nan_row(drop, off, k, rnd, probs, soft);
      continue;
    }
    const float inv = static_cast<float>(1.0 / sum.total);
    const bool nt = a.stream && aligned(probs + off);  // (soft has the same layout)
    if (drop) {  // pass 3: normalise (and drop)
      philox_elements(drop->seed, off, k, rnd);
      const Dropout d = *drop;
      for_row(k, [&](int64_t i, int64_t m) {
        const vf p = load(x + i) * inv;
        st_out(soft + off + i, p, m, nt && aligned(soft + off));
        st_out(probs + off + i, dropout_apply(d, rnd + i, p), m, nt);
      });
    } else {
      for_row(k, [&](int64_t i, int64_t m) { st_out(probs + off + i, load(x + i) * inv, m, nt); });
    }
  }
  if (a.stream) stream_fence();
}

template <typename T>
void bwd_rows(const SoftmaxArgs& a, int64_t r0, int64_t r1) {
  const int64_t k = a.k;
  RowBuffers& buf = buffers;
  buf.fit(k, a.dropout != nullptr);
  const T* grad = static_cast<const T*>(a.grad);
  const T* p = static_cast<const T*>(a.saved);
  T* ds = static_cast<T*>(a.dscores);
  float* g = buf.x.data();
  uint32_t* rnd = buf.rnd.data();
  const float scale = a.scale;
  const bool dropping = a.dropout != nullptr;
  const Dropout d = dropping ? *a.dropout : Dropout{};
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * k;
    const bool nt = a.stream && aligned(ds + off);
    if (std::is_same_v<T, float> && !dropping) {  // g = grad: the second pass rereads it from L1
      // (fp32 only: a 16-bit row would be converted twice)
      RowSum sum;
      for_row(
          k, [&](int64_t i, int64_t m) { sum.acc += ld(grad + off + i, m) * ld(p + off + i, m); },
          [&] { sum.flush(); });
      const float dot = static_cast<float>(sum.total);
      for_row(k, [&](int64_t i, int64_t m) {
        st_out(ds + off + i, scale * ld(p + off + i, m) * (ld(grad + off + i, m) - dot), m, nt);
      });
      continue;
    }
    if (dropping) philox_elements(d.seed, off, k, rnd);
    RowSum sum;
    for_row(
        k,
        [&](int64_t i, int64_t m) {  // pass 1: g (after dropout's backward), sum(g * p)
          vf gv = ld(grad + off + i, m);
          if (dropping) gv = dropout_apply(d, rnd + i, gv);  // a NaN grad at a dropped key gives 0
          store(g + i, gv);
          sum.acc += gv * ld(p + off + i, m);  // tail lanes load as 0
        },
        [&] { sum.flush(); });
    const float dot = static_cast<float>(sum.total);
    for_row(k, [&](int64_t i, int64_t m) {  // pass 2: dscores
      st_out(ds + off + i, scale * ld(p + off + i, m) * (load(g + i) - dot), m, nt);
    });
  }
  if (a.stream) stream_fence();
}

// ---- float64 (gradcheck and fp64 users): scalar, fp64 throughout ----
double mask_at(const SoftmaxArgs& a, int64_t idx) {
  if (a.mask_is_bool) return static_cast<const uint8_t*>(a.mask)[idx] ? 0.0 : -INFINITY;
  switch (a.mask_dtype) {
    case DType::f32: return static_cast<const float*>(a.mask)[idx];
    case DType::f16: return load_partial(static_cast<const f16*>(a.mask) + idx, 1)[0];
    case DType::bf16: return load_partial(static_cast<const bf16*>(a.mask) + idx, 1)[0];
    case DType::f64: break;
  }
  return static_cast<const double*>(a.mask)[idx];
}

// keep ? v * scale : 0 (a select: a dropped NaN is 0); v without dropout.
double dropout_f64(const Dropout* d, int64_t e, double v) {
  if (!d) return v;
  return philox::keep(philox::element(d->seed, e), d->threshold) ? v * static_cast<double>(d->scale) : 0.0;
}

void fwd_rows_f64(const SoftmaxArgs& a, int64_t r0, int64_t r1) {
  const int64_t k = a.k;
  const double* s = static_cast<const double*>(a.scores);
  double *probs = static_cast<double*>(a.probs), *soft = static_cast<double*>(a.softmax);
  std::vector<double> x(k);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * k, moff = a.mask ? mask_offset(a, r) : 0;
    double mx = -INFINITY, total = 0.0;
    bool nonfinite = false;
    for (int64_t i = 0; i < k; ++i) {
      const double m = a.mask ? mask_at(a, moff + i * a.mask_stride[3]) : 0.0;
      // a bool mask excludes a key whatever its score (masked_fill): -inf, not NaN + -inf
      x[i] = a.mask_is_bool && m < 0 ? -INFINITY : s[off + i] * a.scale64 + m;
      mx = x[i] > mx ? x[i] : mx;
      nonfinite |= std::isnan(x[i]) || x[i] == INFINITY;
    }
    for (int64_t i = 0; i < k; ++i) total += x[i] = mx > -INFINITY ? std::exp(x[i] - mx) : 0.0;
    for (int64_t i = 0; i < k; ++i) {
      // a NaN or +inf x makes the row NaN, as in eager
      const double p = nonfinite ? NAN : total > 0 ? x[i] / total : 0.0;
      if (soft) soft[off + i] = p;
      probs[off + i] = dropout_f64(a.dropout, off + i, p);
    }
  }
}

void bwd_rows_f64(const SoftmaxArgs& a, int64_t r0, int64_t r1) {
  const int64_t k = a.k;
  const double *grad = static_cast<const double*>(a.grad), *p = static_cast<const double*>(a.saved);
  double* ds = static_cast<double*>(a.dscores);
  std::vector<double> g(k);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * k;
    double dot = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      g[i] = dropout_f64(a.dropout, off + i, grad[off + i]);
      dot += g[i] * p[off + i];
    }
    for (int64_t i = 0; i < k; ++i) ds[off + i] = a.scale64 * p[off + i] * (g[i] - dot);
  }
}

}  // namespace

void masked_softmax_fwd(DType dt, const SoftmaxArgs& a, int64_t r0, int64_t r1) {
  FASTBERT_CPU_BY_DTYPE(dt, fwd_rows, fwd_rows_f64, a, r0, r1)
}

void masked_softmax_bwd(DType dt, const SoftmaxArgs& a, int64_t r0, int64_t r1) {
  FASTBERT_CPU_BY_DTYPE(dt, bwd_rows, bwd_rows_f64, a, r0, r1)
}

}  // namespace fastbert::cpu::FASTBERT_ISA
