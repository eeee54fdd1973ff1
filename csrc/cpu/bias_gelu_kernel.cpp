// bias + GELU, CPU kernels. Compiled once per ISA (see csrc/cpu/kernels.h).
//
// Forward   z = x + b,  exact: y = z * Phi(z),  Phi(z) = (1 + erf(z / sqrt 2)) / 2
//                       tanh:  y = z * s,       s = sigmoid(2u) = (1 + tanh u) / 2,
//                                               u = sqrt(2/pi) (z + 0.044715 z^3)
// Backward  dz = dy * gelu'(z),
//           exact: gelu'(z) = Phi(z) + z phi(z),  phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
// fp32 forms: Phi from a fitted erfcx rational (normal_cdf; fp16/bf16 outputs use the cheaper erf
// rational), gelu' from one fitted rational (gelu_grad).
//           tanh:  gelu'(z) = s + 2 z s (1 - s) u',  u' = sqrt(2/pi) (1 + 3 * 0.044715 z^2)
//           dx = dz, dbias = sum of dz over rows. z is recomputed from x and b (nothing is saved).
// Writing 0.5 (1 + tanh u) as 1 / (1 + exp(-2u)) needs one exp and no cancellation for z << 0.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/simd.h"
#include "cpu/kernels.h"

namespace fastbert::cpu::FASTBERT_ISA {
namespace {
using namespace fastbert::simd;

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kCubic = 0.044715f;
constexpr float kLog2e = 1.44269504088896341f;
// |z| >= 10 saturates the tanh form to fp32 precision (|u| > 43, e^(-2|u|) < 1e-38); clamping z
// inside u keeps z^3 and exp finite for any finite input, so gelu'(huge) is exactly 1 or 0. NaN and
// +-inf z get a NaN gradient (torch's value; the clamps alone would return 1, 0 or a finite value).
constexpr float kTanhClamp = 10.0f;

// Phi(z) without cancellation: with a = |z| / sqrt 2, erfc(a) = exp(-a^2) erfcx(a) and erfcx(a) =
// P(a) / Q(a) to 7e-8 relative on [0, 4] (scripts/fit_gelu.py forward); Phi = erfc(a) / 2 for z < 0
// and 1 - erfc(a) / 2 otherwise, so the tail keeps its relative accuracy (0.5 + erf / 2 would lose
// it: erf is only good to ~3e-7 absolute near +-1 in fp32). Past a = 4 the rational extrapolates
// with the right asymptote (erfcx ~ 1/(a sqrt pi)), 4e-5 relative up to a = 9, where a is clamped
// and erfc(a) / 2 taken as 0 beyond (erfc(9) = 4e-37: Phi is 0 or 1 to fp32 precision). Returning the
// clamped value instead made z * Phi grow with |z| (-62 for z = -3e38, eager: -0); with 0 it is -0
// for any finite z << 0 and NaN for z = -inf (-inf * 0), as eager gives.
inline vf normal_cdf(vf z) {
  const vf a_raw = vabs(z) * kSqrt1_2;
  const vf a = vmin(a_raw, 9.0f);
  const vf e = vexp2_unchecked(a * a * -kLog2e);  // exp(-a^2), -a^2 log2 e in [-117, 0]
  vf p = splat(0.5f * 7.583220580e-02f);  // P / 2: the halving of erfc folded in
  p = p * a + 0.5f * 4.137109122e-01f;
  p = p * a + 0.5f * 9.406895939e-01f;
  p = p * a + 0.5f * 9.999999283e-01f;
  vf q = splat(1.344987700e-01f);
  q = q * a + 7.316200554e-01f;
  q = q * a + 1.748460695e+00f;
  q = q * a + 2.069064260e+00f;
  q = q * a + 1.0f;
  const vf half_erfc = a_raw > 9.0f ? vf{} : e * p / q;
  return vselect_neg(z, half_erfc, 1.0f - half_erfc);
}

// erf(x) as x P(x^2) / Q(x^2) on [-4, 4] (the rational Eigen and XLA use: 6.5e-8 in exact arithmetic,
// ~3e-7 absolute in fp32). Cheaper than normal_cdf; 0.5 + erf / 2 cancels in the negative tail (errors
// ~1e-6 absolute for |z| > 3), invisible at fp16/bf16 output precision, so it serves those dtypes.
inline vf erf_rational(vf x) {
  x = vmin(vmax(x, -4.0f), 4.0f);
  const vf x2 = x * x;
  vf p = splat(-2.72614225801306e-10f);
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  vf q = splat(-1.45660718464996e-05f);
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

// ACCURATE: fp32 outputs get the cancellation-free Phi; fp16/bf16 outputs the cheaper erf form.
template <bool TANH, bool ACCURATE>
inline vf gelu(vf z) {
  if (TANH) {
    // s = sigmoid(2u) < 2e-38 below z = -10: 0 there (the clamped value times a huge z was not ~0:
    // -3.6 for z = -3e38); z * 0 is -0 for finite z and NaN for -inf, as eager
    const vf c = vmin(vmax(z, -kTanhClamp), kTanhClamp);
    const vf u = kSqrt2OverPi * (c + kCubic * c * c * c);
    const vf s = 1.0f / (1.0f + vexp(-2.0f * u));
    return z * (z < -kTanhClamp ? vf{} : s);
  }
  if (ACCURATE) return z * normal_cdf(z);
  // the erf rational is clamped at x = -4 (Phi < 1e-8 beyond): 0 there, as normal_cdf
  const vf xs = z * kSqrt1_2;
  return z * (xs < -4.0f ? vf{} : 0.5f + 0.5f * erf_rational(xs));
}

template <bool TANH>
inline vf gelu_grad(vf z) {
  if (TANH) {
    const vf c = vmin(vmax(z, -kTanhClamp), kTanhClamp);
    const vf c2 = c * c;
    const vf u = kSqrt2OverPi * (c + kCubic * c2 * c);
    const vf e = vexp(-2.0f * u);
    const vf s = 1.0f / (1.0f + e);
    const vf du = kSqrt2OverPi * (1.0f + 3.0f * kCubic * c2);
    // s (1 - s) = e s^2, without cancellation; z - z (0 for finite z) keeps NaN and +-inf z a NaN
    // gradient, as torch gives it, where the clamp would make them finite
    return (s + 2.0f * c * (s * s * e) * du) + (z - z);
  }
  // gelu'(z) - 1/2 = erf(x)/2 + z phi(z) (x = z/sqrt 2) is odd and tends to 0 like z phi(z); one
  // rational x P(x^2) / Q(x^2) on |x| <= 4.3 fits it to 6.3e-8 (scripts/fit_gelu.py backward), which
  // costs as much as erf alone instead of erf plus exp.
  const vf x = vmin(vmax(z * kSqrt1_2, -4.3f), 4.3f);
  const vf x2 = x * x;
  vf p = splat(-2.202739187e-09f);
  p = p * x2 + 1.984200941e-07f;
  p = p * x2 + -1.614478798e-06f;
  p = p * x2 + 7.645411882e-04f;
  p = p * x2 + -1.271909522e-03f;
  p = p * x2 + 8.187313760e-02f;
  p = p * x2 + -1.109946955e-01f;
  p = p * x2 + 1.128379771e+00f;
  vf q = splat(2.031874595e-04f);
  q = q * x2 + 2.551617771e-03f;
  q = q * x2 + 2.463029804e-02f;
  q = q * x2 + 1.513924648e-01f;
  q = q * x2 + 5.683082142e-01f;
  q = q * x2 + 1.0f;
  return ((x * p) / q + 0.5f) + (z - z);  // z - z: NaN for NaN/inf z (the clamp hides them), else 0
}

// Double precision: a scalar path for gradcheck and fp64 users, exact to the last bits of libm.
inline double gelu(double z, bool tanh) {
  if (tanh) {
    const double u = 0.7978845608028654 * (z + 0.044715 * z * z * z);
    return 0.5 * z * (1.0 + std::tanh(u));
  }
  return 0.5 * z * std::erfc(-z * 0.7071067811865476);
}

inline double gelu_grad(double z, bool tanh) {
  if (tanh) {
    const double u = 0.7978845608028654 * (z + 0.044715 * z * z * z);
    const double t = std::tanh(u);
    const double du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z);
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du;
  }
  return 0.5 * std::erfc(-z * 0.7071067811865476) + z * 0.3989422804014327 * std::exp(-0.5 * z * z);
}

// One row segment x[0:len] whose first column is c (bias + c lines up with x).
template <bool TANH, typename T>
void fwd_segment(const T* x, const float* bias, T* y, int64_t len) {
  constexpr bool kAccurate = sizeof(T) == sizeof(float);
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    vf z = load(x + i);
    if (bias) z += load(bias + i);
    store(y + i, gelu<TANH, kAccurate>(z));
  }
  if (i < len) {
    vf z = load_partial(x + i, len - i);
    if (bias) z += load_partial(bias + i, len - i);
    store_partial(y + i, gelu<TANH, kAccurate>(z), len - i);
  }
}

template <typename T>
void fwd_segment(const T* x, const float* bias, T* y, int64_t len, bool tanh) {
  tanh ? fwd_segment<true>(x, bias, y, len) : fwd_segment<false>(x, bias, y, len);
}

void fwd_segment(const double* x, const double* bias, double* y, int64_t len, bool tanh) {
  for (int64_t i = 0; i < len; ++i) y[i] = gelu(x[i] + (bias ? bias[i] : 0.0), tanh);
}

template <typename T, typename B>
void fwd(const void* xv, const void* bv, void* yv, int64_t n, int64_t e0, int64_t e1, bool tanh) {
  const T* x = static_cast<const T*>(xv);
  const B* bias = static_cast<const B*>(bv);
  T* y = static_cast<T*>(yv);
  for (int64_t e = e0; e < e1;) {  // walk the range row segment by row segment
    const int64_t c = e % n;
    const int64_t len = (n - c) < (e1 - e) ? (n - c) : (e1 - e);
    fwd_segment(x + e, bias ? bias + c : nullptr, y + e, len, tanh);
    e += len;
  }
}

// One row of the tile: columns [0, len) starting at the tile's first column.
template <bool TANH, typename T>
void bwd_segment(const T* dy, const T* x, const float* bias, T* dx, float* dbias, int64_t len) {
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    vf z = load(x + i);
    if (bias) z += load(bias + i);
    const vf dz = load(dy + i) * gelu_grad<TANH>(z);
    store(dx + i, dz);
    if (dbias) store(dbias + i, load(dbias + i) + dz);
  }
  if (i < len) {
    const int64_t r = len - i;
    vf z = load_partial(x + i, r);
    if (bias) z += load_partial(bias + i, r);
    const vf dz = load_partial(dy + i, r) * gelu_grad<TANH>(z);
    store_partial(dx + i, dz, r);
    if (dbias) store_partial(dbias + i, load_partial(dbias + i, r) + dz, r);
  }
}

template <typename T>
void bwd_segment(const T* dy, const T* x, const float* bias, T* dx, float* dbias, int64_t len, bool tanh) {
  tanh ? bwd_segment<true>(dy, x, bias, dx, dbias, len) : bwd_segment<false>(dy, x, bias, dx, dbias, len);
}

void bwd_segment(const double* dy, const double* x, const double* bias, double* dx, double* dbias, int64_t len,
                 bool tanh) {
  for (int64_t i = 0; i < len; ++i) {
    const double dz = dy[i] * gelu_grad(x[i] + (bias ? bias[i] : 0.0), tanh);
    dx[i] = dz;
    if (dbias) dbias[i] += dz;
  }
}

// dbias accuracy: a row's dz is added into an fp32 group sum over kGroup rows, and each group sum into
// the fp64 per-block partial (glue), so rounding grows with kGroup, not with the number of rows: the
// result is within about an ulp of the exact sum, as good as ATen's cascade summation.
constexpr int64_t kGroup = 8;

template <typename T, typename B>
void bwd(const void* dyv, const void* xv, const void* bv, void* dxv, void* dbv, int64_t n, int64_t r0, int64_t r1,
         int64_t c0, int64_t c1, bool tanh) {
  const B* bias = static_cast<const B*>(bv);
  double* dbias = static_cast<double*>(dbv);
  const int64_t width = c1 - c0;
  B group[kMaxColTile];
  for (int64_t r = r0; r < r1;) {
    const int64_t end = r + kGroup < r1 ? r + kGroup : r1;
    if (dbias) std::memset(group, 0, width * sizeof(B));
    for (; r < end; ++r) {
      const int64_t off = r * n + c0;
      bwd_segment(static_cast<const T*>(dyv) + off, static_cast<const T*>(xv) + off, bias ? bias + c0 : nullptr,
                  static_cast<T*>(dxv) + off, dbias ? group : nullptr, width, tanh);
    }
    if (dbias)
      for (int64_t c = 0; c < width; ++c) dbias[c0 + c] += group[c];
  }
}

}  // namespace

void bias_gelu_fwd(DType dt, const void* x, const void* bias, void* y, int64_t n, int64_t e0, int64_t e1, bool tanh) {
  switch (dt) {
    case DType::f32: return fwd<float, float>(x, bias, y, n, e0, e1, tanh);
    case DType::f16: return fwd<f16, float>(x, bias, y, n, e0, e1, tanh);
    case DType::bf16: return fwd<bf16, float>(x, bias, y, n, e0, e1, tanh);
    case DType::f64: return fwd<double, double>(x, bias, y, n, e0, e1, tanh);
  }
}

void bias_gelu_bwd(DType dt, const void* dy, const void* x, const void* bias, void* dx, void* dbias, int64_t n,
                   int64_t r0, int64_t r1, int64_t c0, int64_t c1, bool tanh) {
  if (c1 - c0 > kMaxColTile) std::abort();  // the glue tiles columns to at most kMaxColTile
  switch (dt) {
    case DType::f32: return bwd<float, float>(dy, x, bias, dx, dbias, n, r0, r1, c0, c1, tanh);
    case DType::f16: return bwd<f16, float>(dy, x, bias, dx, dbias, n, r0, r1, c0, c1, tanh);
    case DType::bf16: return bwd<bf16, float>(dy, x, bias, dx, dbias, n, r0, r1, c0, c1, tanh);
    case DType::f64: return bwd<double, double>(dy, x, bias, dx, dbias, n, r0, r1, c0, c1, tanh);
  }
}

}  // namespace fastbert::cpu::FASTBERT_ISA
