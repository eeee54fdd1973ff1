// Attention over packed sequences, CPU kernels: the parts of one (sequence, head) pair that are not
// matrix products (those run in BLAS from csrc/cpu/varlen_attention.cpp). Compiled once per ISA (see
// csrc/cpu/kernels.h). A pair of n tokens works on contiguous [n, n] scratch of the accumulation type
// (fp32; fp64 for fp64 inputs) holding the scaled scores s = scale q k^T.
//
// Forward, per query row i:  m = max_j s_ij;  e_ij = exp(s_ij - m);  l = sum_j e_ij;  lse_i = m + log l;
//   p_ij = e_ij / l, times keep_ij / (1 - p_drop) with dropout (keep_ij from the shared Philox stream,
//   element e0 + i * e_step + j). The row is overwritten with the (dropped) probabilities.
// Backward, per row, from dpd = dO v^T:  p_ij = softmax(s_i)_j, recomputed as the forward did (not from
//   lse, whose fp32 rounding would reach every p);  with z_ij = keep_ij / (1 - p_drop)
//   (1 without dropout) g_ij = dpd_ij z_ij;  D_i = sum_j p_ij g_ij (= sum_c dO_ic O_ic, but from the
//   same rounded values, so a one-token row gets dS = 0 exactly);  dS_ij = p_ij (g_ij - D_i) (for
//   dq = scale dS k and dk = scale dS^T q), and the row is overwritten with pd_ij = p_ij z_ij (the
//   forward's probabilities, for dv = pd^T dO). Multiplying by z is a select (keep ? x / (1 - p_drop) : 0),
//   as on every backend: a dropped NaN or inf is 0.
#include <cmath>
#include <cstring>
#include <vector>

#include "common/simd.h"
#include "cpu/kernels.h"
#include "cpu/philox_simd.h"
#include "cpu/rows.h"

namespace fastbert::cpu::FASTBERT_ISA {
namespace {
using namespace fastbert::simd;

constexpr float kLog2e = 1.44269504088896341f;

thread_local std::vector<uint32_t> rnd_buf;

uint32_t* fit_rnd(int64_t n) {
  if (static_cast<int64_t>(rnd_buf.size()) < n + W) rnd_buf.resize(n + W);
  return rnd_buf.data();
}

// keep ? v * scale : 0, a select: a dropped element is 0 even where v is NaN or inf (as the other
// backends drop; v * 0 would be NaN)
inline vf keep_apply(const Dropout& d, const uint32_t* rnd, vf v) {
  vu r;
  std::memcpy(&r, rnd, sizeof r);
  return (r >> 8) >= d.threshold ? v * d.scale : vf{};
}

inline float hmax(vf v) {
  float r = v[0];
  for (int i = 1; i < W; ++i) r = v[i] > r ? v[i] : r;
  return r;
}

// 2^t for t <= ~0, exactly 0 below 2^-125 (as masked_softmax's exp_or_zero).
inline vf exp2_or_zero(vf t) { return bitcast<vf>(bitcast<vi>(vexp2_unchecked(vmax(t, -125.0f))) & (t >= -125.0f)); }

// Whether the row max says the row is NaN in eager PyTorch: a NaN score (the vector max and the exp
// above ignore NaN, so pass 1 looks for it) or a +inf one (inf - inf).
inline bool nan_row(vi vnan, float mx) {
  bool r = mx == INFINITY;
  for (int k = 0; k < W; ++k) r |= vnan[k] != 0;
  return r;
}

inline void fill_nan(float* row, int64_t n) {
  for_row(n, [&](int64_t j, int64_t m) { st(row + j, splat(NAN), m); });
}

// A NaN row's probabilities: NaN, and 0 where dropped (keep_apply's select), as the fp64 path
inline void fill_nan_probs(float* row, int64_t n, const Dropout* drop, uint64_t e0, uint32_t* rnd) {
  if (!drop) return fill_nan(row, n);
  philox_elements(drop->seed, e0, n, rnd);
  const Dropout d = *drop;
  for_row(n, [&](int64_t j, int64_t m) { st(row + j, keep_apply(d, rnd + j, splat(NAN)), m); });
}

void softmax_fwd_f32(const VarlenSoftmaxArgs& a) {
  const int64_t n = a.n;
  float* s = static_cast<float*>(a.s);
  float* lse = static_cast<float*>(a.lse);
  const Dropout* drop = a.dropout;
  uint32_t* rnd = drop ? fit_rnd(n) : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    float* row = s + i * n;
    vf vmx = splat(-INFINITY);
    vi vnan{};
    for_row(n, [&](int64_t j, int64_t m) {
      vf v = ld(row + j, m);
      for (int64_t k = m; k < W; ++k) v[k] = -INFINITY;
      vmx = vmax(vmx, v);
      vnan |= v != v;
    });
    const float mx = hmax(vmx);
    if (nan_row(vnan, mx)) {  // NaN probabilities and lse, as eager
      fill_nan_probs(row, n, drop, a.e0 + static_cast<uint64_t>(i) * a.e_step, rnd);
      lse[i] = NAN;
      continue;
    }
    Sum sum;
    for_row(
        n,
        [&](int64_t j, int64_t m) {  // e = 2^((s - max) log2e), as the backward: s log2e would
          const vf e = head(exp2_or_zero((ld(row + j, m) - mx) * kLog2e), m);  // overflow at |s| > 2.4e38
          st(row + j, e, m);
          sum.acc += e;
        },
        [&] { sum.flush(); });
    lse[i] = mx + static_cast<float>(std::log(sum.total));
    const float inv = static_cast<float>(1.0 / sum.total);
    if (drop) {
      philox_elements(drop->seed, a.e0 + static_cast<uint64_t>(i) * a.e_step, n, rnd);
      const Dropout d = *drop;
      for_row(n, [&](int64_t j, int64_t m) { st(row + j, keep_apply(d, rnd + j, ld(row + j, m) * inv), m); });
    } else {
      for_row(n, [&](int64_t j, int64_t m) { st(row + j, ld(row + j, m) * inv, m); });
    }
  }
}

void softmax_bwd_f32(const VarlenSoftmaxArgs& a) {
  const int64_t n = a.n;
  float* s = static_cast<float*>(a.s);
  float* dp = static_cast<float*>(a.dp);
  const Dropout* drop = a.dropout;
  uint32_t* rnd = drop ? fit_rnd(n) : nullptr;
  const Dropout d = drop ? *drop : Dropout{};
  for (int64_t i = 0; i < n; ++i) {
    float *srow = s + i * n, *drow = dp + i * n;
    // p recomputed as the forward did (max, exp, sum), not as exp(s - lse): lse is rounded to fp32,
    // and exp(s - lse) would carry its rounding (|lse| ulp) into every p.
    vf vmx = splat(-INFINITY);
    vi vnan{};
    for_row(n, [&](int64_t j, int64_t m) {
      vf v = ld(srow + j, m);
      for (int64_t k = m; k < W; ++k) v[k] = -INFINITY;
      vmx = vmax(vmx, v);
      vnan |= v != v;
    });
    const float mx = hmax(vmx);
    if (nan_row(vnan, mx)) {  // NaN probabilities: NaN dS and p, as eager
      fill_nan_probs(srow, n, drop, a.e0 + static_cast<uint64_t>(i) * a.e_step, rnd);
      fill_nan(drow, n);
      continue;
    }
    Sum sum;
    for_row(
        n,
        [&](int64_t j, int64_t m) {  // (s - max) first: the max key gets exactly 2^0
          const vf e = head(exp2_or_zero((ld(srow + j, m) - mx) * kLog2e), m);
          st(srow + j, e, m);
          sum.acc += e;
        },
        [&] { sum.flush(); });
    const float total = static_cast<float>(sum.total);
    if (drop) philox_elements(d.seed, a.e0 + static_cast<uint64_t>(i) * a.e_step, n, rnd);
    Sum dot;  // D_i = sum_j p_ij g_ij
    for_row(
        n,
        [&](int64_t j, int64_t m) {
          const vf p = ld(srow + j, m) / total;  // a division: a one-key row gets p = 1 exactly
          st(srow + j, p, m);
          vf g = ld(drow + j, m);
          if (drop) g = keep_apply(d, rnd + j, g);
          st(drow + j, g, m);
          dot.acc += p * g;  // tail lanes: p = 0
        },
        [&] { dot.flush(); });
    const float di = static_cast<float>(dot.total);
    for_row(n, [&](int64_t j, int64_t m) {  // dp <- dS = p (g - D_i), s <- p z (the forward's probabilities)
      const vf p = ld(srow + j, m);
      st(drow + j, p * (ld(drow + j, m) - di), m);
      if (drop) st(srow + j, keep_apply(d, rnd + j, p), m);
    });
  }
}

// ---- float64: scalar, fp64 throughout ----
double keep_apply64(const Dropout* d, uint64_t e, double v) {  // keep ? v * scale : 0, as keep_apply
  return philox::keep(philox::element(d->seed, e), d->threshold) ? v * static_cast<double>(d->scale) : 0.0;
}

void softmax_fwd_f64(const VarlenSoftmaxArgs& a) {
  const int64_t n = a.n;
  double* s = static_cast<double*>(a.s);
  double* lse = static_cast<double*>(a.lse);
  for (int64_t i = 0; i < n; ++i) {
    double* row = s + i * n;
    double mx = -INFINITY, total = 0.0;
    for (int64_t j = 0; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
    for (int64_t j = 0; j < n; ++j) total += row[j] = std::exp(row[j] - mx);
    lse[i] = mx + std::log(total);
    const uint64_t e = a.e0 + static_cast<uint64_t>(i) * a.e_step;
    for (int64_t j = 0; j < n; ++j)
      row[j] = a.dropout ? keep_apply64(a.dropout, e + j, row[j] / total) : row[j] / total;
  }
}

void softmax_bwd_f64(const VarlenSoftmaxArgs& a) {
  const int64_t n = a.n;
  double *s = static_cast<double*>(a.s), *dp = static_cast<double*>(a.dp);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t e = a.e0 + static_cast<uint64_t>(i) * a.e_step;
    double *srow = s + i * n, *drow = dp + i * n, mx = -INFINITY, total = 0.0, di = 0.0;
    for (int64_t j = 0; j < n; ++j) mx = srow[j] > mx ? srow[j] : mx;
    for (int64_t j = 0; j < n; ++j) total += srow[j] = std::exp(srow[j] - mx);
    for (int64_t j = 0; j < n; ++j) {
      srow[j] /= total;
      if (a.dropout) drow[j] = keep_apply64(a.dropout, e + j, drow[j]);
      di += srow[j] * drow[j];
    }
    for (int64_t j = 0; j < n; ++j) {
      drow[j] = srow[j] * (drow[j] - di);
      if (a.dropout) srow[j] = keep_apply64(a.dropout, e + j, srow[j]);
    }
  }
}

template <typename T>
void to_f32(const void* src_, int64_t ld_src, int64_t rows, int64_t d, float* dst) {
  const T* src = static_cast<const T*>(src_);
  for (int64_t r = 0; r < rows; ++r)
    for_row(d, [&](int64_t c, int64_t m) { st(dst + r * d + c, ld(src + r * ld_src + c, m), m); });
}
void to_f32_f64(const void*, int64_t, int64_t, int64_t, float*) {}

template <typename T>
void from_f32(const float* src, int64_t rows, int64_t d, void* dst_, int64_t ld_dst) {
  T* dst = static_cast<T*>(dst_);
  for (int64_t r = 0; r < rows; ++r)
    for_row(d, [&](int64_t c, int64_t m) { st(dst + r * ld_dst + c, ld(src + r * d + c, m), m); });
}
void from_f32_f64(const float*, int64_t, int64_t, void*, int64_t) {}

}  // namespace

void varlen_softmax_fwd(DType acc, const VarlenSoftmaxArgs& a) {
  acc == DType::f64 ? softmax_fwd_f64(a) : softmax_fwd_f32(a);
}

void varlen_softmax_bwd(DType acc, const VarlenSoftmaxArgs& a) {
  acc == DType::f64 ? softmax_bwd_f64(a) : softmax_bwd_f32(a);
}

void varlen_rows_to_f32(DType dt, const void* src, int64_t ld_src, int64_t rows, int64_t d, float* dst) {
  FASTBERT_CPU_BY_DTYPE(dt, to_f32, to_f32_f64, src, ld_src, rows, d, dst)
}

void varlen_rows_from_f32(DType dt, const float* src, int64_t rows, int64_t d, void* dst, int64_t ld_dst) {
  FASTBERT_CPU_BY_DTYPE(dt, from_f32, from_f32_f64, src, rows, d, dst, ld_dst)
}

}  // namespace fastbert::cpu::FASTBERT_ISA
