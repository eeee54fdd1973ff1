// Masked-token gather on CUDA: tensor glue (checks, outputs, the one device-to-host copy of the
// selected count M, stream). The kernels live in gather_masked_kernel.cu behind the raw-pointer
// launchers of launch.h. float64 is not supported on CUDA (checks.h). hidden and grad are read
// through their row stride when their last dimension is contiguous (no copy of the whole input).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/glue.h"

namespace fastbert {
namespace {

cuda::IntType int_type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kLong: return cuda::IntType::i64;
    case at::kInt: return cuda::IntType::i32;
    case at::kShort: return cuda::IntType::i16;
    case at::kChar: return cuda::IntType::i8;
    case at::kByte: return cuda::IntType::u8;
    default: break;
  }
  TORCH_CHECK_VALUE(false, "gather_masked: unsupported labels dtype ", t.scalar_type());
}

// A [rows, width] tensor as the row kernel reads it: row r at data + r * stride(0) elements. Taken as
// is when its elements within a row are adjacent (or there is at most one), else copied.
at::Tensor row_strided(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

// (rows [M, H], targets [M], index [M], slot [N]). The select kernel writes slot, index and targets
// (the latter two allocated for N rows and narrowed to M) and M to the device; reading M back (one
// device-to-host copy, which waits for the stream) sizes rows; the row kernel then copies them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gather_masked_fwd_cuda(const at::Tensor& hidden_,
                                                                                  const at::Tensor& labels_,
                                                                                  int64_t ignore_index) {
  check_gather_masked(hidden_, labels_);
  const c10::cuda::CUDAGuard guard(hidden_.device());
  const int64_t N = hidden_.size(0), H = hidden_.size(1);
  const at::Tensor labels = labels_.contiguous();
  const auto i64 = labels.options().dtype(at::kLong);
  at::Tensor slot = at::empty({N}, i64);
  if (N == 0) return {at::empty({0, H}, hidden_.options()), at::empty({0}, i64), at::empty({0}, i64), slot};
  at::Tensor index = at::empty({N}, i64), targets = at::empty({N}, i64), count = at::empty({1}, i64);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cuda::gather_masked_select(int_type_of(labels), labels.const_data_ptr(), N, ignore_index,
                                            slot.data_ptr<int64_t>(), index.data_ptr<int64_t>(),
                                            targets.data_ptr<int64_t>(), count.data_ptr<int64_t>(), stream));
  const int64_t M = count.item<int64_t>();
  TORCH_CHECK(M >= 0 && M <= N, "gather_masked: the CUDA select kernel counted ", M, " rows of ", N);
  at::Tensor rows = at::empty({M, H}, hidden_.options());
  if (M > 0 && H > 0) {
    const at::Tensor hidden = row_strided(hidden_);
    C10_CUDA_CHECK(cuda::gather_masked_rows(cuda::dtype_of(hidden, "gather_masked"), hidden.const_data_ptr(),
                                            hidden.stride(0), N, index.const_data_ptr<int64_t>(), rows.data_ptr(), M, H,
                                            stream));
  }
  return {rows, targets.narrow(0, 0, M), index.narrow(0, 0, M), slot};
}

// dhidden [N, H]: row n = grad[slot[n]] where slot[n] >= 0, else zeros, all written by one kernel.
at::Tensor gather_masked_bwd_cuda(const at::Tensor& grad_, const at::Tensor& slot_) {
  check_gather_masked_bwd(grad_, slot_);
  const c10::cuda::CUDAGuard guard(grad_.device());
  const at::Tensor slot = slot_.contiguous();
  const int64_t N = slot.size(0), H = grad_.size(1);
  at::Tensor out = at::empty({N, H}, grad_.options());
  if (N == 0 || H == 0) return out;
  const at::Tensor grad = row_strided(grad_);
  C10_CUDA_CHECK(cuda::gather_masked_rows(cuda::dtype_of(grad, "gather_masked backward"), grad.const_data_ptr(),
                                          grad.stride(0), grad.size(0), slot.const_data_ptr<int64_t>(), out.data_ptr(),
                                          N, H, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("gather_masked_fwd", &gather_masked_fwd_cuda);
  m.impl("gather_masked_bwd", &gather_masked_bwd_cuda);
}

}  // namespace fastbert
