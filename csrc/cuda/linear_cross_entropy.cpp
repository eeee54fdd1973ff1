// Fused softmax cross-entropy over a logits chunk on CUDA: tensor glue (checks, contiguous copies,
// outputs, stream). The kernels live in linear_cross_entropy_kernel.cu behind the raw-pointer
// launchers of launch.h. float64 logits are not supported on CUDA (checks.h); loss and lse are fp32.
// Nothing here synchronises: targets outside [0, vocab) (rejected in Python before the call) give a
// NaN loss (and NaN gradient row) instead of an error.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/glue.h"

namespace fastbert {
namespace {

cuda::IntType target_type(const at::Tensor& targets) {
  return targets.scalar_type() == at::kLong ? cuda::IntType::i64 : cuda::IntType::i32;  // checked: int64 / int32
}

// (loss [c], lse [c]) fp32; with row_scale (the backward) logits are overwritten in place.
std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& logits, const at::Tensor& targets_,
                                       const at::Tensor* row_scale_, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor targets = targets_.contiguous();
  const int64_t rows = logits.size(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, f32), lse = at::empty({rows}, f32);
  if (rows == 0) return {loss, lse};
  const auto dt = cuda::dtype_of(logits, "linear_cross_entropy");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (row_scale_ == nullptr) {
    C10_CUDA_CHECK(cuda::linear_cross_entropy_fwd(dt, logits.const_data_ptr(), target_type(targets),
                                                  targets.const_data_ptr(), ignore_index, loss.data_ptr<float>(),
                                                  lse.data_ptr<float>(), rows, logits.size(1), stream));
  } else {
    const at::Tensor row_scale = row_scale_->contiguous();
    C10_CUDA_CHECK(cuda::linear_cross_entropy_bwd(
        dt, logits.data_ptr(), target_type(targets), targets.const_data_ptr(), row_scale.const_data_ptr<float>(),
        ignore_index, loss.data_ptr<float>(), lse.data_ptr<float>(), rows, logits.size(1), stream));
  }
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_fwd_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                                 int64_t ignore_index) {
  check_cross_entropy(logits, targets, std::nullopt);
  return run(logits.contiguous(), targets, nullptr, ignore_index);
}

// The same outputs; logits (contiguous, checked) <- (softmax - onehot(target)) * row_scale, in place.
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_bwd_cuda(at::Tensor& logits, const at::Tensor& targets,
                                                                 const at::Tensor& row_scale, int64_t ignore_index) {
  check_cross_entropy(logits, targets, row_scale);
  return run(logits, targets, &row_scale, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cuda);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cuda);
}

}  // namespace fastbert
