"""Attention softmax in Triton: ``fastbert::masked_softmax_fwd_triton`` / ``_bwd_triton``.

Forward (fp32 maths whatever the storage dtype), per row of the ``[B, H, Sq, Sk]`` scores:
``x = s * scale + mask`` (a bool mask puts ``-inf`` where it is False; a float mask, of any float
dtype, is added in fp32, so ``torch.finfo(fp16).min`` cannot overflow), ``m = max(x)`` (0 when every
key is ``-inf``), ``e = exp(x - m)``, ``p = e / sum(e)`` (0 when the sum is 0: a fully masked row
gives zeros, never NaN). With dropout the kernel also writes ``p`` (``softmax``) and
``probs = keep ? p * scale_p : 0``. The mask is read through its four element strides (0 for a
size-1 dimension), never broadcast in memory.

Backward: ``g = keep ? grad * scale_p : 0`` (the mask regenerated from the seed; ``g = grad`` without
dropout), ``dscores = scale * p * (g - sum(g * p))``.

Rows of up to ``_MAX_N`` keys are held in registers, several rows per program for short rows
(``_softmax_fwd_kernel`` / ``_softmax_bwd_kernel``). Longer rows stream in chunks of
``_STREAM_BLOCK_N``: the forward keeps an online max and rescaled sum over the chunks, then writes
the normalised output in a second pass; the backward sums ``g * p`` in one pass and writes in a
second.

Dropout draws from the shared Philox stream (fastbert/philox.py) at the flat index of each element of
the contiguous output (``philox_keep`` in _common.py): one counter per 4 elements when
``Sk % 64 == 0`` (``GROUPED``), else two per 4 elements (tiles of 64 columns or more; one per element
under 64).
"""

from typing import Optional, Tuple

import torch
import triton

from fastbert import philox
from fastbert.ops import _library
from fastbert.ops.masked_softmax import OP, backward, canonical_mask, check_args, dropout_active, setup_context
from fastbert.ops.masked_softmax import _fake_bwd as _ops_fake_bwd
from fastbert.ops.masked_softmax import _fake_fwd as _ops_fake_fwd
from fastbert.triton._common import aot_spec, check_device, check_dtypes, define, wrap_triton
from fastbert.triton._masked_softmax_kernels import (
    _softmax_bwd_kernel,
    _softmax_bwd_stream_kernel,
    _softmax_fwd_kernel,
    _softmax_fwd_stream_kernel,
)

# ----------------------------------------------------------------------------- launch configuration

_MAX_N = 8192  # longer rows: the streaming kernels (4096 with per-element counters)
_STREAM_BLOCK_N = 2048  # streaming chunk: 8 elements per thread over 8 warps


def _per_element(n, dropout):
    """Per-element Philox counters (dropout with ``n % 64 != 0``): four times the random numbers,
    so half the elements per thread and half the row length before the streaming kernels."""
    return dropout and n % 64 != 0


def block_config(n, dropout):
    """``(BLOCK_M, BLOCK_N, num_warps, streaming)`` for rows of ``n`` keys (forward and backward).

    A row that fits is one power-of-two block of columns; the tile takes enough rows for 16 elements
    per thread (8 with per-element counters) over 4 to 8 warps: 128 keys -> 16 rows x 128 over
    4 warps, 512 -> 4 rows, 4096 -> 1 row over 8 warps, 8192 -> 1 row with 32 per thread.
    """
    per_thread = 8 if _per_element(n, dropout) else 16
    if n > _MAX_N * per_thread // 16:
        return 1, _STREAM_BLOCK_N, 8, True
    bn = triton.next_power_of_2(max(n, 1))
    num_warps = min(8, max(4, bn // (32 * per_thread)))
    return max(1, num_warps * 32 * per_thread // bn), bn, num_warps, False


# ------------------------------------------------------------------------------------------- ops


def _check_seed(seed, scores, op):
    if seed is not None and (
        not isinstance(seed, torch.Tensor)
        or seed.dtype != torch.int64
        or seed.numel() != 1
        or seed.device != scores.device
    ):
        raise ValueError(f"{OP} ({op}): seed must be an int64 tensor with one element on scores' device")


def _check(scores, mask, scale, dropout_p, seed, op):
    check_args(scores, scale, dropout_p)
    check_dtypes(f"{OP} ({op})", scores=scores)
    mask = canonical_mask(scores, mask)
    _check_seed(seed, scores, op)
    check_device(scores, f"{OP} ({op})")
    return mask


def _check_bwd(grad, softmax, scale, dropout_p, seed):
    check_args(softmax, scale, dropout_p)
    check_dtypes(f"{OP} (triton backward)", softmax=softmax)
    _check_seed(seed, softmax, "triton backward")
    if grad.shape != softmax.shape or grad.dtype != softmax.dtype or grad.device != softmax.device:
        raise ValueError(
            f"{OP} backward: grad must be {softmax.dtype} of shape {list(softmax.shape)} on "
            f"{softmax.device}, got {grad.dtype} of shape {list(grad.shape)} on {grad.device}"
        )
    check_device(softmax, f"{OP} (triton backward)")


def _fake_fwd(scores, mask, scale, dropout_p, seed):
    _check(scores, mask, scale, dropout_p, seed, "triton forward")
    return _ops_fake_fwd(scores, mask, scale, dropout_p, seed)


def _fake_bwd(grad, softmax, scale, dropout_p, seed):
    _check_bwd(grad, softmax, scale, dropout_p, seed)
    return _ops_fake_bwd(grad, softmax, scale, dropout_p, seed)


def _dropout_args(dropout_p, seed):
    """(DROPOUT, threshold, p_scale) kernel arguments."""
    if dropout_active(dropout_p, seed):
        return True, philox.threshold(dropout_p), philox.scale(dropout_p)
    return False, 0, 1.0


def _mask_args(mask):
    """(mask pointer or None, [4 element strides, 0 where the mask broadcasts], HAS_MASK, BOOL_MASK)."""
    if mask is None:
        return None, [0, 0, 0, 0], False, False
    strides = [st if size != 1 else 0 for size, st in zip(mask.shape, mask.stride())]
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), strides, True, True
    return mask, strides, True, False


@define("fastbert::masked_softmax_fwd_triton", _fake_fwd)
def masked_softmax_fwd_triton(
    scores: torch.Tensor, mask: Optional[torch.Tensor], scale: float, dropout_p: float, seed: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    mask = _check(scores, mask, scale, dropout_p, seed, "triton forward")
    scores = scores.contiguous()
    probs = torch.empty_like(scores)
    drop, threshold, p_scale = _dropout_args(dropout_p, seed)
    soft = torch.empty_like(scores) if drop else scores.new_empty((0,))
    _, h, sq, n = scores.shape
    rows = scores.numel() // n if n else 0
    if rows == 0:
        return probs, soft
    m, (msb, msh, msq, msk), has_mask, bool_mask = _mask_args(mask)
    bm, bn, num_warps, streaming = block_config(n, drop)
    kernel = _softmax_fwd_stream_kernel if streaming else _softmax_fwd_kernel
    # without dropout soft_ptr is never written: scores stands in (not probs, so that no output is
    # passed twice to a kernel torch.compile sees mutate it); likewise for absent mask and seed
    wrap_triton(kernel)[(triton.cdiv(rows, bm),)](
        scores,
        scores if m is None else m,
        seed if drop else scores,
        probs,
        soft if drop else scores,
        rows,
        n,
        h,
        sq,
        msb,
        msh,
        msq,
        msk,
        float(scale),
        threshold,
        p_scale,
        HAS_MASK=has_mask,
        BOOL_MASK=bool_mask,
        DROPOUT=drop,
        GROUPED=n % 64 == 0,
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=num_warps,
    )
    return probs, soft


@define("fastbert::masked_softmax_bwd_triton", _fake_bwd)
def masked_softmax_bwd_triton(
    grad: torch.Tensor, softmax: torch.Tensor, scale: float, dropout_p: float, seed: Optional[torch.Tensor]
) -> torch.Tensor:
    _check_bwd(grad, softmax, scale, dropout_p, seed)
    grad, softmax = grad.contiguous(), softmax.contiguous()
    dscores = torch.empty_like(softmax)
    drop, threshold, p_scale = _dropout_args(dropout_p, seed)
    n = softmax.shape[-1]
    rows = softmax.numel() // n if n else 0
    if rows == 0:
        return dscores
    bm, bn, num_warps, streaming = block_config(n, drop)
    kernel = _softmax_bwd_stream_kernel if streaming else _softmax_bwd_kernel
    wrap_triton(kernel)[(triton.cdiv(rows, bm),)](
        grad,
        softmax,
        seed if drop else softmax,
        dscores,
        rows,
        n,
        float(scale),
        threshold,
        p_scale,
        DROPOUT=drop,
        GROUPED=n % 64 == 0,
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=num_warps,
    )
    return dscores


_library.register_autograd(
    "fastbert::masked_softmax_fwd_triton", torch.ops.fastbert.masked_softmax_bwd_triton.default, setup_context, backward
)


# ------------------------------------------------------------------------ ahead-of-time compile list


def _aot_specs():
    """The specialisations to compile ahead of time (fastbert/triton/aot.py), as the launchers produce
    them for contiguous, 16-byte-aligned tensors. BERT's Sk = 128 and 512 (one config each): every
    scores dtype, no mask / a Hugging Face ``[B, 1, 1, Sk]`` additive mask of the scores' dtype, with
    and without dropout, and the backward with and without dropout; a bool key-padding mask and a
    ``[B, 1, Sq, Sk]`` fp32 mask on bf16. Then where registers are tightest: the widest rows that
    fit, per-element counters (Sk % 64 != 0) and the streaming kernels. The mask's key stride is 1
    (Triton specialises an integer argument equal to 1 as a constant); the other strides are 0 or
    multiples of 16 for these shapes.
    """
    specs = []

    def add(*args):
        specs.append(aot_spec(*args))

    def fwd(n, s, mask, drop, sq=128, full_mask=False):
        bm, bn, nw, streaming = block_config(n, drop)
        kernel = _softmax_fwd_stream_kernel if streaming else _softmax_fwd_kernel
        mtype = {None: s, "bool": "u8"}.get(mask, mask)
        sig = {
            "s_ptr": f"*{s}",
            "m_ptr": f"*{mtype}",
            "seed_ptr": "*i64" if drop else f"*{s}",
            "probs_ptr": f"*{s}",
            "soft_ptr": f"*{s}",
            "rows": "i32",
            "n": "i32",
            "H": "i32",
            "Sq": "i32",
            "msb": "i32",
            "msh": "i32",
            "msq": "i32",
            "scale": "fp32",
            "threshold": "i32",
            "p_scale": "fp32",
        }
        div16 = ("s_ptr", "m_ptr", "seed_ptr", "probs_ptr", "soft_ptr") + (("n",) if n % 16 == 0 else ())
        div16 += ("Sq",) if sq % 16 == 0 else ()
        consts = dict(
            HAS_MASK=mask is not None,
            BOOL_MASK=mask == "bool",
            DROPOUT=drop,
            GROUPED=n % 64 == 0,
            BLOCK_M=bm,
            BLOCK_N=bn,
        )
        if mask is None:  # strides all 0
            sig["msk"] = "i32"
            div16 += ("msb", "msh", "msq", "msk")
        else:  # [B, 1, 1, Sk] or [B, 1, Sq, Sk] (msq = Sk, msb = Sq Sk): key stride 1, head stride 0
            consts["msk"] = 1
            div16 += ("msh",) + (("msb",) if n % 16 == 0 else ())
            div16 += ("msq",) if not full_mask or n % 16 == 0 else ()
        label = f"Sk={n},s={s},mask={mask}{'[B,1,Sq,Sk]' if full_mask else ''},{'dropout' if drop else 'no-dropout'}"
        add(kernel, label, sig, consts, nw, div16)

    def bwd(n, s, drop):
        bm, bn, nw, streaming = block_config(n, drop)
        kernel = _softmax_bwd_stream_kernel if streaming else _softmax_bwd_kernel
        sig = {
            "dy_ptr": f"*{s}",
            "soft_ptr": f"*{s}",
            "seed_ptr": "*i64" if drop else f"*{s}",
            "ds_ptr": f"*{s}",
            "rows": "i32",
            "n": "i32",
            "scale": "fp32",
            "threshold": "i32",
            "p_scale": "fp32",
        }
        div16 = ("dy_ptr", "soft_ptr", "seed_ptr", "ds_ptr") + (("n",) if n % 16 == 0 else ())
        add(
            kernel,
            f"Sk={n},s={s},{'dropout' if drop else 'no-dropout'}",
            sig,
            dict(DROPOUT=drop, GROUPED=n % 64 == 0, BLOCK_M=bm, BLOCK_N=bn),
            nw,
            div16,
        )

    for n in (128, 512):
        for s in ("fp32", "fp16", "bf16"):
            for drop in (False, True):
                fwd(n, s, None, drop)
                fwd(n, s, s, drop)
                bwd(n, s, drop)
        fwd(n, "fp16", "bool", True)
        fwd(n, "bf16", "fp32", True, full_mask=True)
    for s in ("fp32", "bf16"):
        fwd(_MAX_N, s, s, True)  # widest rows in registers (32 per thread)
        bwd(_MAX_N, s, True)
        fwd(_MAX_N // 2 - 1, s, s, True)  # per-element counters, widest
        bwd(_MAX_N // 2 - 1, s, True)
        for n in (4 * _MAX_N, 4 * _MAX_N - 1):  # streaming: grouped and per-element counters
            fwd(n, s, s, True)
            fwd(n, s, "bool", False)
            bwd(n, s, True)
        bwd(4 * _MAX_N, s, False)
    fwd(77, "fp16", "bool", True)  # short odd rows, per-element counters
    bwd(77, "fp16", True)
    return specs


AOT_SPECS = _aot_specs()
