// bias + dropout + residual + LayerNorm on CUDA: tensor glue (checks, contiguous copies, fp32
// parameters, outputs, workspaces, stream). The kernels live in layernorm_residual_{fwd,bwd}_kernel.cu
// behind the raw-pointer launchers of launch.h. float64 x is not supported on CUDA (checks.h).
// The dropout seed stays on the device: the kernels read it, so nothing here synchronises.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common/checks.h"
#include "cuda/glue.h"

namespace fastbert {
namespace {

// The seed as the kernels take it: null unless dropout is active (a seed and p > 0).
const int64_t* seed_or_null(const std::optional<at::Tensor>& seed, double p) {
  return seed && p > 0.0 ? seed->const_data_ptr<int64_t>() : nullptr;
}

std::vector<int64_t> stats_shape(const at::Tensor& x) {  // x.shape[:-1]
  std::vector<int64_t> s = x.sizes().vec();
  s.pop_back();
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_residual_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& residual_, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const std::optional<at::Tensor>& x_bias, double dropout_p, const std::optional<at::Tensor>& seed) {
  check_layernorm_residual(x_, residual_, weight, bias, x_bias, dropout_p, seed);
  check_layernorm_residual_eps(eps);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), res = residual_.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty(stats_shape(x), f32), rstd = at::empty(stats_shape(x), f32);
  const int64_t n = x.size(-1), rows = mean.numel();
  if (rows == 0) return {y, mean, rstd};
  if (n == 0) {  // statistics of empty rows, as torch.native_layer_norm gives them
    mean.zero_();
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, mean, rstd};
  }
  const at::Tensor w = cuda::fp32(weight), b = cuda::fp32(bias), xb = cuda::fp32(x_bias);
  C10_CUDA_CHECK(cuda::layernorm_residual_fwd(
      cuda::dtype_of(x, "layernorm_residual"), x.const_data_ptr(), res.const_data_ptr(), w.const_data_ptr<float>(),
      b.const_data_ptr<float>(), cuda::ptr_or_null(xb), seed_or_null(seed, dropout_p), dropout_p,
      static_cast<float>(eps), y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, n,
      c10::cuda::getCurrentCUDAStream()));
  return {y, mean, rstd};
}

// Returns (dresidual, dx, dweight, dbias, dx_bias). dx is an empty [0] tensor unless dropout is
// active (the autograd formula then uses dresidual for both); dx_bias one unless x_bias is given.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_residual_bwd_cuda(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& residual_, const at::Tensor& weight,
    const std::optional<at::Tensor>& x_bias, const at::Tensor& mean_, const at::Tensor& rstd_, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  check_layernorm_residual(x_, residual_, weight, std::nullopt, x_bias, dropout_p, seed);
  check_layernorm_residual_grad(grad_, x_, mean_, rstd_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), res = residual_.contiguous(), grad = grad_.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const int64_t* seed_ptr = seed_or_null(seed, dropout_p);
  at::Tensor dres = at::empty(x.sizes(), x.options());
  at::Tensor dx = seed_ptr != nullptr ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  const int64_t n = x.size(-1), rows = mean.numel();
  const auto empty0 = [&] { return at::empty({0}, x.options()); };
  if (rows == 0 || n == 0) {  // sums over no rows are zero; n == 0 gives [0] gradients
    at::Tensor dxb = x_bias ? at::zeros({n}, x_bias->options()) : empty0();
    return {dres, dx, at::zeros({n}, weight.options()), at::zeros({n}, weight.options()), dxb};
  }
  const auto f32 = x.options().dtype(at::kFloat);
  const cuda::LayerNormResidualBwdPlan plan = cuda::layernorm_residual_bwd_plan(rows, n);
  // fp32 workspaces (launch.h): per-block column sums, and per-row sums for very long rows
  const at::Tensor partial = at::empty({plan.blocks, x_bias ? 3 : 2, n}, f32);
  const at::Tensor row_stats = plan.row_stats ? at::empty({rows, 2}, f32) : at::Tensor();
  at::Tensor dw = at::empty({n}, f32), db = at::empty({n}, f32);
  at::Tensor dxb = x_bias ? at::empty({n}, f32) : at::Tensor();
  const at::Tensor w = cuda::fp32(weight), xb = cuda::fp32(x_bias);
  C10_CUDA_CHECK(cuda::layernorm_residual_bwd(
      cuda::dtype_of(x, "layernorm_residual"), grad.const_data_ptr(), x.const_data_ptr(), res.const_data_ptr(),
      w.const_data_ptr<float>(), cuda::ptr_or_null(xb), seed_ptr, dropout_p, mean.const_data_ptr<float>(),
      rstd.const_data_ptr<float>(), dres.data_ptr(), seed_ptr != nullptr ? dx.data_ptr() : nullptr,
      dw.data_ptr<float>(), db.data_ptr<float>(), dxb.defined() ? dxb.data_ptr<float>() : nullptr,
      partial.data_ptr<float>(), row_stats.defined() ? row_stats.data_ptr<float>() : nullptr, rows, n, plan,
      c10::cuda::getCurrentCUDAStream()));
  // parameter gradients in their parameters' dtypes (no copy when that is fp32)
  return {dres, dx, dw.to(weight.scalar_type()), db.to(weight.scalar_type()),
          x_bias ? dxb.to(x_bias->scalar_type()) : empty0()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("layernorm_residual_fwd", &layernorm_residual_fwd_cuda);
  m.impl("layernorm_residual_bwd", &layernorm_residual_bwd_cuda);
}

}  // namespace fastbert
