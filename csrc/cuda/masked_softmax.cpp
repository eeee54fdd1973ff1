// Masked softmax (+ dropout) on CUDA: tensor glue (checks, contiguous copies, the mask's broadcast
// strides, outputs, stream). The kernels live in masked_softmax_{fwd,bwd}_kernel.cu behind the
// raw-pointer launchers of launch.h. float64 scores are not supported on CUDA (checks.h); float64
// masks are converted to float32 here. The dropout seed stays on the device: the kernels read it, so
// nothing here synchronises.
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "cuda/glue.h"

namespace fastbert {
namespace {

// The seed as the kernels take it: null unless dropout is active (a seed and p > 0).
const int64_t* seed_or_null(const std::optional<at::Tensor>& seed, double p) {
  return dropout_active(seed, p) ? seed->const_data_ptr<int64_t>() : nullptr;
}

// The mask as the kernels read it (launch.h: SoftmaxMask). Broadcast dimensions (size 1, or an
// expanded size with stride 0) read one slice through stride 0, so nothing is materialised; a float64
// mask becomes float32 (of that compact shape), its finite values clamped to float32's range so that
// e.g. finfo(float64).min stays finite (-inf stays -inf); a 16-bit mask of the other 16-bit type than
// the scores' becomes float32 too (exactly; the kernels are instantiated for bool, float32 and the
// scores' own dtype). `keep` holds the tensor the pointer is into.
cuda::SoftmaxMask kernel_mask(const std::optional<at::Tensor>& mask, at::ScalarType scores_dtype, at::Tensor& keep) {
  cuda::SoftmaxMask out{cuda::MaskType::none, nullptr, {0, 0, 0, 0}};
  if (!mask) return out;
  keep = *mask;
  for (int d = 0; d < 4; ++d)
    if (keep.size(d) > 1 && keep.stride(d) == 0) keep = keep.narrow(d, 0, 1);
  const auto mt = keep.scalar_type();
  if ((mt == at::kHalf || mt == at::kBFloat16) && mt != scores_dtype) keep = keep.to(at::kFloat);
  switch (keep.scalar_type()) {
    case at::kBool: out.type = cuda::MaskType::b8; break;
    case at::kFloat: out.type = cuda::MaskType::f32; break;
    case at::kHalf: out.type = cuda::MaskType::f16; break;
    case at::kBFloat16: out.type = cuda::MaskType::bf16; break;
    case at::kDouble: {
      constexpr double big = std::numeric_limits<float>::max();
      keep = at::where(keep.isinf(), keep, keep.clamp(-big, big)).to(at::kFloat);
      out.type = cuda::MaskType::f32;
      break;
    }
    default: TORCH_CHECK_VALUE(false, "masked_softmax: unsupported mask dtype ", keep.scalar_type());
  }
  out.data = keep.const_data_ptr();
  for (int d = 0; d < 4; ++d) out.stride[d] = keep.size(d) == 1 ? 0 : keep.stride(d);
  return out;
}

std::tuple<at::Tensor, at::Tensor> masked_softmax_fwd_cuda(const at::Tensor& scores_,
                                                           const std::optional<at::Tensor>& mask, double scale,
                                                           double dropout_p, const std::optional<at::Tensor>& seed) {
  check_masked_softmax(scores_, mask, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(scores_.device());
  const at::Tensor scores = scores_.contiguous();
  const int64_t* seed_ptr = seed_or_null(seed, dropout_p);
  at::Tensor probs = at::empty(scores.sizes(), scores.options());
  at::Tensor soft =
      seed_ptr != nullptr ? at::empty(scores.sizes(), scores.options()) : at::empty({0}, scores.options());
  if (scores.numel() == 0) return {probs, soft};
  at::Tensor mask_keep;
  const cuda::SoftmaxMask m = kernel_mask(mask, scores.scalar_type(), mask_keep);
  C10_CUDA_CHECK(cuda::masked_softmax_fwd(
      cuda::dtype_of(scores, "masked_softmax"), scores.const_data_ptr(), m, static_cast<float>(scale), seed_ptr,
      dropout_p, probs.data_ptr(), seed_ptr != nullptr ? soft.data_ptr() : nullptr, scores.size(0), scores.size(1),
      scores.size(2), scores.size(3), c10::cuda::getCurrentCUDAStream()));
  return {probs, soft};
}

at::Tensor masked_softmax_bwd_cuda(const at::Tensor& grad_, const at::Tensor& softmax_, double scale, double dropout_p,
                                   const std::optional<at::Tensor>& seed) {
  check_masked_softmax_bwd(grad_, softmax_);
  check_masked_softmax(softmax_, std::nullopt, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(softmax_.device());
  const at::Tensor grad = grad_.contiguous(), soft = softmax_.contiguous();
  at::Tensor dscores = at::empty(soft.sizes(), grad.options());
  if (soft.numel() == 0) return dscores;
  const int64_t keys = soft.size(-1);
  C10_CUDA_CHECK(cuda::masked_softmax_bwd(cuda::dtype_of(grad, "masked_softmax backward"), grad.const_data_ptr(),
                                          soft.const_data_ptr(), static_cast<float>(scale),
                                          seed_or_null(seed, dropout_p), dropout_p, dscores.data_ptr(),
                                          soft.numel() / keys, keys, c10::cuda::getCurrentCUDAStream()));
  return dscores;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("masked_softmax_fwd", &masked_softmax_fwd_cuda);
  m.impl("masked_softmax_bwd", &masked_softmax_bwd_cuda);
}

}  // namespace fastbert
