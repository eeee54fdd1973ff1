"""The Triton kernels of linear_cross_entropy's fused step (launchers, ops and AOT specs:
linear_cross_entropy.py, which describes the maths). Rows are the ``rows`` rows of a contiguous
``[rows, V]`` logits chunk; a program takes ``BLOCK_M`` of them, ``BLOCK_V`` columns at a time.
"""

import triton
import triton.language as tl

from fastbert.triton._common import for_store


@triton.jit
def _tile(logits_ptr, r64, rmask, col0, V, BLOCK_V: tl.constexpr):
    """``(x, c, offs, inb)``: fp32 logits of rows ``r64`` x columns ``c = col0 + [0, BLOCK_V)``
    (``-inf`` outside the tensor), their int64 offsets and the in-bounds mask."""
    c = col0 + tl.arange(0, BLOCK_V)
    inb = rmask[:, None] & (c < V)[None, :]
    offs = r64[:, None] * V + c[None, :]
    x = tl.load(logits_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32)
    return x, c, offs, inb


@triton.jit
def _finite(m):
    """The row max with ``-inf`` (every logit ``-inf``, or no logits) replaced by 0."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _log_sum(s):
    """``log(s)`` of the shifted sum ``s >= 1``; 0 for an empty sum (such rows get ``lse = -inf``)."""
    return tl.log(tl.where(s == 0.0, 1.0, s))


@triton.jit
def _row_stats(logits_ptr, r64, rmask, t, V, PICK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """``(m, s, x_t)`` per row: the max (``_finite``), ``s = sum exp(x - m)`` and, when PICK, ``x_t``
    picked from the chunks (else 0), streaming over ``BLOCK_V`` chunks (one when ``BLOCK_V >= V``)."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    pick = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)  # x_t, accumulated per lane
    for col0 in range(0, V, BLOCK_V):
        x, c, offs, inb = _tile(logits_ptr, r64, rmask, col0, V, BLOCK_V)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = _finite(m_new)  # all -inf so far: s stays 0
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
        m = m_new
        if PICK:
            pick += tl.where(c[None, :] == t[:, None], x, 0.0)
    return _finite(m), s, tl.sum(pick, 1)


@triton.jit
def _targets(targets_ptr, r, rmask, V, ignore_index):
    """``(t, valid, in_range)``: int64 targets, ``t != ignore_index``, ``0 <= t < V``."""
    t = tl.load(targets_ptr + r, mask=rmask, other=0).to(tl.int64)
    return t, t != ignore_index, (t >= 0) & (t < V)


@triton.jit
def _store_stats(loss_ptr, lse_ptr, r, rmask, m, s, xt, valid, in_range):
    """``lse = m + log s`` and ``loss = (m - x_t) + log s`` (the small terms added last: better than
    ``lse - x_t`` when both are large), 0 on ignored rows, NaN for an out-of-range target."""
    log_s = _log_sum(s)
    loss = tl.where(valid, tl.where(in_range, (m - xt) + log_s, float("nan")), 0.0)
    tl.store(loss_ptr + r, loss, mask=rmask)
    tl.store(lse_ptr + r, tl.where(s == 0.0, float("-inf"), m + log_s), mask=rmask)


@triton.jit
def _grad(x, c, t, m, log_s, valid, sc):
    """``(softmax - onehot(t)) * row_scale`` of a tile, as ``exp((x - m) - log s)``: near the max,
    where the probabilities are large, ``x - m`` is exact and ``log s`` small (``exp(x - lse)``
    would carry ``lse``'s rounding, ~``|lse|`` ulps); zeros on ignored rows."""
    p = tl.exp((x - m[:, None]) - log_s[:, None])
    # an inf or NaN row_scale: the target's term is NaN, as eager's -scale + p_t scale (not -inf)
    one = tl.where(tl.abs(sc) < float("inf"), 1.0, float("nan"))
    onehot = tl.where(c[None, :] == t[:, None], one[:, None], 0.0)
    return tl.where(valid[:, None], (p - onehot) * sc[:, None], 0.0)


@triton.jit
def _ce_fwd_kernel(
    logits_ptr,  # [rows, V] contiguous, fp32/fp16/bf16
    targets_ptr,  # [rows] contiguous int64/int32
    loss_ptr,  # [rows] fp32 (output): lse - x_t, 0 where t == ignore_index (NaN if t is out of range)
    lse_ptr,  # [rows] fp32 (output): logsumexp of the row
    rows,
    V,
    ignore_index,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # program pid: rows [pid*BLOCK_M, +BLOCK_M)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < rows
    r64 = r.to(tl.int64)
    t, valid, in_range = _targets(targets_ptr, r, rmask, V, ignore_index)
    m, s, _ = _row_stats(logits_ptr, r64, rmask, t, V, False, BLOCK_M, BLOCK_V)
    # x_t read directly (never out of bounds: in_range), the logits are not written here
    xt = tl.load(logits_ptr + (r64 * V + t), mask=rmask & valid & in_range, other=0.0).to(tl.float32)
    _store_stats(loss_ptr, lse_ptr, r, rmask, m, s, xt, valid, in_range)


@triton.jit
def _ce_bwd_kernel(
    logits_ptr,  # [rows, V] contiguous, fp32/fp16/bf16: read, then overwritten with the gradient
    targets_ptr,  # [rows] contiguous int64/int32
    scale_ptr,  # [rows] fp32: row_scale, the incoming gradient of each row's loss
    loss_ptr,
    lse_ptr,  # [rows] fp32 (outputs), as _ce_fwd_kernel
    rows,
    V,
    ignore_index,
    ONE_BLOCK: tl.constexpr,  # BLOCK_V >= V: the row stays in registers between the two steps
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # d loss / d x_j = softmax_j - [j == t]: g = (exp(x - lse) - onehot(t)) * row_scale
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < rows
    r64 = r.to(tl.int64)
    t, valid, in_range = _targets(targets_ptr, r, rmask, V, ignore_index)
    sc = tl.load(scale_ptr + r, mask=rmask, other=0.0)
    if ONE_BLOCK:
        x, c, offs, inb = _tile(logits_ptr, r64, rmask, 0, V, BLOCK_V)
        m = _finite(tl.max(x, 1))
        s = tl.sum(tl.exp(x - m[:, None]), 1)
        xt = tl.sum(tl.where(c[None, :] == t[:, None], x, 0.0), 1)
        g = _grad(x, c, t, m, _log_sum(s), valid, sc)
        tl.store(logits_ptr + offs, for_store(g, logits_ptr), mask=inb)
    else:  # second pass over the chunks: each thread rewrites the elements it reads
        m, s, xt = _row_stats(logits_ptr, r64, rmask, t, V, True, BLOCK_M, BLOCK_V)
        log_s = _log_sum(s)
        for col0 in range(0, V, BLOCK_V):
            x, c, offs, inb = _tile(logits_ptr, r64, rmask, col0, V, BLOCK_V)
            g = _grad(x, c, t, m, log_s, valid, sc)
            tl.store(logits_ptr + offs, for_store(g, logits_ptr), mask=inb)
    _store_stats(loss_ptr, lse_ptr, r, rmask, m, s, xt, valid, in_range)
