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
def _tile(
    x_ptr,
    res_ptr,
    xb,
    seed_ptr,
    r64,
    rmask,
    col0,
    n,
    threshold,
    scale,
    HAS_XBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
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


# Rows of huge values: a row whose largest |s| passes _BIG (2^50) has its statistics computed on
# s * 2^-76 (exact: a power of two), so that neither sum(s) nor sum(d^2) can overflow fp32 (-1e30 in
# a row made d^2 inf and the outputs 1e32; +-3e38 made them inf/NaN). mean and rstd are stored
# unscaled (rstd may be subnormal there); the backward scales s - mean the same way (_s_hat). Rows
# below _BIG are untouched (a scale of 1.0: the same bits as without it).
_BIG = tl.constexpr(1125899906842624.0)  # 2^50
_DOWN = tl.constexpr(1.3234889800848443e-23)  # 2^-76
_UP = tl.constexpr(7.555786372591432e22)  # 2^76
_SMALL = tl.constexpr(8.881784197001252e-16)  # 2^-50


@triton.jit
def _row_scale(big):
    """(sc, inv): (2^-76, 2^76) for rows of huge values, (1, 1) otherwise."""
    return tl.where(big, _DOWN, 1.0), tl.where(big, _UP, 1.0)


@triton.jit
def _rstd_of(var, eps, big, inv):
    """rstd of the scaled variance ``var`` in scaled units (``1 / sqrt(var_true + eps) / sc``): for
    rows of huge values eps * sc^2 underflows, so it is min(1 / sqrt(var), 1 / (sqrt(eps) sc))."""
    normal = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    huge = tl.minimum(tl.div_rn(1.0, tl.sqrt_rn(var)), inv * tl.div_rn(1.0, tl.sqrt_rn(eps + 0.0 * var)))
    return tl.where(big, huge, normal)


@triton.jit
def _s_hat(s, mean, rstd):
    """``(s - mean) * rstd`` for a [BLOCK_M, BLOCK_N] tile with per-row saved ``mean``/``rstd``: rows
    of huge values (|mean| > 2^50 or rstd < 2^-50) as ``(s sc - mean sc) (rstd / sc)``, so that
    ``s - mean`` cannot overflow and a subnormal rstd is scaled up before it multiplies."""
    big = (tl.abs(mean) > _BIG) | (rstd < _SMALL)
    sc, inv = _row_scale(big)
    return (s * sc[:, None] - (mean * sc)[:, None]) * (rstd * inv)[:, None]


@triton.jit
def _looped_stats(
    x_ptr,
    res_ptr,
    xb_ptr,
    seed_ptr,
    r64,
    rmask,
    n,
    threshold,
    scale,
    sc,
    HAS_XBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Pass 1 of the looped forward on ``s * sc``: per-chunk corrected two-pass statistics (count nb,
    mean mb, M2), merged into the running (mean, m2) of the na columns before with Chan's formula;
    also the largest |s| (unscaled) of each row."""
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for col0 in range(0, n, BLOCK_N):
        c = col0 + tl.arange(0, BLOCK_N)
        s, keep, mask = _tile(
            x_ptr,
            res_ptr,
            _row(xb_ptr, c, n, HAS_XBIAS),
            seed_ptr,
            r64,
            rmask,
            col0,
            n,
            threshold,
            scale,
            HAS_XBIAS,
            DROPOUT,
            GROUPED,
            BLOCK_M,
            BLOCK_N,
        )
        amax = tl.maximum(amax, tl.max(tl.abs(s), 1))
        s = s * sc[:, None]
        nb = tl.minimum(n - col0, BLOCK_N).to(tl.float32)
        mb0 = tl.div_rn(tl.sum(s, 1), nb)
        d = tl.where(mask, s - mb0[:, None], 0.0)
        sd = tl.sum(d, 1)
        corr = tl.div_rn(sd, nb)
        na = col0 * 1.0
        delta = mb0 + corr - mean
        mean += delta * tl.div_rn(nb, na + nb)
        m2 += (tl.sum(d * d, 1) - sd * corr) + delta * delta * tl.div_rn(na * nb, na + nb)
    return mean, m2, amax


@triton.jit
def _ln_fwd_kernel(
    x_ptr,  # [rows, n] contiguous, fp32/fp16/bf16
    res_ptr,  # [rows, n] contiguous, x's dtype
    w_ptr,  # [n] LayerNorm weight (fp32/fp16/bf16)
    b_ptr,  # [n] LayerNorm bias, weight's dtype
    xb_ptr,  # [n] x_bias, any float dtype; not read unless HAS_XBIAS (then any valid pointer)
    seed_ptr,  # [1] int64 Philox seed; not read unless DROPOUT
    y_ptr,  # [rows, n] contiguous, x's dtype (output)
    mean_ptr,  # [rows] fp32 (output)
    rstd_ptr,  # [rows] fp32 (output)
    rows,
    n,  # n = row length = row stride of x, residual and y
    rows_per_prog,  # rows each program walks, a multiple of BLOCK_M (BLOCK_M when LOOPED)
    eps,
    threshold,
    scale,  # threshold: philox.threshold(p) (int); scale: philox.scale(p) (fp32)
    HAS_XBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    LOOPED: tl.constexpr,  # False: BLOCK_N >= n, rows stay in registers; True: chunks of BLOCK_N
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
            s, keep, mask = _tile(
                x_ptr,
                res_ptr,
                xb,
                seed_ptr,
                r64,
                rmask,
                0,
                n,
                threshold,
                scale,
                HAS_XBIAS,
                DROPOUT,
                GROUPED,
                BLOCK_M,
                BLOCK_N,
            )
            big = tl.max(tl.abs(s), 1) > _BIG  # rows of huge values: statistics of s * 2^-76
            sc, inv = _row_scale(big)
            s = s * sc[:, None]
            m0 = tl.div_rn(tl.sum(s, 1), nf)
            d = tl.where(mask, s - m0[:, None], 0.0)  # exact for rows with a large mean
            sd = tl.sum(d, 1)
            corr = tl.div_rn(sd, nf)  # mean = m0 + corr
            var = tl.maximum(tl.div_rn(tl.sum(d * d, 1) - sd * corr, nf), 0.0)
            rstd = _rstd_of(var, eps, big, inv)  # in scaled units
            tl.store(mean_ptr + r, (m0 + corr) * inv, mask=rmask)
            tl.store(rstd_ptr + r, rstd * sc, mask=rmask)
            y = (d - corr[:, None]) * rstd[:, None] * w + b
            tl.store(y_ptr + _offsets(r64, 0, n, BLOCK_N), for_store(y, y_ptr), mask=mask)
    else:
        r = row0 + tl.arange(0, BLOCK_M)
        rmask = r < rows
        r64 = r.to(tl.int64)
        # pass 1: statistics (_looped_stats); if a row of the tile turns out to hold huge values
        # (rare), pass 1 runs again on s * 2^-76 for those rows
        one = tl.full([BLOCK_M], 1.0, tl.float32)
        mean, m2, amax = _looped_stats(
            x_ptr,
            res_ptr,
            xb_ptr,
            seed_ptr,
            r64,
            rmask,
            n,
            threshold,
            scale,
            one,
            HAS_XBIAS,
            DROPOUT,
            GROUPED,
            BLOCK_M,
            BLOCK_N,
        )
        big = amax > _BIG
        sc, inv = _row_scale(big)
        if tl.max(big.to(tl.int32), 0) > 0:
            mean, m2, amax = _looped_stats(
                x_ptr,
                res_ptr,
                xb_ptr,
                seed_ptr,
                r64,
                rmask,
                n,
                threshold,
                scale,
                sc,
                HAS_XBIAS,
                DROPOUT,
                GROUPED,
                BLOCK_M,
                BLOCK_N,
            )
        rstd = _rstd_of(tl.maximum(tl.div_rn(m2, nf), 0.0), eps, big, inv)  # in scaled units
        tl.store(mean_ptr + r, mean * inv, mask=rmask)
        tl.store(rstd_ptr + r, rstd * sc, mask=rmask)
        # pass 2: recompute s chunk by chunk and write y
        for col0 in range(0, n, BLOCK_N):
            c = col0 + tl.arange(0, BLOCK_N)
            s, keep, mask = _tile(
                x_ptr,
                res_ptr,
                _row(xb_ptr, c, n, HAS_XBIAS),
                seed_ptr,
                r64,
                rmask,
                col0,
                n,
                threshold,
                scale,
                HAS_XBIAS,
                DROPOUT,
                GROUPED,
                BLOCK_M,
                BLOCK_N,
            )
            s = s * sc[:, None]
            y = (s - mean[:, None]) * rstd[:, None] * _row(w_ptr, c, n, True) + _row(b_ptr, c, n, True)
            tl.store(y_ptr + _offsets(r64, col0, n, BLOCK_N), for_store(y, y_ptr), mask=mask)


@triton.jit
def _ln_bwd_kernel(
    dy_ptr,  # [rows, n] contiguous, x's dtype: incoming gradient
    x_ptr,  # [rows, n] contiguous (saved input)
    res_ptr,  # [rows, n] contiguous, x's dtype (saved input)
    w_ptr,  # [n] LayerNorm weight
    xb_ptr,  # [n] x_bias; not read unless HAS_XBIAS
    seed_ptr,  # [1] int64; not read unless DROPOUT
    mean_ptr,  # [rows] fp32 (saved by the forward)
    rstd_ptr,  # [rows] fp32 (saved by the forward)
    stats_ptr,  # [rows, 2] fp32 mean(g), mean(g s_hat) (_ln_bwd_stats_kernel); read only when LOOPED
    dres_ptr,  # [rows, n] contiguous, x's dtype (output): ds
    dx_ptr,  # [rows, n] contiguous, x's dtype (output, DROPOUT only): keep ? ds scale : 0
    partial_ptr,  # [n_row_blocks, K, n] fp32 (output): per-row-block column sums of dy s_hat, dy and
    # (HAS_XBIAS, K = 3) dx; K = 2 without x_bias
    rows,
    n,  # n = row length = row stride of every [rows, n] tensor
    rows_per_prog,  # rows each program walks (a multiple of BLOCK_M)
    threshold,
    scale,
    HAS_XBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    LOOPED: tl.constexpr,  # False: BLOCK_N >= n (one column block, row sums here);
    # True: a 2-D grid of column blocks, row sums from stats_ptr
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
        s, keep, mask = _tile(
            x_ptr,
            res_ptr,
            xb,
            seed_ptr,
            r64,
            rmask,
            col0,
            n,
            threshold,
            scale,
            HAS_XBIAS,
            DROPOUT,
            GROUPED,
            BLOCK_M,
            BLOCK_N,
        )
        offs = _offsets(r64, col0, n, BLOCK_N)
        mean = tl.load(mean_ptr + r, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + r, mask=rmask, other=0.0)  # masked rows: s_hat = 0, ds = 0
        s_hat = _s_hat(s, mean, rstd)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = dy * w  # masked lanes: 0
        if LOOPED:
            c1 = tl.load(stats_ptr + 2 * r64, mask=rmask, other=0.0)
            c2 = tl.load(stats_ptr + 2 * r64 + 1, mask=rmask, other=0.0)
        else:
            c1 = tl.div_rn(tl.sum(g, 1), tl.cast(n, tl.float32))
            c2 = tl.div_rn(tl.sum(g * s_hat, 1), tl.cast(n, tl.float32))
        # an infinite g (dy * w): eager's row of ds is all NaN (inf - inf in LayerNorm's backward)
        c2 = tl.where(tl.abs(c1) < float("inf"), c2, float("nan"))
        ds = rstd[:, None] * (g - c1[:, None] - s_hat * c2[:, None])
        tl.store(dres_ptr + offs, for_store(ds, dres_ptr), mask=mask)
        if DROPOUT:
            ds = tl.where(keep, ds * scale, 0.0)
            tl.store(dx_ptr + offs, for_store(ds, dx_ptr), mask=mask)
        # stage 1: this row block's column sums (fixed order; masked rows add 0)
        acc_dw += tl.sum(dy * s_hat, 0)
        acc_db += tl.sum(dy, 0)
        if HAS_XBIAS:
            # masked columns hold garbage but are never stored; masked rows add 0 (not their
            # ds: with an inf or NaN weight their g = 0 * w is NaN)
            acc_dxb += tl.sum(tl.where(mask, ds, 0.0), 0)
    K: tl.constexpr = 3 if HAS_XBIAS else 2
    base = partial_ptr + pid_m.to(tl.int64) * K * n + c
    tl.store(base, acc_dw, mask=c < n)
    tl.store(base + n, acc_db, mask=c < n)
    if HAS_XBIAS:
        tl.store(base + 2 * n, acc_dxb, mask=c < n)


@triton.jit
def _ln_bwd_stats_kernel(
    dy_ptr,
    x_ptr,
    res_ptr,
    w_ptr,
    xb_ptr,
    seed_ptr,
    mean_ptr,
    rstd_ptr,  # as _ln_bwd_kernel
    stats_ptr,  # [rows, 2] fp32 (output): mean(g), mean(g s_hat) per row
    rows,
    n,
    threshold,
    scale,
    HAS_XBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
        s, keep, mask = _tile(
            x_ptr,
            res_ptr,
            _row(xb_ptr, c, n, HAS_XBIAS),
            seed_ptr,
            r64,
            rmask,
            col0,
            n,
            threshold,
            scale,
            HAS_XBIAS,
            DROPOUT,
            GROUPED,
            BLOCK_M,
            BLOCK_N,
        )
        g = tl.load(dy_ptr + _offsets(r64, col0, n, BLOCK_N), mask=mask, other=0.0).to(tl.float32)
        g *= _row(w_ptr, c, n, True)
        acc1 += g
        acc2 += g * _s_hat(s, mean, rstd)
    tl.store(stats_ptr + 2 * r64, tl.div_rn(tl.sum(acc1, 1), tl.cast(n, tl.float32)), mask=rmask)
    tl.store(stats_ptr + 2 * r64 + 1, tl.div_rn(tl.sum(acc2, 1), tl.cast(n, tl.float32)), mask=rmask)


@triton.jit
def _ln_param_reduce_kernel(
    partial_ptr,  # [n_blocks, K, n] fp32 from _ln_bwd_kernel
    dw_ptr,  # [n] weight's dtype (output): sum of partial[:, 0]
    db_ptr,  # [n] weight's dtype (output): sum of partial[:, 1]
    dxb_ptr,  # [n] x_bias's dtype (output, HAS_XBIAS only): sum of partial[:, 2]
    n_blocks,
    n,
    HAS_XBIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
