"""The Triton kernels of layernorm_residual (launchers, ops and AOT specs: layernorm_residual.py).

Maths and layouts are described there; pointer arguments are commented per kernel.
"""

import triton
import triton.language as tl

from fastbert.triton._common import for_store, philox_keep


@triton.jit
def _row(ptr, c, n, LOAD: tl.constexpr):
    """fp32 ``ptr[c]`` as a [1, BLOCK_N] row (0 beyond n) that broadcasts over a tile's rows; 0.0
    without LOAD (an absent x_bias)."""
    if LOAD:
        return tl.load(ptr + c[None, :], mask=(c < n)[None, :], other=0.0).to(tl.float32)
    else:
        return 0.0


@triton.jit
def _offsets(r64, col0, n, BLOCK_N: tl.constexpr):
    """int64 element offsets (rows * n may pass 2^31) of rows ``r64`` x columns ``col0 + [0, BLOCK_N)``.
    Kernels compute the offsets they store through with this, not from ``_tile``'s result: torch.compile's
    mutation analysis takes every pointer argument of a helper whose result addresses a store as written
    (and then copies those inputs before each launch)."""
    return r64[:, None] * n + (col0 + tl.arange(0, BLOCK_N))[None, :]


@triton.jit
def _tile(x_ptr, res_ptr, xb, seed_ptr, r64, rmask, col0, n, threshold, scale,
          HAS_XBIAS: tl.constexpr, DROPOUT: tl.constexpr, GROUPED: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows ``r64`` x columns ``col0 + [0, BLOCK_N)``: ``(s, keep, mask)`` with the fp32 pre-norm
    sum ``s = dropout(x + xb) + residual`` (0 beyond column n, finite on masked rows), the keep
    mask and the in-bounds mask; ``xb``: the fp32 x_bias row (``_row``; ignored without HAS_XBIAS)."""
    c = col0 + tl.arange(0, BLOCK_N)
    mask = rmask[:, None] & (c < n)[None, :]
    offs = _offsets(r64, col0, n, BLOCK_N)
    h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_XBIAS:
        h += xb
    keep = mask
    if DROPOUT:
        keep = philox_keep(seed_ptr, r64, col0, n, threshold, GROUPED, BLOCK_M, BLOCK_N)
        h = tl.where(keep, h * scale, 0.0)
    return h + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32), keep, mask


@triton.jit
def _ln_fwd_kernel(
    x_ptr,      # [rows, n] contiguous, fp32/fp16/bf16
    res_ptr,    # [rows, n] contiguous, x's dtype
    w_ptr,      # [n] LayerNorm weight (fp32/fp16/bf16)
    b_ptr,      # [n] LayerNorm bias, weight's dtype
    xb_ptr,     # [n] x_bias, any float dtype; not read unless HAS_XBIAS (then any valid pointer)
    seed_ptr,   # [1] int64 Philox seed; not read unless DROPOUT
    y_ptr,      # [rows, n] contiguous, x's dtype (output)
    mean_ptr,   # [rows] fp32 (output)
    rstd_ptr,   # [rows] fp32 (output)
    rows, n,    # n = row length = row stride of x, residual and y
    rows_per_prog,  # rows each program walks, a multiple of BLOCK_M (BLOCK_M when LOOPED)
    eps, threshold, scale,  # threshold: philox.threshold(p) (int); scale: philox.scale(p) (fp32)
    HAS_XBIAS: tl.constexpr, DROPOUT: tl.constexpr, GROUPED: tl.constexpr,
    LOOPED: tl.constexpr,   # False: BLOCK_N >= n, rows stay in registers; True: chunks of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    nf = tl.cast(n, tl.float32)
    row0 = tl.program_id(0) * rows_per_prog
    if not LOOPED:
        # rows [row0, +rows_per_prog) in tiles of BLOCK_M rows; the parameters are read once per
        # program (and converted once to the tile's layout when their dtype differs from x's)
        c = tl.arange(0, BLOCK_N)
        w = _row(w_ptr, c, n, True)
        b = _row(b_ptr, c, n, True)
        xb = _row(xb_ptr, c, n, HAS_XBIAS)
        row1 = tl.minimum(row0 + rows_per_prog, rows)
        for start in range(row0, row1, BLOCK_M):
            r = start + tl.arange(0, BLOCK_M)
            rmask = r < row1
            r64 = r.to(tl.int64)
            s, keep, mask = _tile(x_ptr, res_ptr, xb, seed_ptr, r64, rmask, 0, n,
                                  threshold, scale, HAS_XBIAS, DROPOUT, GROUPED, BLOCK_M, BLOCK_N)
            m0 = tl.div_rn(tl.sum(s, 1), nf)
            d = tl.where(mask, s - m0[:, None], 0.0)  # exact for rows with a large mean
            sd = tl.sum(d, 1)
            corr = tl.div_rn(sd, nf)                   # mean = m0 + corr
            var = tl.maximum(tl.div_rn(tl.sum(d * d, 1) - sd * corr, nf), 0.0)
            rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
            tl.store(mean_ptr + r, m0 + corr, mask=rmask)
            tl.store(rstd_ptr + r, rstd, mask=rmask)
            y = (d - corr[:, None]) * rstd[:, None] * w + b
            tl.store(y_ptr + _offsets(r64, 0, n, BLOCK_N), for_store(y, y_ptr), mask=mask)
    else:
        r = row0 + tl.arange(0, BLOCK_M)
        rmask = r < rows
        r64 = r.to(tl.int64)
        # pass 1: per-chunk corrected two-pass statistics (count nb, mean mb, M2), merged into the
        # running (mean, m2) of the na columns before with Chan's formula
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for col0 in range(0, n, BLOCK_N):
            c = col0 + tl.arange(0, BLOCK_N)
            s, keep, mask = _tile(x_ptr, res_ptr, _row(xb_ptr, c, n, HAS_XBIAS), seed_ptr, r64,
                                  rmask, col0, n, threshold, scale, HAS_XBIAS, DROPOUT, GROUPED,
                                  BLOCK_M, BLOCK_N)
            nb = tl.minimum(n - col0, BLOCK_N).to(tl.float32)
            mb0 = tl.div_rn(tl.sum(s, 1), nb)
            d = tl.where(mask, s - mb0[:, None], 0.0)
            sd = tl.sum(d, 1)
            corr = tl.div_rn(sd, nb)
            na = col0 * 1.0
            delta = mb0 + corr - mean
            mean += delta * tl.div_rn(nb, na + nb)
            m2 += (tl.sum(d * d, 1) - sd * corr) + delta * delta * tl.div_rn(na * nb, na + nb)
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.maximum(tl.div_rn(m2, nf), 0.0) + eps))
        tl.store(mean_ptr + r, mean, mask=rmask)
        tl.store(rstd_ptr + r, rstd, mask=rmask)
        # pass 2: recompute s chunk by chunk and write y
        for col0 in range(0, n, BLOCK_N):
            c = col0 + tl.arange(0, BLOCK_N)
            s, keep, mask = _tile(x_ptr, res_ptr, _row(xb_ptr, c, n, HAS_XBIAS), seed_ptr, r64,
                                  rmask, col0, n, threshold, scale, HAS_XBIAS, DROPOUT, GROUPED,
                                  BLOCK_M, BLOCK_N)
            y = (s - mean[:, None]) * rstd[:, None] * _row(w_ptr, c, n, True) + _row(b_ptr, c, n, True)
            tl.store(y_ptr + _offsets(r64, col0, n, BLOCK_N), for_store(y, y_ptr), mask=mask)


@triton.jit
def _ln_bwd_kernel(
    dy_ptr,      # [rows, n] contiguous, x's dtype: incoming gradient
    x_ptr,       # [rows, n] contiguous (saved input)
    res_ptr,     # [rows, n] contiguous, x's dtype (saved input)
    w_ptr,       # [n] LayerNorm weight
    xb_ptr,      # [n] x_bias; not read unless HAS_XBIAS
    seed_ptr,    # [1] int64; not read unless DROPOUT
    mean_ptr,    # [rows] fp32 (saved by the forward)
    rstd_ptr,    # [rows] fp32 (saved by the forward)
    stats_ptr,   # [rows, 2] fp32 mean(g), mean(g s_hat) (_ln_bwd_stats_kernel); read only when LOOPED
    dres_ptr,    # [rows, n] contiguous, x's dtype (output): ds
    dx_ptr,      # [rows, n] contiguous, x's dtype (output, DROPOUT only): keep ? ds scale : 0
    partial_ptr,  # [n_row_blocks, K, n] fp32 (output): per-row-block column sums of dy s_hat, dy and
                  # (HAS_XBIAS, K = 3) dx; K = 2 without x_bias
    rows, n,     # n = row length = row stride of every [rows, n] tensor
    rows_per_prog,  # rows each program walks (a multiple of BLOCK_M)
    threshold, scale,
    HAS_XBIAS: tl.constexpr, DROPOUT: tl.constexpr, GROUPED: tl.constexpr,
    LOOPED: tl.constexpr,   # False: BLOCK_N >= n (one column block, row sums here);
                            # True: a 2-D grid of column blocks, row sums from stats_ptr
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program (pid_m, pid_n): rows [pid_m*rows_per_prog, +rows_per_prog) in steps of BLOCK_M,
    # columns [pid_n*BLOCK_N, +BLOCK_N). Column partial sums, weight and x_bias stay in registers
    # across the loop (loading the parameters per tile would convert whole tiles between the
    # layouts of different dtypes inside the loop).
    pid_m = tl.program_id(0)
    col0 = tl.program_id(1) * BLOCK_N
    c = col0 + tl.arange(0, BLOCK_N)
    w = _row(w_ptr, c, n, True)
    xb = _row(xb_ptr, c, n, HAS_XBIAS)
    acc_dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_dxb = tl.zeros([BLOCK_N], dtype=tl.float32)
    row0 = pid_m * rows_per_prog
    row1 = tl.minimum(row0 + rows_per_prog, rows)
    for start in range(row0, row1, BLOCK_M):
        r = start + tl.arange(0, BLOCK_M)
        rmask = r < row1
        r64 = r.to(tl.int64)
        s, keep, mask = _tile(x_ptr, res_ptr, xb, seed_ptr, r64, rmask, col0, n, threshold, scale,
                              HAS_XBIAS, DROPOUT, GROUPED, BLOCK_M, BLOCK_N)
        offs = _offsets(r64, col0, n, BLOCK_N)
        mean = tl.load(mean_ptr + r, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + r, mask=rmask, other=0.0)  # masked rows: s_hat = 0, ds = 0
        s_hat = (s - mean[:, None]) * rstd[:, None]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = dy * w  # masked lanes: 0
        if LOOPED:
            c1 = tl.load(stats_ptr + 2 * r64, mask=rmask, other=0.0)
            c2 = tl.load(stats_ptr + 2 * r64 + 1, mask=rmask, other=0.0)
        else:
            c1 = tl.div_rn(tl.sum(g, 1), tl.cast(n, tl.float32))
            c2 = tl.div_rn(tl.sum(g * s_hat, 1), tl.cast(n, tl.float32))
        ds = rstd[:, None] * (g - c1[:, None] - s_hat * c2[:, None])
        tl.store(dres_ptr + offs, for_store(ds, dres_ptr), mask=mask)
        if DROPOUT:
            ds = tl.where(keep, ds * scale, 0.0)
            tl.store(dx_ptr + offs, for_store(ds, dx_ptr), mask=mask)
        # stage 1: this row block's column sums (fixed order; masked rows add 0)
        acc_dw += tl.sum(dy * s_hat, 0)
        acc_db += tl.sum(dy, 0)
        if HAS_XBIAS:
            acc_dxb += tl.sum(ds, 0)  # masked columns hold garbage but are never stored
    K: tl.constexpr = 3 if HAS_XBIAS else 2
    base = partial_ptr + pid_m.to(tl.int64) * K * n + c
    tl.store(base, acc_dw, mask=c < n)
    tl.store(base + n, acc_db, mask=c < n)
    if HAS_XBIAS:
        tl.store(base + 2 * n, acc_dxb, mask=c < n)


@triton.jit
def _ln_bwd_stats_kernel(
    dy_ptr, x_ptr, res_ptr, w_ptr, xb_ptr, seed_ptr, mean_ptr, rstd_ptr,  # as _ln_bwd_kernel
    stats_ptr,   # [rows, 2] fp32 (output): mean(g), mean(g s_hat) per row
    rows, n, threshold, scale,
    HAS_XBIAS: tl.constexpr, DROPOUT: tl.constexpr, GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # rows longer than one block: the row sums of the backward, chunk by chunk
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < rows
    r64 = r.to(tl.int64)
    mean = tl.load(mean_ptr + r, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + r, mask=rmask, other=0.0)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for col0 in range(0, n, BLOCK_N):
        c = col0 + tl.arange(0, BLOCK_N)
        s, keep, mask = _tile(x_ptr, res_ptr, _row(xb_ptr, c, n, HAS_XBIAS), seed_ptr, r64, rmask,
                              col0, n, threshold, scale, HAS_XBIAS, DROPOUT, GROUPED, BLOCK_M, BLOCK_N)
        g = tl.load(dy_ptr + _offsets(r64, col0, n, BLOCK_N), mask=mask, other=0.0).to(tl.float32)
        g *= _row(w_ptr, c, n, True)
        acc1 += g
        acc2 += g * (s - mean[:, None]) * rstd[:, None]
    tl.store(stats_ptr + 2 * r64, tl.div_rn(tl.sum(acc1, 1), tl.cast(n, tl.float32)), mask=rmask)
    tl.store(stats_ptr + 2 * r64 + 1, tl.div_rn(tl.sum(acc2, 1), tl.cast(n, tl.float32)), mask=rmask)


@triton.jit
def _ln_param_reduce_kernel(
    partial_ptr,  # [n_blocks, K, n] fp32 from _ln_bwd_kernel
    dw_ptr,       # [n] weight's dtype (output): sum of partial[:, 0]
    db_ptr,       # [n] weight's dtype (output): sum of partial[:, 1]
    dxb_ptr,      # [n] x_bias's dtype (output, HAS_XBIAS only): sum of partial[:, 2]
    n_blocks, n,
    HAS_XBIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # stage 2: program (pid, k) sums gradient k over columns [pid*BLOCK_N, +BLOCK_N), in a fixed
    # order (BLOCK_R row blocks at a time, then a tree over the tile's rows)
    K: tl.constexpr = 3 if HAS_XBIAS else 2
    k = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = c < n
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_blocks, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        offs = (r.to(tl.int64) * K + k)[:, None] * n + c[None, :]
        acc += tl.load(partial_ptr + offs, mask=(r < n_blocks)[:, None] & cmask[None, :], other=0.0)
    tot = tl.sum(acc, 0)
    if k == 0:
        tl.store(dw_ptr + c, for_store(tot, dw_ptr), mask=cmask)
    elif k == 1:
        tl.store(db_ptr + c, for_store(tot, db_ptr), mask=cmask)
    elif HAS_XBIAS:
        tl.store(dxb_ptr + c, for_store(tot, dxb_ptr), mask=cmask)
