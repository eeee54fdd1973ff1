"""Helpers shared by the Triton op modules: op definition, dtype list, rounding stores."""

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The interpreter's fp32 -> bf16 cast truncates (GPUs round to nearest even); under it, round first.
_ROUND_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def for_store(v, ptr):
    """fp32 ``v`` converted to ``ptr``'s element type, rounded to nearest even."""
    if _ROUND_BF16:
        if ptr.dtype.element_ty == tl.bfloat16:
            # round to the nearest bf16 in fp32 bits (ties to even; NaN and inf stay), so the
            # interpreter's truncating cast below is exact
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(ptr.dtype.element_ty)


def define(name, fake):
    """``torch.library.triton_op`` (kernels visible to torch.compile / export, which trace the body
    and see the ``wrap_triton`` launches). Under TRITON_INTERPRET=1 the kernels are interpreted
    Python functions that cannot be traced (``wrap_triton`` hands them back unwrapped, and the body
    would launch them on fake tensors), so there the op is an opaque ``custom_op`` with a fake that
    only computes shapes; compiled graphs then call it eagerly. The schema is inferred from the
    annotations (``Optional[Tensor]`` -> ``Tensor?``)."""
    def deco(fn):
        if INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fake)
            return op
        return triton_op(name, fn, mutates_args=())
    return deco


def check_device(x, op):
    if x.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(f"{op}: the Triton kernels run CUDA tensors (CPU tensors only under "
                           f"TRITON_INTERPRET=1, set before triton is imported)")


def check_dtypes(op, **tensors):
    for name, t in tensors.items():
        if t is not None and t.dtype not in DTYPES:
            raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def aot_spec(kernel, label, signature, constexprs, num_warps, divisible_by_16):
    """One ahead-of-time compile entry for an ``AOT_SPECS`` list (see fastbert/triton/aot.py)."""
    blocks = "x".join(f"{v}" for k, v in constexprs.items() if k.startswith("BLOCK_"))
    return dict(name=f"{kernel.__name__.strip('_')}[{label},{blocks},w{num_warps}]", kernel=kernel,
                signature=signature, constexprs=constexprs, num_warps=num_warps, num_stages=1,
                divisible_by_16=divisible_by_16)
