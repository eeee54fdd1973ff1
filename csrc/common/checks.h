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

}  // namespace fastbert
