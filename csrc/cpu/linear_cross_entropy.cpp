// The fused cross-entropy step of linear_cross_entropy on CPU: tensor glue and threading. The kernels
// live in linear_cross_entropy_kernel.cpp (one per ISA); the chunking and the matmuls are in
// fastbert/ops/linear_cross_entropy.py.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "cpu/dispatch.h"

namespace fastbert {
namespace {

// Rows per task: about 16k logits, so that a small vocabulary is not one task a row.
int64_t grain_of(int64_t v) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(v, 1)); }

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& logits, const at::Tensor& targets_,
                                       const at::Tensor* row_scale, at::Tensor* grad, int64_t ignore_index) {
  const auto stats = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t rows = logits.size(0), v = logits.size(1);
  at::Tensor loss = at::empty({rows}, logits.options().dtype(stats)), lse = at::empty({rows}, loss.options());
  if (rows == 0) return {loss, lse};
  const at::Tensor targets = targets_.to(at::kLong).contiguous();
  at::Tensor scale;
  cpu::CrossEntropyArgs a;
  a.v = v, a.ignore_index = ignore_index;
  a.logits = logits.const_data_ptr(), a.targets = targets.const_data_ptr<int64_t>();
  a.loss = loss.data_ptr(), a.lse = lse.data_ptr();
  if (grad) {
    scale = row_scale->contiguous();
    a.row_scale = scale.const_data_ptr(), a.grad = grad->data_ptr();
  }
  const auto dt = cpu::dtype_of(logits);
  at::parallel_for(0, rows, grain_of(v),
                   [&](int64_t r0, int64_t r1) { FASTBERT_CPU_CALL(cross_entropy_rows, dt, a, r0, r1); });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                                int64_t ignore_index) {
  check_cross_entropy(logits, targets, std::nullopt);
  return run(logits.contiguous(), targets, nullptr, nullptr, ignore_index);
}

// Overwrites logits (contiguous, checked) with the gradient of sum_i row_scale[i] * loss_i.
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_bwd_cpu(at::Tensor& logits, const at::Tensor& targets,
                                                                const at::Tensor& row_scale, int64_t ignore_index) {
  check_cross_entropy(logits, targets, row_scale);
  return run(logits, targets, &row_scale, &logits, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cpu);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cpu);
}

}  // namespace fastbert
