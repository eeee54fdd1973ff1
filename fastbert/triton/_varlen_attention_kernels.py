"""The Triton kernels of varlen_attention (launchers, ops and AOT specs: varlen_attention.py).

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
``p = exp(s - lse)`` from the forward's ``lse``, as flash-attention. fp32 (``exact_softmax``)
rebuilds ``p = exp(s - m) * (1 / l)`` from each row's max ``m`` and sum ``l`` of ``exp(s - m)``,
recomputed: eager softmax's roundings (``exp(s - lse)`` would carry the fp32 ``lse``'s rounding, an
ulp of ``|lse|``, into every probability, several times eager's error in ``dq``). Every dtype takes
``Delta = rowsum(p dp)`` (a pass over the keys, fp64 products and sum), not flash-attention's
``rowsum(dO * O)``: the rounded ``O`` misses the ``dp`` that ``Delta`` cancels against by an ulp of
``|dO| |O|``, which is the whole of ``dS`` where the true ``dS`` is 0 (a one-token sequence).

1. ``_varlen_bwd_dq_kernel`` (a block of queries, looping over the key blocks): for fp32 first ``m``
   and ``l`` of its rows (an online pass over the keys, as the forward), then ``Delta`` (a pass), then
   ``dq``. ``Delta`` (and ``m``, ``1 / l``) go to fp32 ``[heads, T]`` workspaces.
2. ``_varlen_bwd_dkdv_kernel`` (a block of keys, looping over the query blocks, reading ``Delta`` and
   ``lse`` or ``m``, ``1 / l``): ``dk`` and ``dv``. No atomics: each output row is written by one program.

Matrix products take the storage dtype (the probabilities and ``dS`` are rounded to it, as
flash-attention does) and accumulate in fp32; fp32 inputs use full-precision (``ieee``) products,
never TF32, matching eager PyTorch's default.

Dropout: element (head ``h``, query row ``t``, key ``j`` of ``t``'s sequence) is element
``(h T + t) max_seqlen + j`` of the shared Philox stream: ``philox_keep`` (_common.py) with rows
``h T + t`` of a ``[heads T, max_seqlen]`` tensor; one counter per 4 elements when ``max_seqlen`` and
the key block are multiples of 64 (``GROUPED``), else two per 4 elements (key blocks of 64 or more) or
one per element. The forward, the ``dq`` pass
and the ``dk``/``dv`` pass regenerate the same mask.
"""

import triton
import triton.language as tl

from fastbert.triton._common import INTERPRET, for_store, philox_keep

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
def _query_rows(
    start, m0, seqlen, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    """The forward's and the dq pass's query block, rows ``m0 + [0, BLOCK_M)`` of the sequence at
    packed row ``start``: (offs_n, offs_d, dmask, mrow, t_m, qmask). No pointer goes in: Inductor's
    mutation analysis takes a pointer argument of a helper whose results address a store as written."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    mrow = offs_m < seqlen
    t_m = (start + offs_m).to(tl.int64)  # packed rows (int64: row * stride may pass 2^31)
    return offs_n, offs_d, dmask, mrow, t_m, mrow[:, None] & dmask[None, :]


@triton.jit
def _varlen_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,  # [T, H, D] strided (token, head strides below; element stride 1)
    cu_ptr,  # [B + 1] int32 cumulative sequence lengths
    seed_ptr,  # [1] int64 Philox seed; not read unless DROPOUT
    out_ptr,  # [T, H, D] contiguous, q's dtype (output)
    lse_ptr,  # [H, T] fp32 (output): log-sum-exp of each query row's scaled scores
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    sv_t,
    sv_h,  # element strides of q, k, v: token, head
    T,
    H,
    max_seqlen,
    scale,  # multiplies q k^T
    threshold,
    p_scale,  # dropout: philox.threshold(p) (int), philox.scale(p) (fp32)
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # BLOCK_D >= HEAD_DIM
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
    offs_n, offs_d, dmask, mrow, t_m, qmask = _query_rows(start, m0, seqlen, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    q = tl.load(q_ptr + (t_m[:, None] * sq_t + h64 * sq_h + offs_d[None, :]), mask=qmask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kept = tl.zeros([BLOCK_M], dtype=tl.int32)  # dropout: whether any key of the row is kept
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
            kept = tl.maximum(kept, tl.max((keep & ncol[None, :]).to(tl.int32), 1))
        v = tl.load(v_ptr + (t_n[:, None] * sv_t + h64 * sv_h + offs_d[None, :]), mask=kvmask, other=0.0)
        acc = _dot(for_store(p, v_ptr), v, acc * alpha[:, None])
        m_i = m_new
    if DROPOUT:
        # a row whose keys are all dropped is 0, as the select of every backend gives, also where its
        # probabilities are NaN (then acc and l are NaN)
        out = tl.where(kept[:, None] > 0, acc * (p_scale / l_i)[:, None], 0.0)
    else:
        out = acc / l_i[:, None]
    tl.store(
        out_ptr + (t_m[:, None] * (H * HEAD_DIM) + h64 * HEAD_DIM + offs_d[None, :]),
        for_store(out, out_ptr),
        mask=qmask,
    )
    tl.store(lse_ptr + (h64 * T + t_m), m_i + tl.log(l_i), mask=mrow)


@triton.jit
def _key_block(
    q,
    do,
    k_ptr,
    v_ptr,
    sk_t,
    sk_h,
    sv_t,
    sv_h,
    h64,
    start,
    seqlen,
    n0,
    offs_n,
    offs_d,
    dmask,
    m_i,
    inv_l,
    scale,
    seed_ptr,
    rows,
    max_seqlen,
    threshold,
    p_scale,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The dq kernel's key block ``n0``: (k, p, dp), ``p = exp(s - m) / l`` (``inv_l`` 1 with ``m``
    the lse) and ``dp = dO v^T`` after dropout's backward (a select). Its Delta pass and its dq pass
    take the same values. Only loads go through the pointers (nothing returned addresses a store)."""
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
        keep = philox_keep(seed_ptr, rows, n0, max_seqlen, threshold, GROUPED, BLOCK_M, BLOCK_N)
        dp = tl.where(keep, dp * p_scale, 0.0)
    return k, p, dp


@triton.jit
def _varlen_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,  # [T, H, D] strided (token, head strides below; element stride 1)
    do_ptr,  # [T, H, D] contiguous: the output's gradient
    lse_ptr,  # [H, T] fp32 log-sum-exp from the forward; not read when EXACT_SOFTMAX
    cu_ptr,  # [B + 1] int32 cumulative sequence lengths
    seed_ptr,  # [1] int64 Philox seed; not read unless DROPOUT
    dq_ptr,  # [T, H, D] contiguous, q's dtype (output)
    delta_ptr,  # [H, T] fp32 (output, read by _varlen_bwd_dkdv_kernel): Delta of each row
    m_ptr,
    il_ptr,  # [H, T] fp32 (outputs when EXACT_SOFTMAX, for _varlen_bwd_dkdv_kernel): each row's
    # max score m and 1 / l, l the sum of exp(s - m); not written otherwise
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    sv_t,
    sv_h,
    T,
    H,
    max_seqlen,
    scale,  # multiplies q k^T (and dS for dq)
    threshold,
    p_scale,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    EXACT_SOFTMAX: tl.constexpr,  # p = exp(s - m) / l from recomputed row statistics, Delta = rowsum(p dp)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
    offs_n, offs_d, dmask, mrow, t_m, qmask = _query_rows(start, m0, seqlen, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    q = tl.load(q_ptr + (t_m[:, None] * sq_t + h64 * sq_h + offs_d[None, :]), mask=qmask, other=0.0)
    offs_c = t_m[:, None] * (H * HEAD_DIM) + h64 * HEAD_DIM + offs_d[None, :]  # contiguous [T, H, D]
    do = tl.load(do_ptr + offs_c, mask=qmask, other=0.0)
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
    else:  # p = exp(s - lse)
        m_i = tl.load(lse_ptr + (h64 * T + t_m), mask=mrow, other=0.0)
        inv_l = tl.full([BLOCK_M], 1.0, tl.float32)
    # 2. Delta = rowsum(p dp) from the p and dp that dS = p (dp - Delta) cancels against (exactly 0
    # for a one-token row), not flash-attention's rowsum(dO * O): O is rounded to q's dtype, and
    # dO . O then misses dp by an ulp of |dO| |O| (250 for dO = 1000, O = 1251.25 in fp16, where the
    # true dS is 0). fp32 inputs: products and sum in fp64, rounded once: Delta's rounding is dk's and
    # dq's largest error term, and an fp32 sum's depends on its order (a tree reduction, numpy's
    # pairwise one under the interpreter: up to 3x eager's error in dk at 9 keys). fp16/bf16: fp32
    # (their rounded p and dS dominate; fp64 would spill the fp16 dropout tile on sm_90).
    DELTA_T: tl.constexpr = tl.float64 if EXACT_SOFTMAX else tl.float32
    delta = tl.zeros([BLOCK_M], dtype=DELTA_T)
    for n0 in range(0, seqlen, BLOCK_N):
        k, p, dp = _key_block(
            q,
            do,
            k_ptr,
            v_ptr,
            sk_t,
            sk_h,
            sv_t,
            sv_h,
            h64,
            start,
            seqlen,
            n0,
            offs_n,
            offs_d,
            dmask,
            m_i,
            inv_l,
            scale,
            seed_ptr,
            h64 * T + t_m,
            max_seqlen,
            threshold,
            p_scale,
            DROPOUT,
            GROUPED,
            BLOCK_M,
            BLOCK_N,
        )
        delta += tl.sum(p.to(DELTA_T) * dp.to(DELTA_T), 1)
    delta = delta.to(tl.float32)
    tl.store(delta_ptr + (h64 * T + t_m), delta, mask=mrow)
    # 3. dq = scale sum_j dS_ij k_j
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        k, p, dp = _key_block(
            q,
            do,
            k_ptr,
            v_ptr,
            sk_t,
            sk_h,
            sv_t,
            sv_h,
            h64,
            start,
            seqlen,
            n0,
            offs_n,
            offs_d,
            dmask,
            m_i,
            inv_l,
            scale,
            seed_ptr,
            h64 * T + t_m,
            max_seqlen,
            threshold,
            p_scale,
            DROPOUT,
            GROUPED,
            BLOCK_M,
            BLOCK_N,
        )
        ds = p * (dp - delta[:, None])
        dq = _dot(for_store(ds, k_ptr), k, dq)
    tl.store(dq_ptr + offs_c, for_store(dq * scale, dq_ptr), mask=qmask)


@triton.jit
def _varlen_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,  # [T, H, D] strided (token, head strides below; element stride 1)
    do_ptr,  # [T, H, D] contiguous: the output's gradient
    lse_ptr,  # [H, T] fp32 log-sum-exp from the forward; not read when EXACT_SOFTMAX
    delta_ptr,  # [H, T] fp32 Delta from _varlen_bwd_dq_kernel
    m_ptr,
    il_ptr,  # [H, T] fp32 row max m and 1 / l from _varlen_bwd_dq_kernel; read only when EXACT_SOFTMAX
    cu_ptr,  # [B + 1] int32 cumulative sequence lengths
    seed_ptr,  # [1] int64 Philox seed; not read unless DROPOUT
    dk_ptr,
    dv_ptr,  # [T, H, D] contiguous, q's dtype (outputs)
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    sv_t,
    sv_h,
    T,
    H,
    max_seqlen,
    scale,
    threshold,
    p_scale,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    EXACT_SOFTMAX: tl.constexpr,  # p = exp(s - m) * (1 / l), as the dq kernel; else exp(s - lse)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
        do = tl.load(do_ptr + (t_m[:, None] * (H * HEAD_DIM) + h64 * HEAD_DIM + offs_d[None, :]), mask=qmask, other=0.0)
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
