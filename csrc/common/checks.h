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
  const bool ok = st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (allow_double && st == at::kDouble);
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must be float32, float16 or bfloat16", allow_double ? " (or float64)" : "",
                    ", got ", st);
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name, " is on ", b.device(), " but x is on ", a.device());
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
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == x.size(-1), "bias_gelu: bias must have shape [", x.size(-1),
                    "] (the last dimension of x), got ", bias->sizes());
  TORCH_CHECK_VALUE(!cpu || (x.scalar_type() == at::kDouble) == (bias->scalar_type() == at::kDouble),
                    "bias_gelu: float64 x needs a float64 bias and vice versa");
}

// The backward's extra input: grad must match x in shape, dtype and device.
inline void check_bias_gelu_grad(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "bias_gelu backward: grad has shape ", grad.sizes(), " but x has shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(grad.scalar_type() == x.scalar_type(), "bias_gelu backward: grad dtype ", grad.scalar_type(),
                    " differs from x dtype ", x.scalar_type());
  check_same_device(x, grad, "bias_gelu backward", "grad");
}

// layernorm_residual (mirrors check_args in fastbert/ops/layernorm_residual.py): x and residual
// [..., N] of one float dtype; weight and bias [N] of one float dtype; x_bias [N] of any float dtype
// (float64 included: the glue converts it); float64 x, residual, weight and bias only on CPU, and x
// is float64 iff weight is; 0 <= dropout_p < 1; seed, when given, an int64 tensor of one element.
// Every tensor on x's device. The backward has no bias: it passes std::nullopt.
inline void check_layernorm_residual(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& x_bias,
                                     double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "layernorm_residual";
  const bool cpu = x.device().is_cpu();
  check_float(x, op, "x", cpu);
  check_float(residual, op, "residual", cpu);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), op, ": residual has shape ", residual.sizes(), " but x has shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(residual.scalar_type() == x.scalar_type(), op, ": residual dtype ", residual.scalar_type(),
                    " differs from x dtype ", x.scalar_type());
  check_same_device(x, residual, op, "residual");
  const int64_t n = x.size(-1);
  const auto param = [&](const at::Tensor& t, const char* name, bool allow_double) {
    check_float(t, op, name, allow_double);
    check_same_device(x, t, op, name);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n,
                      "] (the last dimension of x), got ", t.sizes());
  };
  param(weight, "weight", cpu);
  if (bias) {
    param(*bias, "bias", cpu);
    TORCH_CHECK_VALUE(bias->scalar_type() == weight.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                      " differs from weight dtype ", weight.scalar_type());
  }
  if (x_bias) param(*x_bias, "x_bias", true);
  TORCH_CHECK_VALUE((x.scalar_type() == at::kDouble) == (weight.scalar_type() == at::kDouble), op,
                    ": float64 x needs float64 weight and bias and vice versa");
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (seed) {
    TORCH_CHECK_VALUE(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
                      ": seed must be an int64 tensor with one element, got ", seed->scalar_type(), " of shape ",
                      seed->sizes());
    check_same_device(x, *seed, op, "seed");
  }
}

// Dropout runs when a seed is given and p > 0.
inline bool dropout_active(const std::optional<at::Tensor>& seed, double dropout_p) {
  return seed.has_value() && dropout_p > 0.0;
}

inline void check_layernorm_residual_eps(double eps) {
  TORCH_CHECK_VALUE(eps > 0.0 && eps <= 3.4028234663852886e38,
                    "layernorm_residual: eps must be a positive number (finite, at most float32's max), got ", eps);
}

// The backward's extra inputs: grad like x (shape, dtype, device); mean and rstd float32 (float64 for
// float64 x) of shape x.shape[:-1] on x's device. Call after check_layernorm_residual.
inline void check_layernorm_residual_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                          const at::Tensor& rstd) {
  constexpr const char* op = "layernorm_residual backward";
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), op, ": grad has shape ", grad.sizes(), " but x has shape ", x.sizes());
  TORCH_CHECK_VALUE(grad.scalar_type() == x.scalar_type(), op, ": grad dtype ", grad.scalar_type(),
                    " differs from x dtype ", x.scalar_type());
  check_same_device(x, grad, op, "grad");
  const at::IntArrayRef rows = x.sizes().slice(0, x.dim() - 1);
  const auto stats_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto stat = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.scalar_type() == stats_type, op, ": ", name, " must be ", stats_type, ", got ",
                      t.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == rows, op, ": ", name, " must have shape ", rows, " (x.shape[:-1]), got ", t.sizes());
    check_same_device(x, t, op, name);
  };
  stat(mean, "mean");
  stat(rstd, "rstd");
}

// masked_softmax: scores [B, H, Sq, Sk]; mask broadcastable to it (4-D: each dim 1 or the scores'),
// bool (True = attend) or float (additive); 0 <= dropout_p < 1; seed an int64 tensor of one element.
inline void check_masked_softmax(const at::Tensor& scores, const std::optional<at::Tensor>& mask, double dropout_p,
                                 const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "masked_softmax";
  check_float(scores, op, "scores", scores.device().is_cpu());
  TORCH_CHECK_VALUE(scores.dim() == 4, op, ": scores must be 4-D [batch, heads, queries, keys], got ", scores.sizes());
  if (mask) {
    const auto mt = mask->scalar_type();
    TORCH_CHECK_VALUE(
        mt == at::kBool || mt == at::kFloat || mt == at::kHalf || mt == at::kBFloat16 || mt == at::kDouble, op,
        ": mask must be bool or a float dtype, got ", mt);
    TORCH_CHECK_VALUE(mask->dim() == 4, op, ": mask must be 4-D here (broadcastable to scores), got ", mask->sizes());
    for (int d = 0; d < 4; ++d)
      TORCH_CHECK_VALUE(mask->size(d) == 1 || mask->size(d) == scores.size(d), op, ": mask of shape ", mask->sizes(),
                        " does not broadcast to scores of shape ", scores.sizes());
    check_same_device(scores, *mask, op, "mask");
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (seed) {
    TORCH_CHECK_VALUE(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
                      ": seed must be an int64 tensor with one element, got ", seed->scalar_type(), " of shape ",
                      seed->sizes());
    check_same_device(scores, *seed, op, "seed");
  }
}

// The backward's inputs: grad and the saved softmax of one shape and dtype.
inline void check_masked_softmax_bwd(const at::Tensor& grad, const at::Tensor& softmax) {
  constexpr const char* op = "masked_softmax backward";
  TORCH_CHECK_VALUE(grad.sizes() == softmax.sizes() && grad.scalar_type() == softmax.scalar_type(), op, ": grad (",
                    grad.sizes(), ", ", grad.scalar_type(), ") must match the saved softmax (", softmax.sizes(), ", ",
                    softmax.scalar_type(), ")");
  check_same_device(softmax, grad, op, "grad");
}

// gather_masked: hidden [N, H] float (float64 on CPU), labels [N] integer on hidden's device.
inline void check_gather_masked(const at::Tensor& hidden, const at::Tensor& labels) {
  constexpr const char* op = "gather_masked";
  check_float(hidden, op, "hidden", hidden.device().is_cpu());
  TORCH_CHECK_VALUE(hidden.dim() == 2, op, ": hidden must be 2-D [N, H] here, got ", hidden.sizes());
  const auto lt = labels.scalar_type();
  TORCH_CHECK_VALUE(lt == at::kLong || lt == at::kInt || lt == at::kShort || lt == at::kChar || lt == at::kByte, op,
                    ": labels must be an integer tensor, got ", lt);
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == hidden.size(0), op, ": labels must have shape [",
                    hidden.size(0), "] (hidden's rows), got ", labels.sizes());
  check_same_device(hidden, labels, op, "labels");
}

// The backward: grad [M, H] float, slot [N] int64 (row of grad, or -1), same device.
inline void check_gather_masked_bwd(const at::Tensor& grad, const at::Tensor& slot) {
  constexpr const char* op = "gather_masked backward";
  check_float(grad, op, "grad", grad.device().is_cpu());
  TORCH_CHECK_VALUE(grad.dim() == 2, op, ": grad must be 2-D [M, H], got ", grad.sizes());
  TORCH_CHECK_VALUE(slot.scalar_type() == at::kLong && slot.dim() == 1, op, ": slot must be a 1-D int64 tensor, got ",
                    slot.scalar_type(), " of shape ", slot.sizes());
  check_same_device(grad, slot, op, "slot");
}

// linear_cross_entropy kernels: logits [c, V] float (float64 on CPU), V >= 1; targets [c] int64 or
// int32; row_scale (the backward) [c] float32 (float64 for float64 logits); all on logits' device.
inline void check_cross_entropy(const at::Tensor& logits, const at::Tensor& targets,
                                const std::optional<at::Tensor>& row_scale) {
  constexpr const char* op = "linear_cross_entropy";
  check_float(logits, op, "logits", logits.device().is_cpu());
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1, op,
                    ": logits must be [rows, vocab] with vocab >= 1, got ", logits.sizes());
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, op,
                    ": targets must be int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": targets must have shape [",
                    logits.size(0), "], got ", targets.sizes());
  check_same_device(logits, targets, op, "targets");
  if (!row_scale) return;
  const auto st = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(row_scale->scalar_type() == st && row_scale->dim() == 1 && row_scale->size(0) == logits.size(0), op,
                    ": row_scale must be ", st, " of shape [", logits.size(0), "], got ", row_scale->scalar_type(),
                    " of shape ", row_scale->sizes());
  check_same_device(logits, *row_scale, op, "row_scale");
  TORCH_CHECK_VALUE(logits.is_contiguous(), op, ": the backward overwrites logits in place: they must be contiguous");
}

}  // namespace fastbert
