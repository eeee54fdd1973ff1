"""Attention over packed sequences in Triton: ``fastbert::varlen_attention_fwd_triton`` / ``_bwd_triton``.

The kernels, their maths (forward, the fp32 exact-softmax backward, dropout) and pointer arguments are
in ``_varlen_attention_kernels.py``; this file holds the launch configuration, the two ops
(schemas as the C++ pair in fastbert/ops/varlen_attention.py) and the ahead-of-time compile list.
"""

from typing import Optional, Tuple

import torch
import triton
from torch._subclasses.fake_tensor import is_fake

from fastbert import philox
from fastbert.ops import _library
from fastbert.ops.varlen_attention import OP, backward, check_args, setup_context
from fastbert.ops.varlen_attention import _fake_bwd as _ops_fake_bwd
from fastbert.ops.varlen_attention import _fake_fwd as _ops_fake_fwd
from fastbert.triton._common import aot_spec, check_device, check_dtypes, define, wrap_triton
from fastbert.triton._varlen_attention_kernels import _varlen_bwd_dkdv_kernel, _varlen_bwd_dq_kernel, _varlen_fwd_kernel

# ----------------------------------------------------------------------------- launch configuration

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and storage class: BLOCK_M queries x BLOCK_N
# keys per score tile. Chosen so that BERT's head dim 64 compiles without spills for sm_80 and sm_90
# (python -m fastbert.triton.aot --filter varlen): the dk/dv pass holds two more [BLOCK_N, D]
# accumulators and transposes its [BLOCK_M, BLOCK_N] tiles, so it takes 32 keys (per-element Philox
# counters); fp32's FMA products need 8 warps in the backward.
_CONFIGS = {
    "half": {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (64, 32, 4, 2)},
    # fp32 fwd on 4 warps spilled on sm_90 with triton 3.6 (168 registers); 8 warps: ~80
    "fp32": {"fwd": (32, 32, 8, 1), "dq": (32, 32, 8, 1), "dkdv": (32, 32, 8, 1)},
}


def block_config(head_dim, dtype, kernel, dropout=False):
    """``(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)`` of ``kernel`` ("fwd", "dq" or "dkdv"):
    fp16/bf16 tiles use tensor-core products, fp32 tiles full-precision FMA products (more
    registers, smaller tiles); the head dimension is padded to a power of two (at least 16, the
    smallest ``tl.dot``)."""
    bd = max(16, triton.next_power_of_2(max(head_dim, 1)))
    bm, bn, nw, ns = _CONFIGS["fp32" if dtype in (torch.float32, "fp32") else "half"][kernel]
    if head_dim % 16:  # padded head dim (masked loads): half the query rows (full tiles spilled on sm_80)
        bm = max(16, bm // 2)  # (16: the smallest tl.dot)
        if kernel == "dq" and nw == 8 and dropout:  # fp32's fp64 Delta with dropout spilled 24 bytes on 8
            nw = 4  # warps (sm_90, head dim 24)
    elif bd == 16 and kernel == "dq" and bm == 32:  # fp32 dq at head dim 16 spilled 16 bytes (80 registers)
        bm = 16
    if dropout and bm == 64:  # the Philox rounds on top of the 64 x 64 half tiles spilled on sm_80 (triton 3.6)
        if kernel == "fwd":
            nw = 8
        elif kernel == "dq":  # and the Delta = rowsum(p dp) pass spilled 32 x 64 on 4 warps (8-16 bytes)
            bm, nw = 32, 8
    return bm, bn, bd, nw, ns


def exact_softmax(dtype):
    """fp32 rebuilds the probabilities as eager softmax rounds them, ``p = exp(s - m) * (1 / l)`` from
    each row's max ``m`` and sum ``l`` (recomputed in a first pass over the keys in the dq kernel):
    ``exp(s - lse)`` carries the rounding of the fp32 ``lse`` (an ulp of ``|lse|``) into every
    probability, several times eager's error in ``dq``. fp16/bf16 take flash-attention's
    ``exp(s - lse)``: their rounded ``p`` and ``dS`` products dominate. (Every dtype takes
    ``Delta = rowsum(p dp)`` in fp64: _varlen_attention_kernels.py.)"""
    return dtype in (torch.float32, "fp32")


def _grouped(max_seqlen, block_n):
    """One Philox counter per 4 elements needs whole 64-element groups in every key block."""
    return max_seqlen % 64 == 0 and block_n % 64 == 0


# ------------------------------------------------------------------------------------------- ops


def _check_seed(seed, q, op):
    if seed is not None and (
        not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != q.device
    ):
        raise ValueError(f"{OP} ({op}): seed must be an int64 tensor with one element on q's device")


def _check(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, op):
    if not is_fake(cu_seqlens):  # check_args reads a CPU cu_seqlens on the host: not a fake one
        check_args(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p)
    check_dtypes(f"{OP} ({op})", q=q)
    _check_seed(seed, q, op)
    check_device(q, f"{OP} ({op})")


def _check_bwd(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    _check(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, "triton backward")
    lse_shape = (q.shape[1], q.shape[0])
    for t, name, shape, dtype in (
        (grad, "grad", q.shape, q.dtype),
        (out, "out", q.shape, q.dtype),
        (lse, "lse", lse_shape, torch.float32),
    ):
        if t.shape != shape or t.dtype != dtype or t.device != q.device:
            raise ValueError(
                f"{OP} backward: {name} must be {dtype} of shape {list(shape)} on {q.device}, "
                f"got {t.dtype} of shape {list(t.shape)} on {t.device}"
            )


def _fake_fwd(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    _check(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, "triton forward")
    return _ops_fake_fwd(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed)


def _fake_bwd(*args):
    _check_bwd(*args)
    return _ops_fake_bwd(*args)


def _unit_last(t):
    """``t`` with element stride 1 (views of a packed QKV already have it): the kernels take only the
    token and head strides."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _launch_args(q, k, v, max_seqlen, dropout_p, seed):
    """(DROPOUT, the q/k/v token and head strides, threshold, p_scale) of every launch."""
    drop = seed is not None and dropout_p > 0
    strides = [st for t in (q, k, v) for st in (t.stride(0), t.stride(1))]
    threshold, p_scale = (philox.threshold(dropout_p), philox.scale(dropout_p)) if drop else (0, 1.0)
    return drop, strides, threshold, p_scale


def _consts(q, kernel, drop, max_seqlen):
    """(grid rows per program, constexpr and launch keyword arguments) of ``kernel``."""
    bm, bn, bd, num_warps, num_stages = block_config(q.shape[2], q.dtype, kernel, drop)
    return (
        bn if kernel == "dkdv" else bm,
        dict(
            DROPOUT=drop,
            GROUPED=drop and _grouped(max_seqlen, bn),
            HEAD_DIM=q.shape[2],
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_D=bd,
            num_warps=num_warps,
            num_stages=num_stages,
        ),
    )


_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale, float dropout_p, "
    "Tensor? seed) -> (Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens, "
    "int max_seqlen, float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)"
)


@define("fastbert::varlen_attention_fwd_triton", _fake_fwd, schema=_FWD_SCHEMA)
def varlen_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, "triton forward")
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    t_all, heads, d = q.shape
    batch = cu_seqlens.shape[0] - 1
    if t_all == 0 or heads == 0 or batch <= 0 or max_seqlen == 0:  # no rows (a head dim of 0 launches:
        # its scores are 0, so lse = log(seqlen))
        return (
            torch.zeros(q.shape, dtype=q.dtype, device=q.device),
            torch.zeros((heads, t_all), dtype=torch.float32, device=q.device),
        )
    out = torch.empty((t_all, heads, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, t_all), dtype=torch.float32, device=q.device)
    drop, strides, threshold, p_scale = _launch_args(q, k, v, max_seqlen, dropout_p, seed)
    per, consts = _consts(q, "fwd", drop, max_seqlen)
    wrap_triton(_varlen_fwd_kernel)[(triton.cdiv(max_seqlen, per), heads, batch)](
        q,
        k,
        v,
        cu_seqlens,
        seed if drop else cu_seqlens,
        out,
        lse,
        *strides,
        t_all,
        heads,
        max_seqlen,
        float(scale),
        threshold,
        p_scale,
        **consts,
    )
    return out, lse


@define("fastbert::varlen_attention_bwd_triton", _fake_bwd, schema=_BWD_SCHEMA)
def varlen_attention_bwd_triton(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_bwd(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dropout_p, seed)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    grad, lse = grad.contiguous(), lse.contiguous()  # out: checked, not read (Delta = rowsum(p dp))
    t_all, heads, d = q.shape
    batch = cu_seqlens.shape[0] - 1
    if t_all == 0 or heads == 0 or batch <= 0 or max_seqlen == 0 or d == 0:
        z = [torch.zeros(q.shape, dtype=q.dtype, device=q.device) for _ in range(3)]
        return z[0], z[1], z[2]
    dq = torch.empty((t_all, heads, d), dtype=q.dtype, device=q.device)
    dk, dv = torch.empty_like(dq), torch.empty_like(dq)
    exact = exact_softmax(q.dtype)
    # fp32 [heads, T] workspaces: Delta, and (exact softmax only) each row's max score m and 1 / l
    delta = torch.empty((heads, t_all), dtype=torch.float32, device=q.device)
    m, inv_l = (torch.empty_like(delta), torch.empty_like(delta)) if exact else (lse, lse)  # lse: never read
    drop, strides, threshold, p_scale = _launch_args(q, k, v, max_seqlen, dropout_p, seed)
    seed_arg = seed if drop else cu_seqlens
    per, consts = _consts(q, "dq", drop, max_seqlen)
    wrap_triton(_varlen_bwd_dq_kernel)[(triton.cdiv(max_seqlen, per), heads, batch)](
        q,
        k,
        v,
        grad,
        lse,
        cu_seqlens,
        seed_arg,
        dq,
        delta,
        m,
        inv_l,
        *strides,
        t_all,
        heads,
        max_seqlen,
        float(scale),
        threshold,
        p_scale,
        EXACT_SOFTMAX=exact,
        **consts,
    )
    per, consts = _consts(q, "dkdv", drop, max_seqlen)
    wrap_triton(_varlen_bwd_dkdv_kernel)[(triton.cdiv(max_seqlen, per), heads, batch)](
        q,
        k,
        v,
        grad,
        lse,
        delta,
        m,
        inv_l,
        cu_seqlens,
        seed_arg,
        dk,
        dv,
        *strides,
        t_all,
        heads,
        max_seqlen,
        float(scale),
        threshold,
        p_scale,
        EXACT_SOFTMAX=exact,
        **consts,
    )
    return dq, dk, dv


_library.register_autograd(
    "fastbert::varlen_attention_fwd_triton",
    torch.ops.fastbert.varlen_attention_bwd_triton.default,
    setup_context,
    backward,
)


# ------------------------------------------------------------------------ ahead-of-time compile list


def _aot_specs():
    """BERT-base (12 heads, head dim 64) with q, k, v views of a packed ``[T, 3, 12, 64]`` QKV (token
    stride 2304, head stride 64), as the launchers produce them: every dtype, without dropout, with
    dropout at an odd ``max_seqlen`` (per-element counters) and at ``max_seqlen = 128`` where the
    kernel's key blocks then take grouped counters. ``T`` (the packed token count) and an odd
    ``max_seqlen`` are not multiples of 16; ``cu_seqlens`` and the seed are 16-aligned."""
    specs = []
    heads, d = 12, 64
    names = {_varlen_fwd_kernel: "fwd", _varlen_bwd_dq_kernel: "dq", _varlen_bwd_dkdv_kernel: "dkdv"}

    def add(kernel, s, drop, max_seqlen, extra_sig, extra_ptrs):
        bm, bn, bd, nw, ns = block_config(d, s, names[kernel], drop)
        grouped = drop and _grouped(max_seqlen, bn)
        if drop and max_seqlen % 64 == 0 and not grouped:
            return  # the same code as the odd max_seqlen's
        sig = {"q_ptr": f"*{s}", "k_ptr": f"*{s}", "v_ptr": f"*{s}"}
        # without dropout cu_seqlens stands in for the seed
        sig.update(extra_sig, cu_ptr="*i32", seed_ptr="*i64" if drop else "*i32")
        sig.update(
            {
                "sq_t": "i32",
                "sq_h": "i32",
                "sk_t": "i32",
                "sk_h": "i32",
                "sv_t": "i32",
                "sv_h": "i32",
                "T": "i32",
                "H": "i32",
                "max_seqlen": "i32",
            }
        )
        sig.update({"scale": "fp32", "threshold": "i32", "p_scale": "fp32"})
        div16 = (
            ("q_ptr", "k_ptr", "v_ptr", "cu_ptr", "seed_ptr", "sq_t", "sq_h", "sk_t", "sk_h", "sv_t", "sv_h")
            + tuple(extra_ptrs)
            + (("max_seqlen",) if max_seqlen % 16 == 0 else ())
        )
        label = (
            f"H={heads},D={d},max_seqlen={max_seqlen},{s},{'dropout' if drop else 'no-dropout'}"
            f"{',grouped' if grouped else ''}"
        )
        consts = dict(DROPOUT=drop, GROUPED=grouped, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        if kernel is not _varlen_fwd_kernel:
            consts["EXACT_SOFTMAX"] = exact_softmax(s)
        spec = aot_spec(kernel, label, sig, consts, nw, div16)
        spec["num_stages"] = ns
        specs.append(spec)

    for s in ("fp32", "fp16", "bf16"):
        for drop, max_seqlen in ((False, 128), (True, 77), (True, 128)):
            add(
                _varlen_fwd_kernel,
                s,
                drop,
                max_seqlen,
                {"out_ptr": f"*{s}", "lse_ptr": "*fp32"},
                ("out_ptr", "lse_ptr"),
            )
            add(
                _varlen_bwd_dq_kernel,
                s,
                drop,
                max_seqlen,
                {
                    "do_ptr": f"*{s}",
                    "lse_ptr": "*fp32",
                    "dq_ptr": f"*{s}",
                    "delta_ptr": "*fp32",
                    "m_ptr": "*fp32",
                    "il_ptr": "*fp32",
                },
                ("do_ptr", "lse_ptr", "dq_ptr", "delta_ptr", "m_ptr", "il_ptr"),
            )
            add(
                _varlen_bwd_dkdv_kernel,
                s,
                drop,
                max_seqlen,
                {
                    "do_ptr": f"*{s}",
                    "lse_ptr": "*fp32",
                    "delta_ptr": "*fp32",
                    "m_ptr": "*fp32",
                    "il_ptr": "*fp32",
                    "dk_ptr": f"*{s}",
                    "dv_ptr": f"*{s}",
                },
                ("do_ptr", "lse_ptr", "delta_ptr", "m_ptr", "il_ptr", "dk_ptr", "dv_ptr"),
            )
    return specs


AOT_SPECS = _aot_specs()
