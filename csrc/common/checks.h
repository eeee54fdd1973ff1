#pragma once
// Input checks shared by the CPU and CUDA glue. The Python wrappers (fastbert/ops) check the same
// things first with friendlier messages; these guard direct torch.ops.fastbert.* calls.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

namespace fastbert {

inline void check_float(const at::Tensor& t, const char* op, const char* name, bool allow_double) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kHalf || st == at::kBFloat16 ||
                  (allow_double && st == at::kDouble);
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must be float32, float16 or bfloat16",
                   allow_double ? " (or float64)" : "", ", got ", st);
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name, " is on ", b.device(),
                    " but x is on ", a.device());
}

inline bool parse_gelu_approximate(std::string_view approximate) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh",
                    "bias_gelu: approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

// x[..., N] with an optional bias[N]; float64 only on CPU.
inline void check_bias_gelu(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  const bool cpu = x.device().is_cpu();
  check_float(x, "bias_gelu", "x", cpu);
  TORCH_CHECK_VALUE(x.dim() >= 1, "bias_gelu: x must have at least one dimension");
  if (!bias) return;
  check_float(*bias, "bias_gelu", "bias", cpu);
  check_same_device(x, *bias, "bias_gelu", "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == x.size(-1),
                    "bias_gelu: bias must have shape [", x.size(-1), "] (the last dimension of x), got ",
                    bias->sizes());
  TORCH_CHECK_VALUE(!cpu || (x.scalar_type() == at::kDouble) == (bias->scalar_type() == at::kDouble),
                   "bias_gelu: float64 x needs a float64 bias and vice versa");
}

// The backward's extra input: grad must match x in shape, dtype and device.
inline void check_bias_gelu_grad(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "bias_gelu backward: grad has shape ", grad.sizes(),
                    " but x has shape ", x.sizes());
  TORCH_CHECK_VALUE(grad.scalar_type() == x.scalar_type(), "bias_gelu backward: grad dtype ",
                    grad.scalar_type(), " differs from x dtype ", x.scalar_type());
  check_same_device(x, grad, "bias_gelu backward", "grad");
}

// layernorm_residual: x, residual [..., n] (one dtype); weight, bias [n] (one dtype); x_bias [n].
inline void check_layernorm_residual(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                     const at::Tensor& bias, const std::optional<at::Tensor>& x_bias,
                                     double eps, double dropout_p) {
  const char* op = "layernorm_residual";
  const bool cpu = x.device().is_cpu();
  check_float(x, op, "x", cpu);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), op, ": residual has shape ", residual.sizes(),
                    " but x has shape ", x.sizes());
  TORCH_CHECK_VALUE(residual.scalar_type() == x.scalar_type(), op, ": residual dtype ",
                    residual.scalar_type(), " differs from x dtype ", x.scalar_type());
  check_same_device(x, residual, op, "residual");
  const int64_t n = x.size(-1);
  auto check_vec = [&](const at::Tensor& t, const char* name) {
    check_float(t, op, name, cpu);
    check_same_device(x, t, op, name);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n,
                      "] (the last dimension of x), got ", t.sizes());
  };
  check_vec(weight, "weight");
  check_vec(bias, "bias");
  if (x_bias) check_vec(*x_bias, "x_bias");
  TORCH_CHECK_VALUE(bias.scalar_type() == weight.scalar_type(), op, ": bias dtype ", bias.scalar_type(),
                    " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK_VALUE((x.scalar_type() == at::kDouble) == (weight.scalar_type() == at::kDouble), op,
                    ": float64 x needs float64 weight and bias and vice versa");
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be positive, got ", eps);
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, op, ": dropout_p must be in [0, 1), got ", dropout_p);
}

// The backward's extra inputs: grad like x; mean and rstd [x.shape[:-1]] in the statistics dtype.
inline void check_layernorm_residual_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                         const at::Tensor& rstd) {
  const char* op = "layernorm_residual backward";
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), op,
                    ": grad must match x in shape and dtype, got ", grad.sizes(), " ", grad.scalar_type());
  check_same_device(x, grad, op, "grad");
  const auto stats = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK_VALUE(t->numel() == (x.size(-1) ? x.numel() / x.size(-1) : 0) && t->scalar_type() == stats,
                      op, ": mean/rstd must hold one ", stats, " per row of x");
    check_same_device(x, *t, op, "mean/rstd");
  }
}

// Dropout runs when a seed tensor is given and p > 0; the seed is an int64 tensor on x's device.
inline bool dropout_active(const std::optional<at::Tensor>& seed, double dropout_p, const at::Tensor& x) {
  if (!seed || dropout_p <= 0) return false;
  TORCH_CHECK_VALUE(seed->scalar_type() == at::kLong && seed->numel() >= 1, "layernorm_residual: seed must "
                    "be an int64 tensor with one element, got ", seed->scalar_type(), " ", seed->sizes());
  check_same_device(x, *seed, "layernorm_residual", "seed");
  return true;
}

}  // namespace fastbert
