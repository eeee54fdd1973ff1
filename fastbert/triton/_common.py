"""Helpers shared by the Triton op modules: op definition, dtype list, rounding stores, dropout mask."""

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRET:

    def wrap_triton(kernel):
        """The kernel itself: under the interpreter the ops are opaque custom ops (``define``), never
        traced, so there is nothing to wrap (torch 2.11's ``wrap_triton`` rejects interpreted kernels:
        "wrap_triton only works on functions annotated with triton.jit")."""
        return kernel
else:
    from torch.library import wrap_triton  # noqa: F401  (the launchers import it from here)
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


@triton.jit
def philox_keep(seed_ptr, r64, col0, n, threshold, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep mask [BLOCK_M, BLOCK_N] of rows ``r64`` (int64) x columns ``col0 + [0, BLOCK_N)``
    of a contiguous [rows, n] tensor: element ``e = r n + c`` on the shared Philox stream
    (fastbert/philox.py: counter ``16 (e >> 6) + (e & 15)``, output ``(e >> 4) & 3``), kept iff its
    top 24 bits are ``>= threshold``. The counters go to ``tl.philox`` as two uint32 words, so every
    triton runs Philox4x32-10 (``tl.randint4x`` does so only from triton 3.4).

    Three static modes, by the launcher's GROUPED and BLOCK_N:
    * GROUPED (``n`` and ``col0`` multiples of 64, BLOCK_N of 64): the columns ``c + 16 k``, k < 4, of
      a 64-column group are the 4 outputs of one counter: one Philox call per 4 elements.
    * paired (any ``n``, BLOCK_N a multiple of 64): a row starts at phase ``r n mod 64`` of the flat
      stream, so the columns ``c + 16 k`` (``e + 16 k``) span at most two 64-groups, with the same low
      4 bits: counters ``16 g + j`` and ``16 (g + 1) + j``, ``g = e >> 6``, ``j = e & 15``; element k
      takes output ``u + k`` of the first (``u = (e >> 4) & 3``) or ``u + k - 4`` of the second, a
      per-element select. Two Philox calls per 4 elements.
    * per element (BLOCK_N < 64): one Philox call per element, only for rows of under 64 columns.
    GROUPED and paired return the [M, G, 16] x k results interleaved back into column order (join +
    permute + reshape: column ``64 gi + 16 k + j``)."""
    seed = tl.load(seed_ptr)
    if BLOCK_N % 64 == 0:
        G: tl.constexpr = BLOCK_N // 64
        e = (
            r64[:, None, None] * n + col0 + (64 * tl.arange(0, G))[None, :, None] + tl.arange(0, 16)[None, None, :]
        )  # [M, G, 16]: the element of column k = 0
        c = (e >> 6) * 16 + (e & 15)
        # 32-bit Philox on every triton: counter words (low, high, 0, 0) as uint32 (triton < 3.4's
        # tl.randint4x ran int64 counters as 64-bit Philox, a different stream)
        c_lo = c.to(tl.uint32)
        zero = c_lo * 0
        a0, a1, a2, a3 = tl.philox(seed, c_lo, (c >> 32).to(tl.uint32), zero, zero)
        k0 = (a0 >> 8) >= threshold
        k1 = (a1 >> 8) >= threshold
        k2 = (a2 >> 8) >= threshold
        k3 = (a3 >> 8) >= threshold
        if not GROUPED:
            c = c + 16
            c_lo = c.to(tl.uint32)
            b0, b1, b2, b3 = tl.philox(seed, c_lo, (c >> 32).to(tl.uint32), zero, zero)
            u = (e >> 4) & 3
            m0 = (b0 >> 8) >= threshold
            m1 = (b1 >> 8) >= threshold
            m2 = (b2 >> 8) >= threshold
            # element k takes output u + k of (a0..a3, b0..b3): b3 is never needed (u + k <= 6)
            k0, k1, k2, k3 = (
                tl.where(u == 0, k0, tl.where(u == 1, k1, tl.where(u == 2, k2, k3))),
                tl.where(u == 0, k1, tl.where(u == 1, k2, tl.where(u == 2, k3, m0))),
                tl.where(u == 0, k2, tl.where(u == 1, k3, tl.where(u == 2, m0, m1))),
                tl.where(u == 0, k3, tl.where(u == 1, m0, tl.where(u == 2, m1, m2))),
            )
        k = tl.join(tl.join(k0, k1), tl.join(k2, k3))  # [M, G, j, q, p]: k = 2p + q
        return tl.reshape(tl.permute(k, (0, 1, 4, 3, 2)), (BLOCK_M, BLOCK_N))
    else:
        e = r64[:, None] * n + (col0 + tl.arange(0, BLOCK_N))[None, :]
        c = (e >> 6) * 16 + (e & 15)
        c_lo = c.to(tl.uint32)
        zero = c_lo * 0
        o0, o1, o2, o3 = tl.philox(seed, c_lo, (c >> 32).to(tl.uint32), zero, zero)  # as above
        w = (e >> 4) & 3
        o = tl.where(w == 0, o0, tl.where(w == 1, o1, tl.where(w == 2, o2, o3)))
        return (o >> 8) >= threshold


def define(name, fake, mutates_args=(), schema=None):
    """``torch.library.triton_op`` (kernels visible to torch.compile / export, which trace the body
    and see the ``wrap_triton`` launches). Under TRITON_INTERPRET=1 the kernels are interpreted
    Python functions that cannot be traced (``wrap_triton`` hands them back unwrapped, and the body
    would launch them on fake tensors), so there the op is an opaque ``custom_op`` with a fake that
    only computes shapes; compiled graphs then call it eagerly. The schema is inferred from the
    annotations (``Optional[Tensor]`` -> ``Tensor?``, ``int`` -> ``SymInt``) unless ``schema`` is
    given (e.g. to match a C++ op's ``int`` and ``Tensor(a!)``); ``mutates_args`` names the
    arguments the kernels write in place."""

    def deco(fn):
        if INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=mutates_args, schema=schema)
            op.register_fake(fake)
            return op
        return triton_op(name, fn, mutates_args=mutates_args, schema=schema)

    return deco


def check_device(x, op):
    if x.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            f"{op}: the Triton kernels run CUDA tensors (CPU tensors only under "
            f"TRITON_INTERPRET=1, set before triton is imported)"
        )


def check_dtypes(op, **tensors):
    for name, t in tensors.items():
        if t is not None and t.dtype not in DTYPES:
            raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def aot_spec(kernel, label, signature, constexprs, num_warps, divisible_by_16):
    """One ahead-of-time compile entry for an ``AOT_SPECS`` list (see fastbert/triton/aot.py).
    ``num_stages`` is None (the backend's default, as the launchers pass none); a launcher that
    passes one sets ``spec["num_stages"]``."""
    blocks = "x".join(f"{v}" for k, v in constexprs.items() if k.startswith("BLOCK_"))
    return dict(
        name=f"{kernel.__name__.strip('_')}[{label},{blocks},w{num_warps}]",
        kernel=kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=num_warps,
        num_stages=None,
        divisible_by_16=divisible_by_16,
    )
