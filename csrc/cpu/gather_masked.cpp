// Masked-token gather on CPU. A gather is a copy, so there is no per-ISA kernel: rows are moved with
// memcpy (already vectorised by libc) across threads.
//
// Forward: one sequential scan of labels [N] numbers the selected rows (slot[n] = their place in
// `rows`, -1 when labels[n] == ignore_index) and fills index / targets; then the M selected rows of
// hidden [N, H] (any row stride, unit column stride) are copied into rows [M, H] in parallel.
// Backward: out [N, H] row n = grad[slot[n]] or zeros, every row written once (no zero-fill pass).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

#include "common/checks.h"
#include "common/memory.h"

namespace fastbert {
namespace {

// Rows per task: about 256 KiB of copying, so that narrow rows are not one task each.
int64_t grain_of(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{256} << 10) / std::max<int64_t>(row_bytes, 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gather_masked_fwd_cpu(const at::Tensor& hidden_,
                                                                                 const at::Tensor& labels_,
                                                                                 int64_t ignore_index) {
  check_gather_masked(hidden_, labels_);
  const at::Tensor hidden = hidden_.stride(1) == 1 ? hidden_ : hidden_.contiguous();  // rows may be strided
  const at::Tensor labels = labels_.contiguous();
  const int64_t n = hidden.size(0), h = hidden.size(1);
  at::Tensor slot = at::empty({n}, labels.options().dtype(at::kLong));
  at::Tensor index_all = at::empty({n}, slot.options());
  at::Tensor targets_all = at::empty({n}, slot.options());
  int64_t* sl = slot.data_ptr<int64_t>();
  int64_t* ix = index_all.data_ptr<int64_t>();
  int64_t* tg = targets_all.data_ptr<int64_t>();
  int64_t m = 0;
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "gather_masked", [&] {
    const scalar_t* lb = labels.const_data_ptr<scalar_t>();
    // compared in the labels' type, as torch's `labels != ignore_index` does (uint8 labels: -100 is 156)
    const scalar_t ignore = static_cast<scalar_t>(ignore_index);
    for (int64_t i = 0; i < n; ++i) {
      if (lb[i] == ignore) {
        sl[i] = -1;
      } else {
        sl[i] = m, ix[m] = i, tg[m] = static_cast<int64_t>(lb[i]);
        ++m;
      }
    }
  });
  at::Tensor rows = empty_output({m, h}, hidden.options());
  const int64_t row_bytes = h * static_cast<int64_t>(hidden.element_size());
  if (m > 0 && row_bytes > 0) {
    const char* src = static_cast<const char*>(hidden.const_data_ptr());
    char* dst = static_cast<char*>(rows.data_ptr());
    const int64_t src_stride = hidden.stride(0) * static_cast<int64_t>(hidden.element_size());
    at::parallel_for(0, m, grain_of(row_bytes), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) std::memcpy(dst + r * row_bytes, src + ix[r] * src_stride, row_bytes);
    });
  }
  // narrow() views of the [N] buffers: M is only known after the scan
  return {rows, targets_all.narrow(0, 0, m), index_all.narrow(0, 0, m), slot};
}

at::Tensor gather_masked_bwd_cpu(const at::Tensor& grad_, const at::Tensor& slot_) {
  check_gather_masked_bwd(grad_, slot_);
  const at::Tensor grad = grad_.contiguous(), slot = slot_.contiguous();
  const int64_t n = slot.size(0), h = grad.size(1), m = grad.size(0);
  at::Tensor out = empty_output({n, h}, grad.options());
  const int64_t row_bytes = h * static_cast<int64_t>(grad.element_size());
  if (n == 0 || row_bytes == 0) return out;
  const int64_t* sl = slot.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)  // direct calls: a slot past grad's rows would read out of bounds
    TORCH_CHECK_VALUE(sl[i] < m, "gather_masked backward: slot[", i, "] = ", sl[i], " but grad has ", m, " rows");
  const char* src = static_cast<const char*>(grad.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, n, grain_of(row_bytes), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (sl[r] >= 0) {
        std::memcpy(dst + r * row_bytes, src + sl[r] * row_bytes, row_bytes);
      } else {
        std::memset(dst + r * row_bytes, 0, row_bytes);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("gather_masked_fwd", &gather_masked_fwd_cpu);
  m.impl("gather_masked_bwd", &gather_masked_bwd_cpu);
}

}  // namespace fastbert
