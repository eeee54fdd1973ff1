"""Attention over packed sequences in Triton: ``fastbert::varlen_attention_fwd_triton`` / ``_bwd_triton``.

Flash-attention-2 style (maths and layouts: fastbert/ops/varlen_attention.py). ``q, k, v`` are
``[T, heads, D]`` read through their token and head strides (element stride 1, e.g. views of a
packed ``[T, 3, heads, D]``); sequence ``b`` is rows ``cu_seqlens[b] : cu_seqlens[b + 1]``. Every
program handles one (block of rows, head, sequence): it reads its sequence's start and end from
``cu_seqlens`` and returns at once when its block starts past the end, so the grid
``(cdiv(max_seqlen, BLOCK), heads, batch)`` needs no host read of the lengths.

Forward (``_varlen_fwd_kernel``, a block of ``BLOCK_M`` queries): loops over the key blocks of the
sequence with an online softmax of ``s = q k^T * scale``: ``m`` the running max, ``l`` the running
sum of ``exp(s - m)`` (before dropout: it normalises the probabilities), ``acc`` the running
``sum_j keep_j exp(s_j - m) v_j``, both rescaled by ``exp(m_old - m_new)`` when the max grows. Then
``out = acc * p_scale / l`` and ``lse = m + log l``. Exponentials take differences in natural units
(``exp(s - m)``, which a GPU evaluates as ``ex2(log2(e) (s - m))``), so that their rounding error is
eager softmax's; pre-scaling the scores to base 2 would add the rounding of large scores. Every pass
computes the scores in the same orientation, ``q k^T`` (``k q^T`` rounds differently), so that the
backward's ``p`` is consistent with the forward's ``lse``.

Backward, with ``p`` the softmax, ``P = keep ? p * p_scale : 0`` (the dropped probabilities),
``dP = dO v^T``, ``dp = keep ? dP * p_scale : 0`` and ``Delta_i = sum_d dO_i O_i = sum_j p_ij dp_ij``:
``dS = p (dp - Delta)``, ``dq = scale dS k``, ``dk = scale dS^T q``, ``dv = P^T dO``. fp16/bf16 rebuild
``p = exp(s - lse)`` from the forward's ``lse`` and take ``Delta = rowsum(dO * O)``, as
flash-attention. fp32 (``exact_softmax``) rebuilds ``p = exp(s - m) * (1 / l)`` from each row's max
``m`` and sum ``l`` of ``exp(s - m)``, recomputed, and takes ``Delta = rowsum(p dp)``: eager softmax's
roundings (``exp(s - lse)`` would carry the fp32 ``lse``'s rounding, an ulp of ``|lse|``, into every
probability, several times eager's error in ``dq``).

1. ``_varlen_bwd_dq_kernel`` (a block of queries, looping over the key blocks): for fp32 first ``m``
   and ``l`` of its rows (an online pass over the keys, as the forward) and ``Delta`` (a second pass),
   then ``dq``. ``Delta`` (and ``m``, ``1 / l``) go to fp32 ``[heads, T]`` workspaces.
2. ``_varlen_bwd_dkdv_kernel`` (a block of keys, looping over the query blocks, reading ``Delta`` and
   ``lse`` or ``m``, ``1 / l``): ``dk`` and ``dv``. No atomics: each output row is written by one program.

Matrix products take the storage dtype (the probabilities and ``dS`` are rounded to it, as
flash-attention does) and accumulate in fp32; fp32 inputs use full-precision (``ieee``) products,
never TF32, matching eager PyTorch's default.

Dropout: element (head ``h``, query row ``t``, key ``j`` of ``t``'s sequence) is element
``(h T + t) max_seqlen + j`` of the shared Philox stream: ``philox_keep`` (_common.py) with rows
``h T + t`` of a ``[heads T, max_seqlen]`` tensor; one counter per 4 elements when ``max_seqlen`` and
the key block are multiples of 64 (``GROUPED``), else one per element. The forward, the ``dq`` pass
and the ``dk``/``dv`` pass regenerate the same mask.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from fastbert import philox
from fastbert.ops import _library
from fastbert.ops.varlen_attention import _fake_bwd as _ops_fake_bwd
from fastbert.ops.varlen_attention import _fake_fwd as _ops_fake_fwd
from fastbert.ops.varlen_attention import OP, backward, check_args, setup_context
from fastbert.triton._common import INTERPRET, aot_spec, check_device, check_dtypes, define, for_store, philox_keep

# The interpreter's tl.dot multiplies bf16 operands as their raw uint16 bits (Triton 3.8); under it,
# bf16 operands are widened to fp32 first (exact: the same products a GPU's bf16 MMA accumulates).
_WIDEN_BF16_DOT = tl.constexpr(INTERPRET)


# ------------------------------------------------------------------------------------------ kernels

@triton.jit
def _dot(a, b, acc):
    """``acc + a @ b`` with fp32 accumulation; full-precision (never TF32) products of fp32."""
    if _WIDEN_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _varlen_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # [T, H, D] strided (token, head strides below; element stride 1)
    cu_ptr,     # [B + 1] int32 cumulative sequence lengths
    seed_ptr,   # [1] int64 Philox seed; not read unless DROPOUT
    out_ptr,    # [T, H, D] contiguous, q's dtype (output)
    lse_ptr,    # [H, T] fp32 (output): log-sum-exp of each query row's scaled scores
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,  # element strides of q, k, v: token, head
    T, H, max_seqlen,
    scale,      # multiplies q k^T
    threshold, p_scale,  # dropout: philox.threshold(p) (int), philox.scale(p) (fp32)
    DROPOUT: tl.constexpr, GROUPED: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_D >= HEAD_DIM
):
    # program (pid_m, h, b): query rows [pid_m*BLOCK_M, +BLOCK_M) of sequence b, head h
    h = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(cu_ptr + b)
    seqlen = tl.load(cu_ptr + b + 1) - start
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= seqlen:
        return
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    mrow = offs_m < seqlen
    t_m = (start + offs_m).to(tl.int64)  # packed rows (int64: row * stride may pass 2^31)
    qmask = mrow[:, None] & dmask[None, :]
    q = tl.load(q_ptr + (t_m[:, None] * sq_t + h64 * sq_h + offs_d[None, :]), mask=qmask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + offs_n
        ncol = cols < seqlen
        t_n = (start + cols).to(tl.int64)
        kvmask = ncol[:, None] & dmask[None, :]
        k = tl.load(k_ptr + (t_n[:, None] * sk_t + h64 * sk_h + offs_d[None, :]), mask=kvmask, other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * scale
        s = tl.where(ncol[None, :], s, float("-inf"))
        # rows past the end see q = 0 (scores 0): finite, never stored
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = philox_keep(seed_ptr, h64 * T + t_m, n0, max_seqlen, threshold, GROUPED, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        v = tl.load(v_ptr + (t_n[:, None] * sv_t + h64 * sv_h + offs_d[None, :]), mask=kvmask, other=0.0)
        acc = _dot(for_store(p, v_ptr), v, acc * alpha[:, None])
        m_i = m_new
    if DROPOUT:
        out = acc * (p_scale / l_i)[:, None]
    else:
        out = acc / l_i[:, None]
    tl.store(out_ptr + (t_m[:, None] * (H * HEAD_DIM) + h64 * HEAD_DIM + offs_d[None, :]),
             for_store(out, out_ptr), mask=qmask)
    tl.store(lse_ptr + (h64 * T + t_m), m_i + tl.log(l_i), mask=mrow)


@triton.jit
def _varlen_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr,  # [T, H, D] strided (token, head strides below; element stride 1)
    do_ptr, o_ptr,  # [T, H, D] contiguous: the output's gradient and the forward output
    lse_ptr,    # [H, T] fp32 log-sum-exp from the forward; not read when EXACT_SOFTMAX
    cu_ptr,     # [B + 1] int32 cumulative sequence lengths
    seed_ptr,   # [1] int64 Philox seed; not read unless DROPOUT
    dq_ptr,     # [T, H, D] contiguous, q's dtype (output)
    delta_ptr,  # [H, T] fp32 (output, read by _varlen_bwd_dkdv_kernel): Delta of each row
    m_ptr, il_ptr,  # [H, T] fp32 (outputs when EXACT_SOFTMAX, for _varlen_bwd_dkdv_kernel): each row's
                    # max score m and 1 / l, l the sum of exp(s - m); not written otherwise
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    T, H, max_seqlen,
    scale,      # multiplies q k^T (and dS for dq)
    threshold, p_scale,
    DROPOUT: tl.constexpr, GROUPED: tl.constexpr, HEAD_DIM: tl.constexpr,
    EXACT_SOFTMAX: tl.constexpr,  # p = exp(s - m) / l from recomputed row statistics, Delta = rowsum(p dp)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # program (pid_m, h, b): query rows [pid_m*BLOCK_M, +BLOCK_M) of sequence b, head h
    h = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(cu_ptr + b)
    seqlen = tl.load(cu_ptr + b + 1) - start
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= seqlen:
        return
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    mrow = offs_m < seqlen
    t_m = (start + offs_m).to(tl.int64)
    qmask = mrow[:, None] & dmask[None, :]
    offs_c = t_m[:, None] * (H * HEAD_DIM) + h64 * HEAD_DIM + offs_d[None, :]  # contiguous [T, H, D]
    do = tl.load(do_ptr + offs_c, mask=qmask, other=0.0)
    q = tl.load(q_ptr + (t_m[:, None] * sq_t + h64 * sq_h + offs_d[None, :]), mask=qmask, other=0.0)
    if EXACT_SOFTMAX:
        # 1. the row statistics, online as the forward computes them: m the max score, l the sum of
        # exp(s - m). p = exp(s - m) * (1 / l) then rounds as eager softmax does (no fp32 lse, whose
        # rounding, an ulp of |lse|, would scale every probability of the row).
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, seqlen, BLOCK_N):
            cols = n0 + offs_n
            ncol = cols < seqlen
            t_n = (start + cols).to(tl.int64)
            kvmask = ncol[:, None] & dmask[None, :]
            k = tl.load(k_ptr + (t_n[:, None] * sk_t + h64 * sk_h + offs_d[None, :]), mask=kvmask, other=0.0)
            s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * scale
            s = tl.where(ncol[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
        inv_l = 1.0 / l_i
        tl.store(m_ptr + (h64 * T + t_m), m_i, mask=mrow)
        tl.store(il_ptr + (h64 * T + t_m), inv_l, mask=mrow)
        # 2. Delta = rowsum(p dp): the dp it cancels against in dS (exactly 0 for a one-token row)
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, seqlen, BLOCK_N):
            cols = n0 + offs_n
            ncol = cols < seqlen
            t_n = (start + cols).to(tl.int64)
            kvmask = ncol[:, None] & dmask[None, :]
            k = tl.load(k_ptr + (t_n[:, None] * sk_t + h64 * sk_h + offs_d[None, :]), mask=kvmask, other=0.0)
            v = tl.load(v_ptr + (t_n[:, None] * sv_t + h64 * sv_h + offs_d[None, :]), mask=kvmask, other=0.0)
            s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * scale
            p = tl.where(ncol[None, :], tl.exp(s - m_i[:, None]) * inv_l[:, None], 0.0)
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
            if DROPOUT:
                keep = philox_keep(seed_ptr, h64 * T + t_m, n0, max_seqlen, threshold, GROUPED, BLOCK_M,
                                   BLOCK_N)
                dp = tl.where(keep, dp * p_scale, 0.0)
            delta += tl.sum(p * dp, 1)
    else:  # p = exp(s - lse), Delta = rowsum(dO * O) (flash-attention's: no extra pass)
        m_i = tl.load(lse_ptr + (h64 * T + t_m), mask=mrow, other=0.0)
        o = tl.load(o_ptr + offs_c, mask=qmask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(delta_ptr + (h64 * T + t_m), delta, mask=mrow)
    # 3. dq = scale sum_j dS_ij k_j
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + offs_n
        ncol = cols < seqlen
        t_n = (start + cols).to(tl.int64)
        kvmask = ncol[:, None] & dmask[None, :]
        k = tl.load(k_ptr + (t_n[:, None] * sk_t + h64 * sk_h + offs_d[None, :]), mask=kvmask, other=0.0)
        v = tl.load(v_ptr + (t_n[:, None] * sv_t + h64 * sv_h + offs_d[None, :]), mask=kvmask, other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * scale
        if EXACT_SOFTMAX:
            p = tl.where(ncol[None, :], tl.exp(s - m_i[:, None]) * inv_l[:, None], 0.0)
        else:
            p = tl.where(ncol[None, :], tl.exp(s - m_i[:, None]), 0.0)  # m_i holds lse here
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        if DROPOUT:
            keep = philox_keep(seed_ptr, h64 * T + t_m, n0, max_seqlen, threshold, GROUPED, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * p_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(for_store(ds, k_ptr), k, dq)
    tl.store(dq_ptr + offs_c, for_store(dq * scale, dq_ptr), mask=qmask)


@triton.jit
def _varlen_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr,  # [T, H, D] strided (token, head strides below; element stride 1)
    do_ptr,     # [T, H, D] contiguous: the output's gradient
    lse_ptr,    # [H, T] fp32 log-sum-exp from the forward; not read when EXACT_SOFTMAX
    delta_ptr,  # [H, T] fp32 Delta from _varlen_bwd_dq_kernel
    m_ptr, il_ptr,  # [H, T] fp32 row max m and 1 / l from _varlen_bwd_dq_kernel; read only when EXACT_SOFTMAX
    cu_ptr,     # [B + 1] int32 cumulative sequence lengths
    seed_ptr,   # [1] int64 Philox seed; not read unless DROPOUT
    dk_ptr, dv_ptr,  # [T, H, D] contiguous, q's dtype (outputs)
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    T, H, max_seqlen,
    scale, threshold, p_scale,
    DROPOUT: tl.constexpr, GROUPED: tl.constexpr, HEAD_DIM: tl.constexpr,
    EXACT_SOFTMAX: tl.constexpr,  # p = exp(s - m) * (1 / l), as the dq kernel; else exp(s - lse)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # program (pid_n, h, b): key rows [pid_n*BLOCK_N, +BLOCK_N) of sequence b, head h, looping over
    # blocks of BLOCK_M queries
    h = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(cu_ptr + b)
    seqlen = tl.load(cu_ptr + b + 1) - start
    n0 = tl.program_id(0) * BLOCK_N
    if n0 >= seqlen:
        return
    h64 = h.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    ncol = offs_n < seqlen
    t_n = (start + offs_n).to(tl.int64)
    kvmask = ncol[:, None] & dmask[None, :]
    k = tl.load(k_ptr + (t_n[:, None] * sk_t + h64 * sk_h + offs_d[None, :]), mask=kvmask, other=0.0)
    v = tl.load(v_ptr + (t_n[:, None] * sv_t + h64 * sv_h + offs_d[None, :]), mask=kvmask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, seqlen, BLOCK_M):
        rows = m0 + offs_m
        mrow = rows < seqlen
        t_m = (start + rows).to(tl.int64)
        qmask = mrow[:, None] & dmask[None, :]
        q = tl.load(q_ptr + (t_m[:, None] * sq_t + h64 * sq_h + offs_d[None, :]), mask=qmask, other=0.0)
        do = tl.load(do_ptr + (t_m[:, None] * (H * HEAD_DIM) + h64 * HEAD_DIM + offs_d[None, :]),
                     mask=qmask, other=0.0)
        if EXACT_SOFTMAX:
            m_i = tl.load(m_ptr + (h64 * T + t_m), mask=mrow, other=0.0)
            inv_l = tl.load(il_ptr + (h64 * T + t_m), mask=mrow, other=0.0)
        else:
            m_i = tl.load(lse_ptr + (h64 * T + t_m), mask=mrow, other=0.0)  # lse: p = exp(s - lse)
        delta = tl.load(delta_ptr + (h64 * T + t_m), mask=mrow, other=0.0)
        # score tiles [BLOCK_M queries, BLOCK_N keys], computed as the forward and the dq pass
        # compute them (q k^T, not k q^T: the same roundings, so p is consistent with lse / m, l)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * scale
        p = tl.exp(s - m_i[:, None])
        if EXACT_SOFTMAX:
            p = p * inv_l[:, None]
        p = tl.where(mrow[:, None] & ncol[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        if DROPOUT:
            keep = philox_keep(seed_ptr, h64 * T + t_m, n0, max_seqlen, threshold, GROUPED, BLOCK_M, BLOCK_N)
            pd = tl.where(keep, p * p_scale, 0.0)
            dp = tl.where(keep, dp * p_scale, 0.0)
        else:
            pd = p
        dv = _dot(tl.trans(for_store(pd, do_ptr)), do, dv)
        ds = p * (dp - delta[:, None])
        dk = _dot(tl.trans(for_store(ds, q_ptr)), q, dk)
    offs_c = t_n[:, None] * (H * HEAD_DIM) + h64 * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + offs_c, for_store(dk * scale, dk_ptr), mask=kvmask)
    tl.store(dv_ptr + offs_c, for_store(dv, dv_ptr), mask=kvmask)


# ----------------------------------------------------------------------------- launch configuration

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and storage class: BLOCK_M queries x BLOCK_N
# keys per score tile. Chosen so that BERT's head dim 64 compiles without spills for sm_80 and sm_90
# (python -m fastbert.triton.aot --filter varlen): the dk/dv pass holds two more [BLOCK_N, D]
# accumulators and transposes its [BLOCK_M, BLOCK_N] tiles, so it takes 32 keys (per-element Philox
# counters); fp32's FMA products need 8 warps in the backward.
_CONFIGS = {
    "half": {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (64, 32, 4, 2)},
    "fp32": {"fwd": (32, 32, 4, 1), "dq": (32, 32, 8, 1), "dkdv": (32, 32, 8, 1)},
}


def block_config(head_dim, dtype, kernel):
    """``(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)`` of ``kernel`` ("fwd", "dq" or "dkdv"):
    fp16/bf16 tiles use tensor-core products, fp32 tiles full-precision FMA products (more
    registers, smaller tiles); the head dimension is padded to a power of two (at least 16, the
    smallest ``tl.dot``)."""
    bd = max(16, triton.next_power_of_2(max(head_dim, 1)))
    bm, bn, nw, ns = _CONFIGS["fp32" if dtype in (torch.float32, "fp32") else "half"][kernel]
    return bm, bn, bd, nw, ns


def exact_softmax(dtype):
    """fp32 rebuilds the probabilities as eager softmax rounds them, ``p = exp(s - m) * (1 / l)`` from
    each row's max ``m`` and sum ``l`` (recomputed in a first pass over the keys in the dq kernel):
    ``exp(s - lse)`` carries the rounding of the fp32 ``lse`` (an ulp of ``|lse|``) into every
    probability, several times eager's error in ``dq``. It also takes ``Delta = rowsum(p dp)`` (a second
    pass): ``dS = p (dp - Delta)`` cancels, and ``rowsum(dO * O)`` rounds apart from the ``dp`` it
    cancels against by more than eager's softmax backward (exactly 0 for a one-token sequence there).
    fp16/bf16 take flash-attention's ``exp(s - lse)`` and ``rowsum(dO * O)``: their rounded ``p`` and
    ``dS`` products dominate."""
    return dtype in (torch.float32, "fp32")


def _grouped(max_seqlen, block_n):
    """One Philox counter per 4 elements needs whole 64-element groups in every key block."""
    return max_seqlen % 64 == 0 and block_n % 64 == 0


# ------------------------------------------------------------------------------------------- ops

def _check_seed(seed, q, op):
    if seed is not None and (not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64
                             or seed.numel() != 1 or seed.device != q.device):
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
    for t, name, shape, dtype in ((grad, "grad", q.shape, q.dtype), (out, "out", q.shape, q.dtype),
                                  (lse, "lse", lse_shape, torch.float32)):
        if t.shape != shape or t.dtype != dtype or t.device != q.device:
            raise ValueError(f"{OP} backward: {name} must be {dtype} of shape {list(shape)} on {q.device}, "
                             f"got {t.dtype} of shape {list(t.shape)} on {t.device}")


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
    bm, bn, bd, num_warps, num_stages = block_config(q.shape[2], q.dtype, kernel)
    return (bn if kernel == "dkdv" else bm,
            dict(DROPOUT=drop, GROUPED=drop and _grouped(max_seqlen, bn), HEAD_DIM=q.shape[2],
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=num_warps, num_stages=num_stages))


_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale, float dropout_p, "
               "Tensor? seed) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens, "
               "int max_seqlen, float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)")


@define("fastbert::varlen_attention_fwd_triton", _fake_fwd, schema=_FWD_SCHEMA)
def varlen_attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                max_seqlen: int, scale: float, dropout_p: float, seed: Optional[torch.Tensor]
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, "triton forward")
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    t_all, heads, d = q.shape
    batch = cu_seqlens.shape[0] - 1
    if t_all == 0 or heads == 0 or batch <= 0 or max_seqlen == 0:  # no rows (a head dim of 0 launches:
        # its scores are 0, so lse = log(seqlen))
        return (torch.zeros(q.shape, dtype=q.dtype, device=q.device),
                torch.zeros((heads, t_all), dtype=torch.float32, device=q.device))
    out = torch.empty((t_all, heads, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, t_all), dtype=torch.float32, device=q.device)
    drop, strides, threshold, p_scale = _launch_args(q, k, v, max_seqlen, dropout_p, seed)
    per, consts = _consts(q, "fwd", drop, max_seqlen)
    wrap_triton(_varlen_fwd_kernel)[(triton.cdiv(max_seqlen, per), heads, batch)](
        q, k, v, cu_seqlens, seed if drop else cu_seqlens, out, lse, *strides, t_all, heads, max_seqlen,
        float(scale), threshold, p_scale, **consts)
    return out, lse


@define("fastbert::varlen_attention_bwd_triton", _fake_bwd, schema=_BWD_SCHEMA)
def varlen_attention_bwd_triton(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                scale: float, dropout_p: float, seed: Optional[torch.Tensor]
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_bwd(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dropout_p, seed)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    grad, out, lse = grad.contiguous(), out.contiguous(), lse.contiguous()
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
        q, k, v, grad, out, lse, cu_seqlens, seed_arg, dq, delta, m, inv_l, *strides, t_all, heads, max_seqlen,
        float(scale), threshold, p_scale, EXACT_SOFTMAX=exact, **consts)
    per, consts = _consts(q, "dkdv", drop, max_seqlen)
    wrap_triton(_varlen_bwd_dkdv_kernel)[(triton.cdiv(max_seqlen, per), heads, batch)](
        q, k, v, grad, lse, delta, m, inv_l, cu_seqlens, seed_arg, dk, dv, *strides, t_all, heads, max_seqlen,
        float(scale), threshold, p_scale, EXACT_SOFTMAX=exact, **consts)
    return dq, dk, dv


_library.register_autograd("fastbert::varlen_attention_fwd_triton",
                           torch.ops.fastbert.varlen_attention_bwd_triton.default, setup_context, backward)


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
        bm, bn, bd, nw, ns = block_config(d, s, names[kernel])
        grouped = drop and _grouped(max_seqlen, bn)
        if drop and max_seqlen % 64 == 0 and not grouped:
            return  # the same code as the odd max_seqlen's
        sig = {"q_ptr": f"*{s}", "k_ptr": f"*{s}", "v_ptr": f"*{s}"}
        # without dropout cu_seqlens stands in for the seed
        sig.update(extra_sig, cu_ptr="*i32", seed_ptr="*i64" if drop else "*i32")
        sig.update({"sq_t": "i32", "sq_h": "i32", "sk_t": "i32", "sk_h": "i32", "sv_t": "i32", "sv_h": "i32",
                    "T": "i32", "H": "i32", "max_seqlen": "i32"})
        sig.update({"scale": "fp32", "threshold": "i32", "p_scale": "fp32"})
        div16 = ("q_ptr", "k_ptr", "v_ptr", "cu_ptr", "seed_ptr", "sq_t", "sq_h", "sk_t", "sk_h", "sv_t",
                 "sv_h") + tuple(extra_ptrs) + (("max_seqlen",) if max_seqlen % 16 == 0 else ())
        label = (f"H={heads},D={d},max_seqlen={max_seqlen},{s},{'dropout' if drop else 'no-dropout'}"
                 f"{',grouped' if grouped else ''}")
        consts = dict(DROPOUT=drop, GROUPED=grouped, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        if kernel is not _varlen_fwd_kernel:
            consts["EXACT_SOFTMAX"] = exact_softmax(s)
        spec = aot_spec(kernel, label, sig, consts, nw, div16)
        spec["num_stages"] = ns
        specs.append(spec)

    for s in ("fp32", "fp16", "bf16"):
        for drop, max_seqlen in ((False, 128), (True, 77), (True, 128)):
            add(_varlen_fwd_kernel, s, drop, max_seqlen, {"out_ptr": f"*{s}", "lse_ptr": "*fp32"},
                ("out_ptr", "lse_ptr"))
            add(_varlen_bwd_dq_kernel, s, drop, max_seqlen,
                {"do_ptr": f"*{s}", "o_ptr": f"*{s}", "lse_ptr": "*fp32", "dq_ptr": f"*{s}", "delta_ptr": "*fp32",
                 "m_ptr": "*fp32", "il_ptr": "*fp32"},
                ("do_ptr", "o_ptr", "lse_ptr", "dq_ptr", "delta_ptr", "m_ptr", "il_ptr"))
            add(_varlen_bwd_dkdv_kernel, s, drop, max_seqlen,
                {"do_ptr": f"*{s}", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "m_ptr": "*fp32", "il_ptr": "*fp32",
                 "dk_ptr": f"*{s}", "dv_ptr": f"*{s}"},
                ("do_ptr", "lse_ptr", "delta_ptr", "m_ptr", "il_ptr", "dk_ptr", "dv_ptr"))
    return specs


AOT_SPECS = _aot_specs()
