// bias + dropout + residual + LayerNorm, CPU kernels. Compiled once per ISA (see csrc/cpu/kernels.h).
//
// Forward, per row of n:  h = x + x_bias;  h = keep ? h * scale : 0 (dropout);  s = h + residual
//   mean = sum(s) / n,  var = sum((s - mean)^2) / n,  rstd = 1 / sqrt(var + eps)
//   y = (s - mean) * rstd * w + b
// Backward, with s_hat = (s - mean) * rstd (s recomputed from x, x_bias, residual and the mask):
//   g = dy * w;  ds = rstd * (g - mean(g) - s_hat * mean(g * s_hat))   (LayerNorm's input gradient)
//   dresidual = ds;  dx = ds * keep * scale (only with dropout; otherwise dx = ds);
//   dw += dy * s_hat,  db += dy,  dx_bias += dx   (column sums over the task's rows)
// Rows live in thread-local fp32 buffers between passes, so x, residual and dy are read from memory
// once per pass of the op (the backward recomputes s_hat from the saved mean and rstd in its first
// pass). Sums: the mean over (s - s[0]) so that a large common offset does not
// cost precision; column sums in fp32 groups of kGroup rows flushed into fp64 partials (as bias_gelu).
// Rows of huge values (largest |s - s[0]| above 2^50, e.g. one -1e30 or +-3e38 elements) would overflow
// the fp32 sums of s and of (s - mean)^2: their statistics and outputs are computed in fp64 (a scalar
// pass, rare), and the backward forms s - mean on s * 2^-76 (exact) so that it cannot overflow.
// With a.stream (outputs far larger than the caches, chosen by the glue) y, dresidual and dx are
// written with streaming stores: nothing reads them before they have left the cache, and those
// stores skip each line's read for ownership.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/simd.h"
#include "cpu/kernels.h"
#include "cpu/philox_simd.h"
#include "cpu/rows.h"

namespace fastbert::cpu::FASTBERT_ISA {
namespace {
using namespace fastbert::simd;

constexpr int64_t kGroup = 8;

inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

struct RowBuffers {  // per thread, grown to the row length
  std::vector<float> s, g, mult;
  std::vector<uint32_t> rnd;
  std::vector<float> dw, db, dxb;  // fp32 column sums of the current group of rows
  void fit(int64_t n, bool dropout, bool backward) {
    if (static_cast<int64_t>(s.size()) < n + W) s.resize(n + W);
    if (dropout && static_cast<int64_t>(rnd.size()) < n + W) rnd.resize(n + W), mult.resize(n + W);
    if (backward && static_cast<int64_t>(g.size()) < n + W)
      g.resize(n + W), dw.resize(n + W), db.resize(n + W), dxb.resize(n + W);
  }
};
thread_local RowBuffers buffers;

// The dropout multiplier (0 or scale) of the row's elements [e0, e0 + n), into mult.
void dropout_row(const Dropout& d, uint64_t e0, int64_t n, RowBuffers& buf) {
  philox_elements(d.seed, e0, n, buf.rnd.data());
  const vf scale = splat(d.scale), zero = vf{};
  for (int64_t i = 0; i < n; i += W) {  // keep iff (r >> 8) >= threshold (buffers padded to W)
    vu r;
    std::memcpy(&r, buf.rnd.data() + i, sizeof r);
    store(buf.mult.data() + i, (r >> 8) >= d.threshold ? scale : zero);
  }
}

// h after dropout with the multiplier `mult` (0 or scale): keep ? h * scale : 0, a select (a dropped
// element is 0 even when h is NaN or inf, as eager's torch.where; h * 0 would let NaN through).
inline vf drop(vf h, vf mult) { return mult > 0.0f ? h * mult : vf{}; }
inline double drop(double h, double mult) { return mult > 0.0 ? h * mult : 0.0; }

// An output store: streaming (non-temporal) for whole vectors when `nt` (the row is vector-aligned).
template <typename T>
inline void st_out(T* p, vf v, int64_t m, bool nt) {
  nt&& m == W ? store_stream(p, v) : st(p, v, m);
}
template <typename T>
inline bool aligned_row(const T* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (W * sizeof(T)) == 0;
}

constexpr float kBig = 0x1p50f, kDown = 0x1p-76f, kUp = 0x1p76f;

// s = dropout(x + x_bias) + residual into s[0 .. n) (zeros up to the next whole vector); returns the
// mean, summed as s - s[0] so that a large common offset does not cost precision; `spread` gets the
// largest |s - s[0]| (NaN/inf lanes aside).
template <typename T>
float pre_norm_row(const T* x, const T* res, const float* xb, const float* mult, int64_t n, float* s, float& spread) {
  const int64_t m0 = n < W ? n : W;
  vf h0 = ld(x, m0);
  if (xb) h0 += ld(xb, m0);
  if (mult) h0 = drop(h0, load(mult));
  const float shift = (h0 + ld(res, m0))[0];  // s[0]
  Sum sum;
  vf vspread{};
  for_row(
      n,
      [&](int64_t i, int64_t m) {
        vf h = ld(x + i, m);
        if (xb) h += ld(xb + i, m);
        if (mult) h = drop(h, load(mult + i));
        const vf v = h + ld(res + i, m);
        store(s + i, v);
        const vf dv = head(v - shift, m);
        sum.acc += dv;
        vspread = vmax(vspread, vabs(dv));
      },
      [&] { sum.flush(); });
  spread = 0.0f;
  for (int j = 0; j < W; ++j) spread = vspread[j] > spread ? vspread[j] : spread;
  return static_cast<float>(shift + sum.total / static_cast<double>(n));
}

// rstd of the row in s with the given mean (two-pass variance).
inline float row_rstd(const float* s, int64_t n, float mean, double eps) {
  Sum sq;
  for_row(
      n,
      [&](int64_t i, int64_t m) {
        const vf d = head(load(s + i) - mean, m);
        sq.acc += d * d;
      },
      [&] { sq.flush(); });
  return static_cast<float>(1.0 / std::sqrt(sq.total / static_cast<double>(n) + eps));
}

template <typename T>
void fwd_rows(const LayerNormArgs& a, int64_t r0, int64_t r1) {
  const bool stream = a.stream;
  const int64_t n = a.n;
  RowBuffers& buf = buffers;
  buf.fit(n, a.dropout != nullptr, false);
  const T* x = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.residual);
  const float* w = static_cast<const float*>(a.weight);
  const float* b = static_cast<const float*>(a.bias);
  const float* xb = static_cast<const float*>(a.x_bias);
  T* y = static_cast<T*>(a.y);
  float* s = buf.s.data();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * n;
    const bool nt = stream && aligned_row(y + off);
    if (a.dropout) dropout_row(*a.dropout, off, n, buf);
    float spread;
    const float mean = pre_norm_row(x + off, res + off, xb, a.dropout ? buf.mult.data() : nullptr, n, s, spread);
    if (spread > kBig) {  // huge values: fp32 sums of s and (s - mean)^2 could overflow; fp64 (rare)
      double m64 = 0.0, v64 = 0.0;
      for (int64_t i = 0; i < n; ++i) m64 += s[i];
      m64 /= static_cast<double>(n);
      for (int64_t i = 0; i < n; ++i) v64 += (s[i] - m64) * (s[i] - m64);
      const double r64 = 1.0 / std::sqrt(v64 / static_cast<double>(n) + a.eps);
      static_cast<float*>(a.mean)[r] = static_cast<float>(m64);
      static_cast<float*>(a.rstd)[r] = static_cast<float>(r64);
      for (int64_t i = 0; i < n; ++i) {
        const float yi = static_cast<float>((s[i] - m64) * r64 * w[i] + b[i]);
        store_partial(y + off + i, splat(yi), 1);
      }
      continue;
    }
    const float rstd = row_rstd(s, n, mean, a.eps);
    static_cast<float*>(a.mean)[r] = mean;
    static_cast<float*>(a.rstd)[r] = rstd;
    for_row(
        n,
        [&](int64_t i, int64_t m) {
          st_out(y + off + i, (load(s + i) - mean) * rstd * ld(w + i, m) + ld(b + i, m), m, nt);
        },
        [] {});
  }
  if (stream) stream_fence();
}

template <typename T>
void bwd_rows(const LayerNormArgs& a, int64_t r0, int64_t r1) {
  const bool stream = a.stream;
  const int64_t n = a.n;
  RowBuffers& buf = buffers;
  buf.fit(n, a.dropout != nullptr, true);
  const T* dy = static_cast<const T*>(a.grad);
  const T* x = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.residual);
  const float* w = static_cast<const float*>(a.weight);
  const float* xb = static_cast<const float*>(a.x_bias);
  T* dres = static_cast<T*>(a.dresidual);
  T* dx = static_cast<T*>(a.dx);
  float *sh = buf.s.data(), *g = buf.g.data(), *mult = a.dropout ? buf.mult.data() : nullptr;
  float *gdw = buf.dw.data(), *gdb = buf.db.data(), *gdxb = buf.dxb.data();
  const int64_t nv = (n + W - 1) / W * W;  // buffers are padded to whole vectors
  std::memset(a.dweight, 0, n * sizeof(double));  // this task's partials: it owns them
  std::memset(a.dbias, 0, n * sizeof(double));
  if (a.dx_bias) std::memset(a.dx_bias, 0, n * sizeof(double));
  for (int64_t rg = r0; rg < r1; rg += kGroup) {
    const int64_t rend = rg + kGroup < r1 ? rg + kGroup : r1;
    std::memset(gdw, 0, nv * sizeof(float));
    std::memset(gdb, 0, nv * sizeof(float));
    std::memset(gdxb, 0, nv * sizeof(float));
    for (int64_t r = rg; r < rend; ++r) {
      const int64_t off = r * n;
      const bool nt = stream && aligned_row(dres + off) && (!dx || aligned_row(dx + off));
      if (a.dropout) dropout_row(*a.dropout, off, n, buf);
      const float mean = static_cast<const float*>(a.mean)[r], rstd = static_cast<const float*>(a.rstd)[r];
      // s_hat = (s sc - mean sc) (rstd / sc): sc = 2^-76 for rows of huge values (s - mean could
      // overflow, rstd may be subnormal), else 1 (the same bits as (s - mean) rstd)
      const bool big = std::fabs(mean) > kBig || rstd < 0x1p-50f;
      const float sc = big ? kDown : 1.0f, msc = mean * sc, rsc = rstd * (big ? kUp : 1.0f);
      // pass 1: s_hat from x, x_bias, mask, residual and the saved mean/rstd; g = dy * w; row sums
      // of g and g * s_hat; column sums dw, db. s_hat and g go to the row buffers for pass 2.
      Sum sg, sgs;
      for_row(
          n,
          [&](int64_t i, int64_t m) {
            vf h = ld(x + off + i, m);
            if (xb) h += ld(xb + i, m);
            if (mult) h = drop(h, load(mult + i));
            const vf d = ld(dy + off + i, m);
            const vf shv = head(((h + ld(res + off + i, m)) * sc - msc) * rsc, m);
            const vf gv = d * ld(w + i, m);
            store(sh + i, shv);
            store(g + i, gv);
            sg.acc += gv;
            sgs.acc += gv * shv;
            store(gdw + i, load(gdw + i) + d * shv);
            store(gdb + i, load(gdb + i) + d);
          },
          [&] { sg.flush(), sgs.flush(); });
      const float mg = static_cast<float>(sg.total / n);
      // an infinite g (dy * w): eager's row of ds is all NaN (inf - inf in LayerNorm's backward),
      // where rstd (g - mean(g) - s_hat mean(g s_hat)) alone could give +-inf
      const float mgs = std::isfinite(mg) ? static_cast<float>(sgs.total / n) : NAN;
      // pass 2: ds = rstd (g - mean(g) - s_hat mean(g s_hat)); dresidual, dx, dx_bias sums
      for_row(
          n,
          [&](int64_t i, int64_t m) {
            const vf ds = rstd * (load(g + i) - mg - load(sh + i) * mgs);
            const vf dxv = mult ? drop(ds, load(mult + i)) : ds;  // a NaN ds at a dropped element: 0
            st_out(dres + off + i, ds, m, nt);
            if (dx) st_out(dx + off + i, dxv, m, nt);
            if (xb) store(gdxb + i, load(gdxb + i) + head(dxv, m));
          },
          [] {});
    }
    for (int64_t c = 0; c < n; ++c) {  // flush the group's fp32 column sums into the fp64 partials
      a.dweight[c] += gdw[c];
      a.dbias[c] += gdb[c];
      if (a.dx_bias) a.dx_bias[c] += gdxb[c];
    }
  }
  if (stream) stream_fence();
}

// ---- float64 (gradcheck and fp64 users): scalar, fp64 statistics ----
void fwd_rows_f64(const LayerNormArgs& a, int64_t r0, int64_t r1) {
  const int64_t n = a.n;
  const double *x = static_cast<const double*>(a.x), *res = static_cast<const double*>(a.residual);
  const double *w = static_cast<const double*>(a.weight), *b = static_cast<const double*>(a.bias);
  const double* xb = static_cast<const double*>(a.x_bias);
  std::vector<double> s(n);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * n;
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      double h = x[off + i] + (xb ? xb[i] : 0.0);
      if (a.dropout)
        h = philox::keep(philox::element(a.dropout->seed, off + i), a.dropout->threshold) ? h * a.dropout->scale : 0.0;
      s[i] = h + res[off + i];
      mean += s[i];
    }
    mean /= n;
    for (int64_t i = 0; i < n; ++i) var += (s[i] - mean) * (s[i] - mean);
    const double rstd = 1.0 / std::sqrt(var / n + a.eps);
    static_cast<double*>(a.mean)[r] = mean;
    static_cast<double*>(a.rstd)[r] = rstd;
    for (int64_t i = 0; i < n; ++i) static_cast<double*>(a.y)[off + i] = (s[i] - mean) * rstd * w[i] + b[i];
  }
}

void bwd_rows_f64(const LayerNormArgs& a, int64_t r0, int64_t r1) {
  const int64_t n = a.n;
  std::fill(a.dweight, a.dweight + n, 0.0), std::fill(a.dbias, a.dbias + n, 0.0);
  if (a.dx_bias) std::fill(a.dx_bias, a.dx_bias + n, 0.0);
  const double *dy = static_cast<const double*>(a.grad), *x = static_cast<const double*>(a.x);
  const double *res = static_cast<const double*>(a.residual), *w = static_cast<const double*>(a.weight);
  const double* xb = static_cast<const double*>(a.x_bias);
  std::vector<double> sh(n), g(n), mult(n, 1.0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * n;
    const double mean = static_cast<const double*>(a.mean)[r], rstd = static_cast<const double*>(a.rstd)[r];
    double sg = 0.0, sgs = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (a.dropout)
        mult[i] =
            philox::keep(philox::element(a.dropout->seed, off + i), a.dropout->threshold) ? a.dropout->scale : 0.0;
      const double h = drop(x[off + i] + (xb ? xb[i] : 0.0), mult[i]);
      sh[i] = (h + res[off + i] - mean) * rstd;
      g[i] = dy[off + i] * w[i];
      sg += g[i];
      sgs += g[i] * sh[i];
      a.dweight[i] += dy[off + i] * sh[i];
      a.dbias[i] += dy[off + i];
    }
    sg /= n, sgs /= n;
    if (!std::isfinite(sg)) sgs = NAN;  // an infinite g: a NaN row, as eager (see bwd_rows)
    for (int64_t i = 0; i < n; ++i) {
      const double ds = rstd * (g[i] - sg - sh[i] * sgs);
      static_cast<double*>(a.dresidual)[off + i] = ds;
      if (a.dx) static_cast<double*>(a.dx)[off + i] = drop(ds, mult[i]);
      if (a.dx_bias) a.dx_bias[i] += drop(ds, mult[i]);
    }
  }
}

}  // namespace

void layernorm_residual_fwd(DType dt, const LayerNormArgs& a, int64_t r0, int64_t r1) {
  FASTBERT_CPU_BY_DTYPE(dt, fwd_rows, fwd_rows_f64, a, r0, r1)
}

void layernorm_residual_bwd(DType dt, const LayerNormArgs& a, int64_t r0, int64_t r1) {
  FASTBERT_CPU_BY_DTYPE(dt, bwd_rows, bwd_rows_f64, a, r0, r1)
}

}  // namespace fastbert::cpu::FASTBERT_ISA
