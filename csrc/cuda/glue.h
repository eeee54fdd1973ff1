#pragma once
// Tensor-side helpers shared by the CUDA glue files (csrc/cuda/<op>.cpp).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "cuda/launch.h"

namespace fastbert::cuda {

inline DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: break;
  }
  TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", t.scalar_type(), " on CUDA");
}

// A parameter as the kernels read it: fp32, contiguous; undefined when absent.
inline at::Tensor fp32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }
inline at::Tensor fp32(const std::optional<at::Tensor>& t) { return t ? fp32(*t) : at::Tensor(); }
inline const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

}  // namespace fastbert::cuda
