"""The Triton kernels of masked_softmax (launchers, ops and AOT specs: masked_softmax.py).

Maths and layouts are described there; pointer arguments are commented per kernel. Rows are the
``rows = B * H * Sq`` rows of the contiguous ``[B, H, Sq, Sk]`` scores, ``n = Sk``; row ``r`` is
``(b, h, q) = (r // (H Sq), (r // Sq) % H, r % Sq)``, which addresses the mask through its four
element strides (0 for a broadcast dimension, so the broadcast is never materialised).
"""

import triton
import triton.language as tl

from fastbert.triton._common import for_store, philox_keep


@triton.jit
def _offsets(r, c, n):
    """int64 element offsets (rows * n may pass 2^31) of rows ``r`` x columns ``c`` of the contiguous
    scores/outputs. Kernels compute the offsets they store through with this, not from a helper that
    also takes pointers: torch.compile's mutation analysis takes every pointer argument of a helper
    whose result addresses a store as written (and then copies those inputs before each launch)."""
    return r.to(tl.int64)[:, None] * n + c[None, :]


@triton.jit
def _logits(
    s_ptr, m_ptr, r, rmask, c, n, H, Sq, msb, msh, msq, msk, scale, HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr
):
    """``(x, inb)`` for rows ``r`` [BLOCK_M] x columns ``c`` [BLOCK_N]: fp32
    ``x = s * scale + mask`` (bool mask: ``-inf`` where False), ``-inf`` outside the tensor; ``inb``
    the in-bounds mask."""
    inb = rmask[:, None] & (c < n)[None, :]
    offs = _offsets(r, c, n)
    x = tl.load(s_ptr + offs, mask=inb, other=0.0).to(tl.float32) * scale
    if HAS_MASK:
        bh = r // Sq
        moff = (bh // H).to(tl.int64) * msb + (bh % H).to(tl.int64) * msh + (r % Sq).to(tl.int64) * msq
        m = tl.load(m_ptr + (moff[:, None] + c.to(tl.int64)[None, :] * msk), mask=inb, other=0)
        if BOOL_MASK:  # uint8 view of a bool mask: nonzero = attend
            inb_k = inb & (m != 0)
            x = tl.where(inb_k, x, float("-inf"))
        else:  # additive, any float dtype, added in fp32 (finfo(fp16).min cannot overflow)
            x = tl.where(inb, x + m.to(tl.float32), float("-inf"))
    else:
        x = tl.where(inb, x, float("-inf"))
    return x, inb


@triton.jit
def _finite_max(mx):
    """The row max with ``-inf`` (every key excluded) replaced by 0: ``exp(x - max)`` is then 0 on
    such rows instead of NaN, and their sums are 0."""
    return tl.where(mx == float("-inf"), 0.0, mx)


@triton.jit
def _recip(total):
    """1 / total, rounded to nearest; 1 for an all-zero (fully masked) row, whose output is 0."""
    return tl.div_rn(1.0, tl.where(total == 0.0, 1.0, total))


@triton.jit
def _softmax_fwd_kernel(
    s_ptr,  # [rows, n] contiguous scores, fp32/fp16/bf16
    m_ptr,  # mask (strided, broadcast): uint8 (bool view) or any float; not read unless HAS_MASK
    seed_ptr,  # [1] int64 Philox seed; not read unless DROPOUT
    probs_ptr,  # [rows, n] contiguous, scores' dtype (output): dropout(p)
    soft_ptr,  # [rows, n] contiguous, scores' dtype (output, DROPOUT only): p before dropout
    rows,
    n,
    H,
    Sq,
    msb,
    msh,
    msq,
    msk,  # mask element strides for b, h, q, key (0 for size-1 dimensions)
    scale,  # multiplies the scores before the mask is added
    threshold,
    p_scale,  # dropout: philox.threshold(p) (int), philox.scale(p) (fp32)
    HAS_MASK: tl.constexpr,
    BOOL_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # BLOCK_N >= n: whole rows in registers
):
    # program pid: rows [pid*BLOCK_M, +BLOCK_M), each row whole in registers
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < rows
    c = tl.arange(0, BLOCK_N)
    x, inb = _logits(s_ptr, m_ptr, r, rmask, c, n, H, Sq, msb, msh, msq, msk, scale, HAS_MASK, BOOL_MASK)
    offs = _offsets(r, c, n)
    mx = _finite_max(tl.max(x, 1))
    e = tl.exp(x - mx[:, None])
    p = e * _recip(tl.sum(e, 1))[:, None]
    if DROPOUT:
        tl.store(soft_ptr + offs, for_store(p, soft_ptr), mask=inb)
        keep = philox_keep(seed_ptr, r.to(tl.int64), 0, n, threshold, GROUPED, BLOCK_M, BLOCK_N)
        p = tl.where(keep, p * p_scale, 0.0)
    tl.store(probs_ptr + offs, for_store(p, probs_ptr), mask=inb)


@triton.jit
def _softmax_fwd_stream_kernel(
    s_ptr,
    m_ptr,
    seed_ptr,
    probs_ptr,
    soft_ptr,  # as _softmax_fwd_kernel
    rows,
    n,
    H,
    Sq,
    msb,
    msh,
    msq,
    msk,
    scale,
    threshold,
    p_scale,
    HAS_MASK: tl.constexpr,
    BOOL_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # rows longer than a block: chunks of BLOCK_N
):
    # program pid: rows [pid*BLOCK_M, +BLOCK_M), streamed in two passes over column chunks
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < rows
    # pass 1: online max and sum, lsum = sum exp(x - m), rescaled by exp(m_old - m_new) as m grows
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for col0 in range(0, n, BLOCK_N):
        c = col0 + tl.arange(0, BLOCK_N)
        x, inb = _logits(s_ptr, m_ptr, r, rmask, c, n, H, Sq, msb, msh, msq, msk, scale, HAS_MASK, BOOL_MASK)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = _finite_max(m_new)  # all -inf so far: lsum stays 0 (exp(-inf - 0) = 0)
        lsum = lsum * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
        m = m_new
    m = _finite_max(m)
    inv = _recip(lsum)
    r64 = r.to(tl.int64)
    # pass 2: recompute x chunk by chunk and write the normalised (and dropped-out) output
    for col0 in range(0, n, BLOCK_N):
        c = col0 + tl.arange(0, BLOCK_N)
        x, inb = _logits(s_ptr, m_ptr, r, rmask, c, n, H, Sq, msb, msh, msq, msk, scale, HAS_MASK, BOOL_MASK)
        offs = _offsets(r, c, n)
        p = tl.exp(x - m[:, None]) * inv[:, None]
        if DROPOUT:
            tl.store(soft_ptr + offs, for_store(p, soft_ptr), mask=inb)
            keep = philox_keep(seed_ptr, r64, col0, n, threshold, GROUPED, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p * p_scale, 0.0)
        tl.store(probs_ptr + offs, for_store(p, probs_ptr), mask=inb)


@triton.jit
def _grad_tile(
    dy_ptr,
    soft_ptr,
    seed_ptr,
    r,
    rmask,
    col0,
    n,
    threshold,
    p_scale,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``(g, p, inb)`` for rows ``r`` x columns ``col0 + [0, BLOCK_N)``: fp32 softmax ``p`` and
    ``g`` = the kept incoming gradient (``keep ? dy : 0``; the caller multiplies by ``p_scale``
    once, on ``p``: ``dy p_scale`` overflows fp32 for |dy| near the largest bf16/fp32 values, where
    the exact result is finite), 0 outside; ``inb`` the in-bounds mask."""
    c = col0 + tl.arange(0, BLOCK_N)
    inb = rmask[:, None] & (c < n)[None, :]
    r64 = r.to(tl.int64)
    offs = _offsets(r, c, n)
    p = tl.load(soft_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = philox_keep(seed_ptr, r64, col0, n, threshold, GROUPED, BLOCK_M, BLOCK_N)
        g = tl.where(keep, g, 0.0)
    return g, p, inb


@triton.jit
def _softmax_bwd_kernel(
    dy_ptr,  # [rows, n] contiguous, softmax's dtype: incoming gradient of probs
    soft_ptr,  # [rows, n] contiguous, fp32/fp16/bf16: p, the softmax before dropout (saved)
    seed_ptr,  # [1] int64; not read unless DROPOUT
    ds_ptr,  # [rows, n] contiguous, softmax's dtype (output): dscores
    rows,
    n,
    scale,
    threshold,
    p_scale,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # BLOCK_N >= n: whole rows in registers
):
    # dscores = scale * p * (g' - sum_row(g' p)) with g' = g p_scale (dropout's backward): the softmax
    # Jacobian-vector product, times the derivative of x = s * scale + mask with respect to s;
    # computed as (p p_scale) (g - sum_row(g p)) scale (p_scale is 1.0 without dropout)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g, p, inb = _grad_tile(
        dy_ptr, soft_ptr, seed_ptr, r, r < rows, 0, n, threshold, p_scale, DROPOUT, GROUPED, BLOCK_M, BLOCK_N
    )
    dot = tl.sum(g * p, 1)
    ds = p * p_scale * (g - dot[:, None]) * scale
    tl.store(ds_ptr + _offsets(r, tl.arange(0, BLOCK_N), n), for_store(ds, ds_ptr), mask=inb)


@triton.jit
def _softmax_bwd_stream_kernel(
    dy_ptr,
    soft_ptr,
    seed_ptr,
    ds_ptr,  # as _softmax_bwd_kernel
    rows,
    n,
    scale,
    threshold,
    p_scale,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # rows longer than a block: chunks of BLOCK_N
):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < rows
    # pass 1: sum_row(g p), accumulated per lane and reduced once
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for col0 in range(0, n, BLOCK_N):
        g, p, inb = _grad_tile(
            dy_ptr, soft_ptr, seed_ptr, r, rmask, col0, n, threshold, p_scale, DROPOUT, GROUPED, BLOCK_M, BLOCK_N
        )
        acc += g * p
    dot = tl.sum(acc, 1)
    # pass 2: reload (and regenerate the dropout mask) and write dscores
    for col0 in range(0, n, BLOCK_N):
        g, p, inb = _grad_tile(
            dy_ptr, soft_ptr, seed_ptr, r, rmask, col0, n, threshold, p_scale, DROPOUT, GROUPED, BLOCK_M, BLOCK_N
        )
        ds = p * p_scale * (g - dot[:, None]) * scale
        tl.store(ds_ptr + _offsets(r, col0 + tl.arange(0, BLOCK_N), n), for_store(ds, ds_ptr), mask=inb)
