// Attention softmax on CPU: tensor glue and threading. The kernels live in masked_softmax_kernel.cpp
// (one per ISA).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/memory.h"
#include "common/philox.h"
#include "cpu/dispatch.h"

namespace fastbert {
namespace {

// Rows per task: about 16k elements, so that short rows are not one task each.
int64_t grain_of(int64_t k) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)); }

// Outputs this large (against 8-32 MiB last-level caches) are written with streaming stores: nothing
// reads them back before they have left the cache anyway, and those stores skip each line's read.
constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

std::tuple<at::Tensor, at::Tensor> masked_softmax_fwd_cpu(const at::Tensor& scores_,
                                                          const std::optional<at::Tensor>& mask_, double scale,
                                                          double dropout_p, const std::optional<at::Tensor>& seed) {
  check_masked_softmax(scores_, mask_, dropout_p, seed);
  const at::Tensor scores = scores_.contiguous();
  const bool dropping = dropout_active(seed, dropout_p);
  at::Tensor probs = empty_output(scores.sizes(), scores.options());
  at::Tensor soft = dropping ? empty_output(scores.sizes(), scores.options()) : at::empty({0}, scores.options());
  const int64_t k = scores.size(3), rows = k ? scores.numel() / k : 0;
  if (rows == 0 || k == 0) return {probs, soft};
  cpu::SoftmaxArgs a;
  a.heads = scores.size(1), a.queries = scores.size(2), a.k = k;
  a.scale = static_cast<float>(scale), a.scale64 = scale;
  a.scores = scores.const_data_ptr(), a.probs = probs.data_ptr(), a.softmax = dropping ? soft.data_ptr() : nullptr;
  at::Tensor mask;
  if (mask_) {
    mask = *mask_;
    if (mask.size(3) > 1 && mask.stride(3) != 1) mask = mask.contiguous();  // keys: broadcast or unit stride
    a.mask = mask.const_data_ptr(), a.mask_is_bool = mask.scalar_type() == at::kBool;
    if (!a.mask_is_bool) a.mask_dtype = cpu::dtype_of(mask);
    for (int d = 0; d < 4; ++d) a.mask_stride[d] = mask.size(d) == 1 ? 0 : mask.stride(d);
  }
  a.stream = probs.nbytes() >= kStreamMinBytes;
  cpu::Dropout drop{};
  if (dropping) drop = cpu::dropout_of(*seed, dropout_p), a.dropout = &drop;
  const auto dt = cpu::dtype_of(scores);
  at::parallel_for(0, rows, grain_of(k),
                   [&](int64_t r0, int64_t r1) { FASTBERT_CPU_CALL(masked_softmax_fwd, dt, a, r0, r1); });
  return {probs, soft};
}

at::Tensor masked_softmax_bwd_cpu(const at::Tensor& grad_, const at::Tensor& softmax_, double scale, double dropout_p,
                                  const std::optional<at::Tensor>& seed) {
  check_masked_softmax_bwd(grad_, softmax_);
  check_masked_softmax(softmax_, std::nullopt, dropout_p, seed);
  const at::Tensor grad = grad_.contiguous(), softmax = softmax_.contiguous();
  at::Tensor ds = empty_output(softmax.sizes(), softmax.options());
  const int64_t k = softmax.size(3), rows = k ? softmax.numel() / k : 0;
  if (rows == 0 || k == 0) return ds;
  cpu::SoftmaxArgs a;
  a.heads = softmax.size(1), a.queries = softmax.size(2), a.k = k;
  a.scale = static_cast<float>(scale), a.scale64 = scale;
  a.grad = grad.const_data_ptr(), a.saved = softmax.const_data_ptr(), a.dscores = ds.data_ptr();
  a.stream = ds.nbytes() >= kStreamMinBytes;
  cpu::Dropout drop{};
  if (dropout_active(seed, dropout_p)) drop = cpu::dropout_of(*seed, dropout_p), a.dropout = &drop;
  const auto dt = cpu::dtype_of(softmax);
  at::parallel_for(0, rows, grain_of(k),
                   [&](int64_t r0, int64_t r1) { FASTBERT_CPU_CALL(masked_softmax_bwd, dt, a, r0, r1); });
  return ds;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("masked_softmax_fwd", &masked_softmax_fwd_cpu);
  m.impl("masked_softmax_bwd", &masked_softmax_bwd_cpu);
}

}  // namespace fastbert
