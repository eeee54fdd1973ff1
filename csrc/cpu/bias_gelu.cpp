// bias + GELU on CPU: tensor glue, threading and the deterministic dbias reduction.
// The vector kernels live in bias_gelu_kernel.cpp (one build per ISA).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/memory.h"
#include "cpu/dispatch.h"

namespace fastbert {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task: below this threading costs more than it saves

// Bias in the kernels' accumulation type: fp32 (fp64 for fp64 data); null when absent.
at::Tensor bias_for_kernel(const std::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (!bias) return {};
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return bias->to(acc).contiguous();
}

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x_, const std::optional<at::Tensor>& bias,
                             c10::string_view approximate) {
  check_bias_gelu(x_, bias);
  const bool tanh = parse_gelu_approximate(approximate);
  const at::Tensor x = x_.contiguous();
  const at::Tensor b = bias_for_kernel(bias, x);
  at::Tensor y = empty_output(x.sizes(), x.options());
  const int64_t n = x.size(-1), total = x.numel();
  if (total == 0) return y;
  const auto dt = cpu::dtype_of(x);
  const void* bp = b.defined() ? b.const_data_ptr() : nullptr;
  at::parallel_for(0, total, kGrain, [&](int64_t e0, int64_t e1) {
    FASTBERT_CPU_CALL(bias_gelu_fwd, dt, x.const_data_ptr(), bp, y.data_ptr(), n, e0, e1, tanh);
  });
  return y;
}

// Backward tiles: row blocks fixed by the shape alone (so the dbias sum is the same for any thread
// count); column tiles of at most kMaxColTile, more of them when row blocks alone would leave
// threads idle (tiling columns does not change any column's sum).
struct Tiling {
  int64_t row_block, n_row_blocks, col_tile, n_col_tiles;
};

Tiling tile(int64_t rows, int64_t n) {
  Tiling t;
  t.row_block = std::max<int64_t>(1, (kGrain / 2 + n - 1) / n);
  t.n_row_blocks = (rows + t.row_block - 1) / t.row_block;
  if (t.n_row_blocks > 128) {  // bound the fp32 partial-sum buffer to 128 rows of n
    t.row_block = (rows + 127) / 128;
    t.n_row_blocks = (rows + t.row_block - 1) / t.row_block;
  }
  // at least enough column tiles to keep each under kMaxColTile; more when threads would idle
  const int64_t want = 4 * at::get_num_threads();
  t.n_col_tiles = (n + cpu::kMaxColTile - 1) / cpu::kMaxColTile;
  if (t.n_row_blocks * t.n_col_tiles < want && n >= 2 * 2048) {
    t.n_col_tiles = std::max(t.n_col_tiles, std::min((n + 2047) / 2048, (want + t.n_row_blocks - 1) / t.n_row_blocks));
  }
  t.col_tile = ((n + t.n_col_tiles - 1) / t.n_col_tiles + 63) / 64 * 64;  // <= kMaxColTile
  t.n_col_tiles = (n + t.col_tile - 1) / t.col_tile;
  return t;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& dy_, const at::Tensor& x_,
                                                     const std::optional<at::Tensor>& bias,
                                                     c10::string_view approximate, bool need_dbias) {
  check_bias_gelu(x_, bias);
  const bool tanh = parse_gelu_approximate(approximate);
  check_bias_gelu_grad(dy_, x_);
  const at::Tensor x = x_.contiguous(), dy = dy_.contiguous();
  const at::Tensor b = bias_for_kernel(bias, x);
  at::Tensor dx = empty_output(x.sizes(), x.options());
  const bool want_db = need_dbias && b.defined();
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  // dbias is summed in fp64 (fp32 groups of rows inside the kernel, see bias_gelu_kernel.cpp)
  const auto f64 = b.defined() ? b.options().dtype(at::kDouble) : x.options();
  at::Tensor dbias = want_db ? at::zeros({n}, f64) : at::empty({0}, x.options());
  if (rows == 0 || n == 0) return {dx, want_db ? dbias.to(bias->scalar_type()) : dbias};

  const auto dt = cpu::dtype_of(x);
  const Tiling t = tile(rows, n);
  at::Tensor partial = want_db ? at::zeros({t.n_row_blocks, n}, f64) : at::Tensor();
  const void* bp = b.defined() ? b.const_data_ptr() : nullptr;
  at::parallel_for(0, t.n_row_blocks * t.n_col_tiles, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t rb = i / t.n_col_tiles, ct = i % t.n_col_tiles;
      const int64_t r0 = rb * t.row_block, r1 = std::min(rows, r0 + t.row_block);
      const int64_t c0 = ct * t.col_tile, c1 = std::min(n, c0 + t.col_tile);
      double* pp = want_db ? partial.data_ptr<double>() + rb * n : nullptr;
      FASTBERT_CPU_CALL(bias_gelu_bwd, dt, dy.const_data_ptr(), x.const_data_ptr(), bp, dx.data_ptr(), pp, n, r0, r1,
                        c0, c1, tanh);
    }
  });
  if (want_db) {
    // Second stage: sum the row-block partials in block order, columns in parallel.
    const double* p = partial.const_data_ptr<double>();
    double* out = dbias.data_ptr<double>();
    at::parallel_for(0, n, 1024, [&](int64_t c0, int64_t c1) {
      for (int64_t rb = 0; rb < t.n_row_blocks; ++rb)
        for (int64_t c = c0; c < c1; ++c) out[c] += p[rb * n + c];
    });
    dbias = dbias.to(bias->scalar_type());
  }
  return {dx, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
}

}  // namespace fastbert
