// bias + GELU on CUDA: tensor glue (checks, contiguous copies, outputs, workspace, stream). The
// kernels live in bias_gelu_kernel.cu behind the raw-pointer launchers of launch.h. Semantics match
// csrc/cpu/bias_gelu.cpp, except that float64 is not supported on CUDA (checks.h rejects it).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/glue.h"

namespace fastbert {
namespace {

at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x_, const std::optional<at::Tensor>& bias,
                              c10::string_view approximate) {
  check_bias_gelu(x_, bias);
  const bool tanh = parse_gelu_approximate(approximate);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor b = cuda::fp32(bias);
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t n = x.size(-1), total = x.numel();
  if (total == 0) return y;
  C10_CUDA_CHECK(cuda::bias_gelu_fwd(cuda::dtype_of(x, "bias_gelu"), x.const_data_ptr(), cuda::ptr_or_null(b),
                                     y.data_ptr(), total / n, n, tanh, c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& dy_, const at::Tensor& x_,
                                                      const std::optional<at::Tensor>& bias,
                                                      c10::string_view approximate, bool need_dbias) {
  check_bias_gelu(x_, bias);
  const bool tanh = parse_gelu_approximate(approximate);
  check_bias_gelu_grad(dy_, x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), dy = dy_.contiguous();
  const at::Tensor b = cuda::fp32(bias);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const bool want_db = need_dbias && b.defined();
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0 || n == 0) {  // sum over no rows is zero; n == 0 gives a [0] dbias
    at::Tensor dbias = want_db ? at::zeros({n}, bias->options()) : at::empty({0}, x.options());
    return {dx, dbias};
  }
  const cuda::DType dt = cuda::dtype_of(x, "bias_gelu");
  const cuda::BiasGeluBwdPlan plan = cuda::bias_gelu_bwd_plan(dt, rows, n);
  // fp32 workspace: one row of partial column sums per chunk of rows (see launch.h).
  at::Tensor partial, dbias32;
  if (want_db) {
    partial = at::empty({plan.chunks, n}, b.options());
    dbias32 = at::empty({n}, b.options());
  }
  C10_CUDA_CHECK(cuda::bias_gelu_bwd(dt, dy.const_data_ptr(), x.const_data_ptr(), cuda::ptr_or_null(b), dx.data_ptr(),
                                     want_db ? partial.data_ptr<float>() : nullptr,
                                     want_db ? dbias32.data_ptr<float>() : nullptr, rows, n, plan, tanh,
                                     c10::cuda::getCurrentCUDAStream()));
  if (!want_db) return {dx, at::empty({0}, x.options())};
  return {dx, dbias32.to(bias->scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cuda);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cuda);
}

}  // namespace fastbert
