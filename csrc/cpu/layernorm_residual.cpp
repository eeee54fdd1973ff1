// bias + dropout + residual + LayerNorm on CPU: tensor glue, threading, and the deterministic
// second stage of the column sums. The kernels live in layernorm_residual_kernel.cpp (one per ISA).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/memory.h"
#include "common/philox.h"
#include "cpu/dispatch.h"

namespace fastbert {
namespace {

// Outputs at least this large are written with streaming stores. A call with such an output moves
// three to five times as much (x, residual, grad and the other outputs) against a 32 MiB shared
// last-level cache, so the first rows written have left the cache before anything could read them,
// and streaming stores skip each line's read for ownership: measured on [4096, 768] fp32 (12 MiB),
// one thread, the forward went from 64% to 90% of the copy bandwidth and the backward from 80% to
// 100%. bf16 outputs of that shape (6 MiB) gained nothing measurable and stay below the threshold.
constexpr size_t kStreamMinBytes = size_t{8} << 20;

// Parameters as the kernels read them: fp32 (fp64 for fp64 data), contiguous; undefined when absent.
at::Tensor param(const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (!t) return {};
  return t->to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_residual_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& residual_, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const std::optional<at::Tensor>& x_bias, double dropout_p, const std::optional<at::Tensor>& seed) {
  check_layernorm_residual(x_, residual_, weight, bias, x_bias, dropout_p, seed);
  check_layernorm_residual_eps(eps);
  const at::Tensor x = x_.contiguous(), residual = residual_.contiguous();
  const at::Tensor w = param(weight, x), b = param(bias, x), xb = param(x_bias, x);
  const auto stats = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto rows_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor y = empty_output(x.sizes(), x.options());
  at::Tensor mean = at::empty(rows_shape, x.options().dtype(stats)),
             rstd = at::empty(rows_shape, x.options().dtype(stats));
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  if (rows == 0 || n == 0) {
    if (rows) mean.fill_(0), rstd.fill_(std::numeric_limits<double>::quiet_NaN());  // as torch for n == 0
    return {y, mean, rstd};
  }
  cpu::Dropout drop{};
  const bool dropping = dropout_active(seed, dropout_p);
  if (dropping) drop = cpu::dropout_of(*seed, dropout_p);
  cpu::LayerNormArgs a;
  a.n = n, a.eps = eps, a.x = x.const_data_ptr(), a.residual = residual.const_data_ptr();
  a.weight = w.const_data_ptr(), a.bias = b.const_data_ptr(), a.x_bias = xb.defined() ? xb.const_data_ptr() : nullptr;
  a.y = y.data_ptr(), a.mean = mean.data_ptr(), a.rstd = rstd.data_ptr(), a.dropout = dropping ? &drop : nullptr;
  const auto dt = cpu::dtype_of(x);
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  a.stream = y.nbytes() >= kStreamMinBytes;
  at::parallel_for(0, rows, grain,
                   [&](int64_t r0, int64_t r1) { FASTBERT_CPU_CALL(layernorm_residual_fwd, dt, a, r0, r1); });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_residual_bwd_cpu(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& residual_, const at::Tensor& weight,
    const std::optional<at::Tensor>& x_bias, const at::Tensor& mean_, const at::Tensor& rstd_, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  check_layernorm_residual(x_, residual_, weight, std::nullopt, x_bias, dropout_p, seed);
  check_layernorm_residual_grad(grad_, x_, mean_, rstd_);
  const at::Tensor x = x_.contiguous(), residual = residual_.contiguous(), grad = grad_.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor w = param(weight, x), xb = param(x_bias, x);
  const bool dropping = dropout_active(seed, dropout_p);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  at::Tensor dres = empty_output(x.sizes(), x.options());
  at::Tensor dx = dropping ? empty_output(x.sizes(), x.options()) : at::empty({0}, x.options());
  // Row blocks fixed by the shape (the column sums are the same for any thread count), each with
  // fp64 partials [dweight, dbias, dx_bias] x n, summed in block order afterwards.
  int64_t per_block = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  int64_t blocks = rows ? (rows + per_block - 1) / per_block : 0;
  if (blocks > 128) per_block = (rows + 127) / 128, blocks = (rows + per_block - 1) / per_block;
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor partial = at::empty({std::max<int64_t>(blocks, 1), 3, n}, f64);  // each task writes its own
  if (rows && n) {
    cpu::Dropout drop{};
    if (dropping) drop = cpu::dropout_of(*seed, dropout_p);
    cpu::LayerNormArgs a;
    a.n = n, a.x = x.const_data_ptr(), a.residual = residual.const_data_ptr(), a.weight = w.const_data_ptr();
    a.x_bias = xb.defined() ? xb.const_data_ptr() : nullptr, a.grad = grad.const_data_ptr();
    a.mean = const_cast<void*>(mean.const_data_ptr()), a.rstd = const_cast<void*>(rstd.const_data_ptr());
    a.dresidual = dres.data_ptr(), a.dx = dropping ? dx.data_ptr() : nullptr, a.dropout = dropping ? &drop : nullptr;
    a.stream = dres.nbytes() >= kStreamMinBytes;
    const auto dt = cpu::dtype_of(x);
    double* p = partial.data_ptr<double>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        cpu::LayerNormArgs t = a;
        t.dweight = p + blk * 3 * n, t.dbias = t.dweight + n, t.dx_bias = xb.defined() ? t.dweight + 2 * n : nullptr;
        FASTBERT_CPU_CALL(layernorm_residual_bwd, dt, t, blk * per_block, std::min(rows, (blk + 1) * per_block));
      }
    });
  }
  // Second stage: the blocks' partials in block order (columns in parallel).
  at::Tensor sums = at::zeros({3, n}, f64);
  const double* p = partial.const_data_ptr<double>();
  double* out = sums.data_ptr<double>();
  at::parallel_for(0, 3 * n, 1024, [&](int64_t c0, int64_t c1) {
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t c = c0; c < c1; ++c) out[c] += p[blk * 3 * n + c];
  });
  // copies (not views of `sums`): the outputs must not share storage
  const auto as = [&](int64_t i, at::ScalarType t) { return sums[i].to(t, /*non_blocking=*/false, /*copy=*/true); };
  at::Tensor dxb = x_bias ? as(2, x_bias->scalar_type()) : at::empty({0}, x.options());
  return {dres, dx, as(0, weight.scalar_type()), as(1, weight.scalar_type()), dxb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("layernorm_residual_fwd", &layernorm_residual_fwd_cpu);
  m.impl("layernorm_residual_bwd", &layernorm_residual_bwd_cpu);
}

}  // namespace fastbert
