// Cross-entropy over logits rows: the fused step of linear_cross_entropy, CPU kernels. Compiled once
// per ISA (see csrc/cpu/kernels.h).
//
// Per row of v logits x (fp32 maths), target t:
//   m = max(x);  e_i = exp(x_i - m);  lse = m + log(sum(e))  (the sum in fp32 lanes per block, fp64
//   across blocks);  loss = lse - x_t, 0 when t == ignore_index (NaN for a target outside [0, v)).
// Backward (in place: grad may be the logits): grad_i = (e_i / sum(e) - [i == t]) * row_scale, a row
//   of zeros when t == ignore_index. A NaN logit makes the row's lse, loss and gradient NaN, as in
//   eager (found in pass 1: the vector max ignores NaN and the exp maps it to 0). x_t is read before the row is
//   overwritten; e lives in a thread-local fp32 buffer between the passes, so the row is read from memory twice (max,
//   exp) and written once.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/simd.h"
#include "cpu/kernels.h"
#include "cpu/rows.h"

namespace fastbert::cpu::FASTBERT_ISA {
namespace {
using namespace fastbert::simd;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

thread_local std::vector<float> row_buffer;  // e of the row being processed (backward), + padding

// e^d for d = x - max <= 0 (Cephes' exp, ~1 ulp: the max itself gives exactly 1, so a one-logit row has
// loss exactly 0); exactly 0 below e^-86 (and for x = -inf). The matmuls around this step cost ~1000x
// more, so the accurate exp is worth its price here.
inline vf exp_nonpositive(vf d) { return bitcast<vf>(bitcast<vi>(vexp(d)) & (d >= -86.0f)); }

inline float hmax(vf v) {
  float r = v[0];
  for (int i = 1; i < W; ++i) r = v[i] > r ? v[i] : r;
  return r;
}

// The target's logit, or NaN when the target is outside [0, v) (ignored rows never use it).
template <typename T>
inline float target_logit(const T* x, int64_t t, int64_t v) {
  return t >= 0 && t < v ? load_partial(x + t, 1)[0] : std::numeric_limits<float>::quiet_NaN();
}

template <typename T>
void rows_vec(const CrossEntropyArgs& a, int64_t r0, int64_t r1) {
  const int64_t v = a.v;
  const bool bwd = a.grad != nullptr;
  if (bwd && static_cast<int64_t>(row_buffer.size()) < v + W) row_buffer.resize(v + W);
  float* e = row_buffer.data();
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  float *loss = static_cast<float*>(a.loss), *lse_out = static_cast<float*>(a.lse);
  const float* row_scale = static_cast<const float*>(a.row_scale);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = logits + r * v;
    const int64_t t = a.targets[r];
    const bool ignored = t == a.ignore_index;
    const float xt = ignored ? 0.0f : target_logit(x, t, v);
    vf vmx = splat(kNegInf);
    vi vnan{};
    for_row(v, [&](int64_t i, int64_t m) {  // pass 1: the row max (tail lanes -inf), any NaN
      vf xv = ld(x + i, m);
      for (int64_t j = m; j < W; ++j) xv[j] = kNegInf;
      vmx = vmax(vmx, xv);
      vnan |= xv != xv;
    });
    bool has_nan = false;
    for (int j = 0; j < W; ++j) has_nan |= vnan[j] != 0;
    if (has_nan) {  // NaN logits: NaN lse, loss and gradient (an ignored row: loss 0, zero gradient)
      constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
      lse_out[r] = kNaN;
      loss[r] = ignored ? 0.0f : kNaN;
      if (bwd) {
        T* g = grad + r * v;
        if (ignored)
          std::memset(static_cast<void*>(g), 0, v * sizeof(T));
        else
          for_row(v, [&](int64_t i, int64_t m) { st(g + i, splat(kNaN), m); });
      }
      continue;
    }
    const float mx = hmax(vmx);
    Sum sum;
    for_row(
        v,
        [&](int64_t i, int64_t m) {  // pass 2: e = exp(x - max) and its sum
          const vf ev = head(exp_nonpositive(ld(x + i, m) - mx), m);
          if (bwd) store(e + i, ev);
          sum.acc += ev;
        },
        [&] { sum.flush(); });
    const double lse = mx + std::log(sum.total);
    lse_out[r] = static_cast<float>(lse);
    loss[r] = ignored ? 0.0f : static_cast<float>(lse - xt);
    if (!bwd) continue;
    T* g = grad + r * v;
    if (ignored) {
      std::memset(static_cast<void*>(g), 0, v * sizeof(T));
      continue;
    }
    const float scale = row_scale[r], pscale = static_cast<float>(scale / sum.total);
    for_row(v, [&](int64_t i, int64_t m) { st(g + i, load(e + i) * pscale, m); });  // pass 3
    if (t >= 0 && t < v) {  // the one-hot term
      // an inf or NaN scale: NaN, as eager's -scale + p_t scale (not (p_t - 1) scale = -inf)
      const float gt = std::isfinite(scale) ? static_cast<float>((e[t] / sum.total - 1.0) * scale) : NAN;
      store_partial(g + t, splat(gt), 1);
    }
  }
}

// ---- float64 (gradcheck and fp64 users): scalar, fp64 throughout ----
void rows_f64(const CrossEntropyArgs& a, int64_t r0, int64_t r1) {
  const int64_t v = a.v;
  const double* logits = static_cast<const double*>(a.logits);
  double* grad = static_cast<double*>(a.grad);
  double *loss = static_cast<double*>(a.loss), *lse_out = static_cast<double*>(a.lse);
  const double* row_scale = static_cast<const double*>(a.row_scale);
  for (int64_t r = r0; r < r1; ++r) {
    const double* x = logits + r * v;
    const int64_t t = a.targets[r];
    const bool ignored = t == a.ignore_index;
    const double xt = ignored ? 0.0 : t >= 0 && t < v ? x[t] : std::numeric_limits<double>::quiet_NaN();
    double mx = -INFINITY, total = 0.0;
    for (int64_t i = 0; i < v; ++i) mx = x[i] > mx ? x[i] : mx;
    for (int64_t i = 0; i < v; ++i) total += std::exp(x[i] - mx);
    const double lse = mx + std::log(total);
    lse_out[r] = lse;
    loss[r] = ignored ? 0.0 : lse - xt;
    if (!grad) continue;
    double* g = grad + r * v;
    const double scale = ignored ? 0.0 : row_scale[r];
    const double one = std::isfinite(scale) ? 1.0 : NAN;  // an inf or NaN scale: a NaN target term, as eager
    for (int64_t i = 0; i < v; ++i) g[i] = (std::exp(x[i] - mx) / total - (i == t ? one : 0.0)) * scale;
  }
}

}  // namespace

void cross_entropy_rows(DType dt, const CrossEntropyArgs& a, int64_t r0, int64_t r1) {
  FASTBERT_CPU_BY_DTYPE(dt, rows_vec, rows_f64, a, r0, r1)
}

}  // namespace fastbert::cpu::FASTBERT_ISA
