// Attention over packed (variable-length) sequences on CPU: tensor glue, threading and the matrix
// products. The softmax / dropout / conversion kernels live in varlen_attention_kernel.cpp (per ISA).
//
// Work: one task per (sequence, head) pair of n tokens, head_dim d, in accumulation-type scratch
// (fp32; fp64 for fp64): nothing of size [B, heads, S, S] exists. Threads take pairs from a shared
// counter (longest first); each pair writes its own rows and head of every output, so results do not
// depend on the thread count or the schedule.
//   forward:  s = scale q k^T;  p = dropout(softmax(s)) (and lse);  out = p v
//   backward: s = scale q k^T;  dpd = dO v^T;  p = softmax(s) (recomputed in full: more accurate than
//             exp(s - lse) with an fp32 lse);  z = dropout multiplier;  g = dpd z;
//             D = rowsum(p g) (= rowsum(dO * out): `out` is not read);  dS = p (g - D);  pd = p z;
//             dv = pd^T dO;  dq = scale dS k;  dk = scale dS^T q
// fp32 (fp64) q, k, v with a unit last stride are read in place (rows strided: views of a packed
// qkv); fp16/bf16 head slices are converted to fp32 first. The products run in the BLAS torch links
// (MKL's sgemm_/dgemm_, single-threaded inside the parallel region); without one, a plain loop.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/memory.h"
#include "common/philox.h"
#include "cpu/dispatch.h"

// Fortran BLAS from torch's libraries (weak: the extension still loads where torch has none).
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fastbert {
namespace {

constexpr const char* kOp = "varlen_attention";

// Row-major C[M, N] = alpha op(A) op(B): op(A) [M, K] (A stored [K, M] when ta), op(B) [K, N] (B
// stored [N, K] when tb), leading dimensions lda, ldb, ldc. BLAS is column-major, where row-major C
// is C^T = op(B)^T op(A)^T: the operands swap.
template <typename A>
void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, A alpha, const A* a, int64_t lda, const A* b, int64_t ldb,
        A* c, int64_t ldc) {
  using Fn = void (*)(const char*, const char*, const int*, const int*, const int*, const A*, const A*, const int*,
                      const A*, const int*, const A*, A*, const int*);
  Fn blas = nullptr;
  if constexpr (std::is_same_v<A, float>)
    blas = sgemm_;
  else
    blas = dgemm_;
  if (blas && alpha == A(0)) {
    // BLAS does not read op(A) op(B) when alpha is 0 (C = 0); eager's (q k^T) * 0 is NaN where the
    // product is inf or NaN: multiply afterwards
    mm<A>(ta, tb, M, N, K, A(1), a, lda, b, ldb, c, ldc);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) c[i * ldc + j] *= alpha;
    return;
  }
  if (blas) {
    const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(std::max<int64_t>(ldb, 1)), lb = static_cast<int>(std::max<int64_t>(lda, 1));
    const int lc = static_cast<int>(std::max<int64_t>(ldc, 1));
    const A beta = 0;
    blas(&tra, &trb, &m, &n, &k, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  for (int64_t i = 0; i < M; ++i) {  // fallback: c_i = alpha sum_k a_ik b_k
    A* ci = c + i * ldc;
    std::fill(ci, ci + N, A(0));
    for (int64_t kk = 0; kk < K; ++kk) {
      const A aik = alpha * (ta ? a[kk * lda + i] : a[i * lda + kk]);
      if (tb) {
        for (int64_t j = 0; j < N; ++j) ci[j] += aik * b[j * ldb + kk];
      } else {
        const A* bk = b + kk * ldb;
        for (int64_t j = 0; j < N; ++j) ci[j] += aik * bk[j];
      }
    }
  }
}

// ---- checks (the Python wrapper checks the same first, with the same words) ----
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu, int64_t max_seqlen,
               double dropout_p, const std::optional<at::Tensor>& seed) {
  check_float(q, kOp, "q", q.device().is_cpu());
  TORCH_CHECK_VALUE(q.dim() == 3, kOp, ": q must be 3-D [total_tokens, heads, head_dim], got shape ", q.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"k", &k}, {"v", &v}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), kOp, ": ", name, " must have q's shape ", q.sizes(), ", got ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->scalar_type() == q.scalar_type(), kOp, ": ", name, " must have q's dtype ", q.scalar_type(),
                      ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), kOp, ": ", name, " is on ", t->device(), " but q is on ", q.device());
  }
  TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1, kOp,
                    ": cu_seqlens must be a 1-D int32 tensor [batch + 1], got ", cu.scalar_type(), " ", cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == q.device(), kOp, ": cu_seqlens is on ", cu.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(max_seqlen >= 0, kOp, ": max_seqlen must be a non-negative int, got ", max_seqlen);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, kOp, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (seed) {
    TORCH_CHECK_VALUE(seed->scalar_type() == at::kLong && seed->numel() == 1, kOp,
                      ": seed must be an int64 tensor with one element, got ", seed->scalar_type(), " of shape ",
                      seed->sizes());
    TORCH_CHECK_VALUE(seed->device() == q.device(), kOp, ": seed is on ", seed->device(), " but q is on ", q.device());
  }
  // The values (B + 1 ints): a bad cu_seqlens must raise, never index out of bounds.
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.const_data_ptr<int32_t>();
  TORCH_CHECK_VALUE(p[0] == 0, kOp, ": cu_seqlens must start at 0, got ", p[0]);
  for (int64_t b = 0; b + 1 < c.numel(); ++b) {
    TORCH_CHECK_VALUE(p[b + 1] >= p[b], kOp, ": cu_seqlens must be non-decreasing (entry ", b + 1, " is ", p[b + 1],
                      " after ", p[b], ")");
    TORCH_CHECK_VALUE(p[b + 1] - p[b] <= max_seqlen, kOp, ": max_seqlen ", max_seqlen,
                      " is smaller than the longest sequence (", p[b + 1] - p[b], ")");
  }
  TORCH_CHECK_VALUE(p[c.numel() - 1] == q.size(0), kOp, ": cu_seqlens must end at the number of rows of q (", q.size(0),
                    "), got ", p[c.numel() - 1]);
}

void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type(), kOp, " backward: ", name, " (",
                    t.sizes(), ", ", t.scalar_type(), ") must match q (", q.sizes(), ", ", q.scalar_type(), ")");
  TORCH_CHECK_VALUE(t.device() == q.device(), kOp, " backward: ", name, " is on ", t.device(), " but q is on ",
                    q.device());
}

// Rows may be strided (a packed qkv), columns must be contiguous; BLAS wants row stride >= head_dim.
at::Tensor rows_usable(const at::Tensor& t) {
  const bool ok = t.size(2) <= 1 || t.stride(2) == 1;
  return ok && (t.size(0) <= 1 || t.stride(0) >= t.size(2)) ? t : t.contiguous();
}

// A tensor [T, heads, d] as seen by one pair: base pointer, row stride, head stride (elements).
struct View {
  const char* base;
  int64_t row, head, itemsize;
  explicit View(const at::Tensor& t)
      : base(static_cast<const char*>(t.const_data_ptr())),
        row(t.stride(0)),
        head(t.stride(1)),
        itemsize(t.element_size()) {}
  const void* at(int64_t t, int64_t h) const { return base + (t * row + h * head) * itemsize; }
};

struct Pair {
  int64_t start, n, head;
};

// The non-empty (sequence, head) pairs, longest first. Threads take them one at a time from a shared
// counter: costs vary ~250x (n = 8..128) and a neighbour's load can stall one thread, so a static
// split leaves the others waiting; longest first keeps the tail of the schedule short.
std::vector<Pair> plan_pairs(const at::Tensor& cu_, int64_t heads) {
  const at::Tensor cu = cu_.contiguous();
  const int32_t* p = cu.const_data_ptr<int32_t>();
  std::vector<Pair> pairs;
  for (int64_t b = 0; b + 1 < cu.numel(); ++b) {
    const int64_t n = p[b + 1] - p[b];
    for (int64_t h = 0; n > 0 && h < heads; ++h) pairs.push_back({p[b], n, h});
  }
  std::stable_sort(pairs.begin(), pairs.end(), [](const Pair& x, const Pair& y) { return x.n > y.n; });
  return pairs;
}

template <typename Fn>
void run_pairs(const std::vector<Pair>& pairs, Fn&& fn) {
  const int64_t npairs = static_cast<int64_t>(pairs.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), npairs));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < npairs;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(pairs[i]);
  });
}

template <typename A>
std::vector<A>& scratch() {
  thread_local std::vector<A> buf;
  return buf;
}

template <typename A>
A* fit(std::vector<A>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Everything a pair needs: its operand pointers and leading dimensions in the accumulation type A,
// converted into `scratch` when the storage type is not A.
template <typename A>
struct Operand {
  const A* ptr;
  int64_t ld;
};

template <typename A>
Operand<A> operand(const View& v, int64_t start, int64_t n, int64_t h, int64_t d, cpu::DType dt, bool direct,
                   A* scratch_rows) {
  if (direct) return {static_cast<const A*>(v.at(start, h)), v.row};
  if constexpr (std::is_same_v<A, float>)
    FASTBERT_CPU_CALL(varlen_rows_to_f32, dt, v.at(start, h), v.row, n, d, scratch_rows);
  return {scratch_rows, d};
}

template <typename A>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu, int64_t max_seqlen,
              double scale, const cpu::Dropout* drop, at::Tensor& out, at::Tensor& lse) {
  const int64_t T = q.size(0), H = q.size(1), d = q.size(2), ldo = H * d;
  const cpu::DType dt = cpu::dtype_of(q);
  const bool direct = std::is_same_v<A, double> || dt == cpu::DType::f32;
  const cpu::DType acc = std::is_same_v<A, double> ? cpu::DType::f64 : cpu::DType::f32;
  const View vq(q), vk(k), vv(v);
  char* outp = static_cast<char*>(out.data_ptr());
  const int64_t osz = out.element_size();
  A* lsep = lse.data_ptr<A>();
  const std::vector<Pair> plan = plan_pairs(cu, H);
  run_pairs(plan, [&](const Pair& pr) {
    const int64_t n = pr.n, h = pr.head, s0 = pr.start;
    A* buf = fit(scratch<A>(), static_cast<size_t>(n * n + 4 * n * d));
    A *s = buf, *rows = buf + n * n;
    const Operand<A> Q = operand(vq, s0, n, h, d, dt, direct, rows);
    const Operand<A> K = operand(vk, s0, n, h, d, dt, direct, rows + n * d);
    const Operand<A> V = operand(vv, s0, n, h, d, dt, direct, rows + 2 * n * d);
    mm<A>(false, true, n, n, d, static_cast<A>(scale), Q.ptr, Q.ld, K.ptr, K.ld, s, n);
    cpu::VarlenSoftmaxArgs a;
    a.n = n, a.s = s, a.lse = lsep + h * T + s0, a.dropout = drop;
    a.e0 = static_cast<uint64_t>(h * T + s0) * static_cast<uint64_t>(max_seqlen), a.e_step = max_seqlen;
    FASTBERT_CPU_CALL(varlen_softmax_fwd, acc, a);
    void* dst = outp + (s0 * ldo + h * d) * osz;
    if (direct) {
      mm<A>(false, false, n, d, n, A(1), s, n, V.ptr, V.ld, static_cast<A*>(dst), ldo);
    } else if constexpr (std::is_same_v<A, float>) {
      float* o = rows + 3 * n * d;
      mm<A>(false, false, n, d, n, A(1), s, n, V.ptr, V.ld, o, d);
      FASTBERT_CPU_CALL(varlen_rows_from_f32, dt, o, n, d, dst, ldo);
    }
  });
}

template <typename A>
void bwd_impl(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& cu, int64_t max_seqlen, double scale, const cpu::Dropout* drop, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv) {
  const int64_t T = q.size(0), H = q.size(1), d = q.size(2), ldo = H * d;
  const cpu::DType dt = cpu::dtype_of(q);
  const bool direct = std::is_same_v<A, double> || dt == cpu::DType::f32;
  const cpu::DType acc = std::is_same_v<A, double> ? cpu::DType::f64 : cpu::DType::f32;
  const View vq(q), vk(k), vv(v), vg(grad);
  const int64_t osz = dq.element_size();
  char *dqp = static_cast<char*>(dq.data_ptr()), *dkp = static_cast<char*>(dk.data_ptr());
  char* dvp = static_cast<char*>(dv.data_ptr());
  const std::vector<Pair> plan = plan_pairs(cu, H);
  const A sc = static_cast<A>(scale);
  run_pairs(plan, [&](const Pair& pr) {
    const int64_t n = pr.n, h = pr.head, s0 = pr.start;
    A* buf = fit(scratch<A>(), static_cast<size_t>(2 * n * n + 7 * n * d));
    A *s = buf, *dp = buf + n * n, *rows = buf + 2 * n * n;
    const Operand<A> Q = operand(vq, s0, n, h, d, dt, direct, rows);
    const Operand<A> K = operand(vk, s0, n, h, d, dt, direct, rows + n * d);
    const Operand<A> V = operand(vv, s0, n, h, d, dt, direct, rows + 2 * n * d);
    const Operand<A> G = operand(vg, s0, n, h, d, dt, direct, rows + 3 * n * d);
    mm<A>(false, true, n, n, d, sc, Q.ptr, Q.ld, K.ptr, K.ld, s, n);        // s = scale q k^T
    mm<A>(false, true, n, n, d, A(1), G.ptr, G.ld, V.ptr, V.ld, dp, n);     // dpd = dO v^T
    cpu::VarlenSoftmaxArgs a;
    a.n = n, a.s = s, a.dp = dp, a.dropout = drop;
    a.e0 = static_cast<uint64_t>(h * T + s0) * static_cast<uint64_t>(max_seqlen), a.e_step = max_seqlen;
    FASTBERT_CPU_CALL(varlen_softmax_bwd, acc, a);                           // s <- pd, dp <- dS
    const int64_t off = (s0 * ldo + h * d) * osz;
    A* dst[3];
    int64_t ld = ldo;
    if (direct) {
      dst[0] = reinterpret_cast<A*>(dvp + off), dst[1] = reinterpret_cast<A*>(dqp + off);
      dst[2] = reinterpret_cast<A*>(dkp + off);
    } else {
      A* o = rows + 4 * n * d;
      dst[0] = o, dst[1] = o + n * d, dst[2] = o + 2 * n * d, ld = d;
    }
    mm<A>(true, false, n, d, n, A(1), s, n, G.ptr, G.ld, dst[0], ld);       // dv = pd^T dO
    mm<A>(false, false, n, d, n, sc, dp, n, K.ptr, K.ld, dst[1], ld);       // dq = scale dS k
    mm<A>(true, false, n, d, n, sc, dp, n, Q.ptr, Q.ld, dst[2], ld);        // dk = scale dS^T q
    if constexpr (std::is_same_v<A, float>) {
      if (!direct) {
        FASTBERT_CPU_CALL(varlen_rows_from_f32, dt, dst[0], n, d, dvp + off, ldo);
        FASTBERT_CPU_CALL(varlen_rows_from_f32, dt, dst[1], n, d, dqp + off, ldo);
        FASTBERT_CPU_CALL(varlen_rows_from_f32, dt, dst[2], n, d, dkp + off, ldo);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                            const at::Tensor& v_, const at::Tensor& cu,
                                                            int64_t max_seqlen, double scale, double dropout_p,
                                                            const std::optional<at::Tensor>& seed) {
  check_qkv(q_, k_, v_, cu, max_seqlen, dropout_p, seed);
  const at::Tensor q = rows_usable(q_), k = rows_usable(k_), v = rows_usable(v_);
  const bool f64 = q.scalar_type() == at::kDouble;
  at::Tensor out = empty_output(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(f64 ? at::kDouble : at::kFloat));
  cpu::Dropout drop{};
  const cpu::Dropout* dp = nullptr;
  if (dropout_active(seed, dropout_p)) drop = cpu::dropout_of(*seed, dropout_p), dp = &drop;
  if (q.numel() == 0 && q.size(0) > 0 && q.size(1) > 0) {  // head_dim 0: scores all 0, lse = log(n)
    const at::Tensor c = cu.contiguous();
    const int32_t* p = c.const_data_ptr<int32_t>();
    for (int64_t b = 0; b + 1 < c.numel(); ++b)
      if (p[b + 1] > p[b]) lse.narrow(1, p[b], p[b + 1] - p[b]).fill_(std::log(static_cast<double>(p[b + 1] - p[b])));
    return {out, lse};
  }
  if (q.numel() == 0) return {out, lse};
  if (f64) {
    fwd_impl<double>(q, k, v, cu, max_seqlen, scale, dp, out, lse);
  } else {
    fwd_impl<float>(q, k, v, cu, max_seqlen, scale, dp, out, lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(const at::Tensor& grad_, const at::Tensor& q_,
                                                                        const at::Tensor& k_, const at::Tensor& v_,
                                                                        const at::Tensor& out_, const at::Tensor& lse_,
                                                                        const at::Tensor& cu, int64_t max_seqlen,
                                                                        double scale, double dropout_p,
                                                                        const std::optional<at::Tensor>& seed) {
  check_qkv(q_, k_, v_, cu, max_seqlen, dropout_p, seed);
  check_like_q(grad_, q_, "grad");
  check_like_q(out_, q_, "out");
  const bool f64 = q_.scalar_type() == at::kDouble;
  const auto lse_type = f64 ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(
      lse_.scalar_type() == lse_type && lse_.dim() == 2 && lse_.size(0) == q_.size(1) && lse_.size(1) == q_.size(0),
      kOp, " backward: lse must be ", lse_type, " of shape [", q_.size(1), ", ", q_.size(0), "], got ",
      lse_.scalar_type(), " of shape ", lse_.sizes());
  const at::Tensor q = rows_usable(q_), k = rows_usable(k_), v = rows_usable(v_);
  const at::Tensor grad = grad_.contiguous();  // out and lse: checked, not needed (see the top)
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = empty_output(q.sizes(), opts), dk = empty_output(q.sizes(), opts), dv = empty_output(q.sizes(), opts);
  if (q.numel() == 0) return {dq, dk, dv};
  cpu::Dropout drop{};
  const cpu::Dropout* dp = nullptr;
  if (dropout_active(seed, dropout_p)) drop = cpu::dropout_of(*seed, dropout_p), dp = &drop;
  if (f64) {
    bwd_impl<double>(grad, q, k, v, cu, max_seqlen, scale, dp, dq, dk, dv);
  } else {
    bwd_impl<float>(grad, q, k, v, cu, max_seqlen, scale, dp, dq, dk, dv);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace fastbert
