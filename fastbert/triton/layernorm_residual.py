"""bias + dropout + residual + LayerNorm in Triton: ``fastbert::layernorm_residual_fwd_triton`` / ``_bwd_triton``.

Forward (fp32 maths whatever the storage dtypes), per row of ``n`` elements:
``h = x + x_bias``; with dropout ``h = keep ? h * scale : 0``; ``s = h + residual``;
``mean``, ``rstd = 1 / sqrt(var + eps)`` (biased variance); ``y = (s - mean) rstd weight + bias``.
Statistics are computed without cancellation for rows with a large mean: ``m0 = sum(s) / n``, then
``d = s - m0`` (exact), ``mean = m0 + sum(d) / n`` and ``var = (sum(d^2) - sum(d)^2 / n) / n`` (the
corrected two-pass algorithm, on the row held in registers). Rows longer than one block (looped
kernels) merge per-chunk statistics with Chan's formula.

Backward recomputes ``s`` (and the dropout mask) from the saved inputs and fp32 ``mean``/``rstd``:
``s_hat = (s - mean) rstd``, ``g = dy weight``,
``ds = rstd (g - mean(g) - s_hat mean(g s_hat))`` (the LayerNorm input gradient), ``dresidual = ds``,
``dx = keep ? ds scale : 0`` (only with dropout; without it dx is ds), ``dweight = sum_rows dy s_hat``,
``dbias = sum_rows dy``, ``dx_bias = sum_rows dx``. The column sums reduce in two deterministic stages
without atomics: each program walks a fixed block of rows (fixed by the shape) and keeps its fp32
column partials in registers, writes them to ``partial[n_row_blocks, K, n]``; a second kernel adds
the row blocks up in order.

Dropout draws from the shared Philox stream (fastbert/philox.py): element ``e`` (flat index into
[rows, n]) takes output ``(e % 64) // 16`` of counter ``16 (e // 64) + e % 16``. When ``n % 64 == 0``
(BERT widths) a tile's counters are generated once per 4 elements and the four outputs interleaved
back into element order (``GROUPED``); otherwise each element draws its own counter.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastbert import philox
from fastbert.ops import _library
from fastbert.ops.layernorm_residual import _fake_bwd as _ops_fake_bwd
from fastbert.ops.layernorm_residual import _fake_fwd as _ops_fake_fwd
from fastbert.ops.layernorm_residual import OP, backward, check_args, dropout_active, setup_context
from fastbert.triton._common import check_device, check_dtypes, define, for_store


# ----------------------------------------------------------------------------------------- kernels

@triton.jit
def _keep(seed_ptr, r64, col0, n, threshold, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """Dropout keep mask [BLOCK_M, BLOCK_N] of rows ``r64`` (int64) x columns ``col0 + [0, BLOCK_N)``."""
    seed = tl.load(seed_ptr)
    if GROUPED:
        # n and col0 are multiples of 64: group (row, col0 / 64 + gi) holds columns 64 gi + 16 w + j,
        # j < 16, w < 4: output w of counter 16 group + j. One counter per 4 elements; the outputs
        # are interleaved back into element order (join + permute + reshape).
        G: tl.constexpr = BLOCK_N // 64
        grp = r64[:, None, None] * (n // 64) + (col0 // 64 + tl.arange(0, G))[None, :, None]
        o0, o1, o2, o3 = tl.randint4x(seed, grp * 16 + tl.arange(0, 16)[None, None, :])
        k = tl.join(tl.join((o0 >> 8) >= threshold, (o1 >> 8) >= threshold),
                    tl.join((o2 >> 8) >= threshold, (o3 >> 8) >= threshold))  # [M, G, j, q, p]: w = 2p + q
        return tl.reshape(tl.permute(k, (0, 1, 4, 3, 2)), (BLOCK_M, BLOCK_N))
    else:  # one counter per element (4x the Philox work), output (e % 64) // 16 of it
        e = r64[:, None] * n + (col0 + tl.arange(0, BLOCK_N))[None, :]
        o0, o1, o2, o3 = tl.randint4x(seed, (e >> 6) * 16 + (e & 15))
        w = (e >> 4) & 3
        o = tl.where(w == 0, o0, tl.where(w == 1, o1, tl.where(w == 2, o2, o3)))
        return (o >> 8) >= threshold


@triton.jit
def _row(ptr, c, n, LOAD: tl.constexpr):
    """fp32 ``ptr[c]`` as a [1, BLOCK_N] row (0 beyond n) that broadcasts over a tile's rows; 0.0
    without LOAD (an absent x_bias)."""
    if LOAD:
        return tl.load(ptr + c[None, :], mask=(c < n)[None, :], other=0.0).to(tl.float32)
    else:
        return 0.0


@triton.jit
def _tile(x_ptr, res_ptr, xb, seed_ptr, r64, rmask, col0, n, threshold, scale,
          HAS_XBIAS: tl.constexpr, DROPOUT: tl.constexpr, GROUPED: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows ``r64`` x columns ``col0 + [0, BLOCK_N)``: ``(s, keep, mask, offs)`` with the fp32 pre-norm
    sum ``s = dropout(x + xb) + residual`` (0 beyond column n, finite on masked rows) and the keep
    mask; ``xb``: the fp32 x_bias row (``_row``; ignored without HAS_XBIAS)."""
    c = col0 + tl.arange(0, BLOCK_N)
    mask = rmask[:, None] & (c < n)[None, :]
    offs = r64[:, None] * n + c[None, :]  # int64: rows * n may pass 2^31
    h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_XBIAS:
        h += xb
    keep = mask
    if DROPOUT:
        keep = _keep(seed_ptr, r64, col0, n, threshold, GROUPED, BLOCK_M, BLOCK_N)
        h = tl.where(keep, h * scale, 0.0)
    return h + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32), keep, mask, offs


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
    nf = n.to(tl.float32)
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
            s, keep, mask, offs = _tile(x_ptr, res_ptr, xb, seed_ptr, r.to(tl.int64), rmask, 0, n,
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
            tl.store(y_ptr + offs, for_store(y, y_ptr), mask=mask)
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
            s, keep, mask, offs = _tile(x_ptr, res_ptr, _row(xb_ptr, c, n, HAS_XBIAS), seed_ptr, r64,
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
            s, keep, mask, offs = _tile(x_ptr, res_ptr, _row(xb_ptr, c, n, HAS_XBIAS), seed_ptr, r64,
                                        rmask, col0, n, threshold, scale, HAS_XBIAS, DROPOUT, GROUPED,
                                        BLOCK_M, BLOCK_N)
            y = (s - mean[:, None]) * rstd[:, None] * _row(w_ptr, c, n, True) + _row(b_ptr, c, n, True)
            tl.store(y_ptr + offs, for_store(y, y_ptr), mask=mask)


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
        s, keep, mask, offs = _tile(x_ptr, res_ptr, xb, seed_ptr, r64, rmask, col0, n, threshold, scale,
                                    HAS_XBIAS, DROPOUT, GROUPED, BLOCK_M, BLOCK_N)
        mean = tl.load(mean_ptr + r, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + r, mask=rmask, other=0.0)  # masked rows: s_hat = 0, ds = 0
        s_hat = (s - mean[:, None]) * rstd[:, None]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = dy * w  # masked lanes: 0
        if LOOPED:
            c1 = tl.load(stats_ptr + 2 * r64, mask=rmask, other=0.0)
            c2 = tl.load(stats_ptr + 2 * r64 + 1, mask=rmask, other=0.0)
        else:
            c1 = tl.div_rn(tl.sum(g, 1), n.to(tl.float32))
            c2 = tl.div_rn(tl.sum(g * s_hat, 1), n.to(tl.float32))
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
        s, keep, mask, offs = _tile(x_ptr, res_ptr, _row(xb_ptr, c, n, HAS_XBIAS), seed_ptr, r64, rmask,
                                    col0, n, threshold, scale, HAS_XBIAS, DROPOUT, GROUPED, BLOCK_M, BLOCK_N)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32) * _row(w_ptr, c, n, True)
        acc1 += g
        acc2 += g * (s - mean[:, None]) * rstd[:, None]
    tl.store(stats_ptr + 2 * r64, tl.div_rn(tl.sum(acc1, 1), n.to(tl.float32)), mask=rmask)
    tl.store(stats_ptr + 2 * r64 + 1, tl.div_rn(tl.sum(acc2, 1), n.to(tl.float32)), mask=rmask)


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


# ----------------------------------------------------------------------------- launch configuration

_FWD_MAX_N = 8192    # longer rows: the looped forward (chunks of _LOOP_BLOCK_N)
_BWD_MAX_N = 4096    # longer rows: _ln_bwd_stats_kernel + a 2-D grid of column blocks
_LOOP_BLOCK_N = 2048
_MAX_ROW_BLOCKS = 256   # backward row blocks (fp32 workspace <= 3 * _MAX_ROW_BLOCKS * n * 4 bytes)
_FWD_MAX_PROGRAMS = 32768


def _per_element(n, dropout):
    """Per-element Philox counters (dropout with ``n % 64 != 0``): four times the random numbers,
    so half the elements per thread and half the row length before the looped kernels."""
    return dropout and n % 64 != 0


def fwd_config(n, dropout):
    """``(BLOCK_M, BLOCK_N, num_warps, looped)`` of the forward for rows of length ``n``.

    A row that fits is one power-of-two block of columns; the tile takes enough rows for 16 elements
    per thread (8 with per-element counters) over 4 to 8 warps: 768/1024 -> 2 rows x 1024 over 4
    warps (a thread: one 16-byte vector of x and of residual per row, ~80 registers, 6 programs per
    SM), 8192 -> 1 row over 8 warps (32 per thread).
    """
    per_thread = 8 if _per_element(n, dropout) else 16
    if n > _FWD_MAX_N * per_thread // 16:
        return 1, _LOOP_BLOCK_N, 8, True
    bn = triton.next_power_of_2(max(n, 1))
    num_warps = min(8, max(4, bn // (32 * per_thread)))
    return max(1, num_warps * 32 * per_thread // bn), bn, num_warps, False


def bwd_config(n, dropout):
    """``(BLOCK_M, BLOCK_N, num_warps, looped)`` of the backward for rows of length ``n``.

    As the forward, but besides the tile each thread holds three fp32 column sums for each of its
    columns across the whole loop, so the columns per thread stay few: 4 warps up to 1024 columns
    (768/1024: 4 rows x 1024, 8 columns and 32 elements per thread), 8 warps beyond; 16 elements per
    thread from 4096 columns (and with per-element counters); longer rows take the looped kernels.
    """
    per_thread = 16 if _per_element(n, dropout) else 32
    if n > _BWD_MAX_N * per_thread // 32:
        return 1, _LOOP_BLOCK_N, 8, True
    bn = triton.next_power_of_2(max(n, 1))
    num_warps = 4 if bn <= 1024 else 8
    per_thread = min(per_thread, 16 if bn >= 4096 else 32)
    return max(1, num_warps * 32 * per_thread // bn), bn, num_warps, False


def reduce_config(n_blocks):
    """``(BLOCK_R, BLOCK_N, num_warps)`` for summing ``n_blocks`` partials."""
    return (8, 256, 4) if n_blocks <= 8 else (32, 64, 4)


def rows_per_program(rows, block_m):
    """Rows per backward program (one dweight/dbias/dx_bias partial each): a multiple of ``block_m``
    giving at most _MAX_ROW_BLOCKS row blocks; depends on the shape only (reproducible sums)."""
    per = triton.cdiv(triton.cdiv(rows, _MAX_ROW_BLOCKS), block_m) * block_m
    return max(per, block_m)


# ------------------------------------------------------------------------------------------- ops

def _check(x, residual, weight, bias, eps, x_bias, dropout_p, seed, op):
    check_args(x, residual, weight, bias, eps, x_bias, dropout_p)
    check_dtypes(f"{OP} ({op})", x=x, weight=weight, x_bias=x_bias)
    if seed is not None and (not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64
                             or seed.numel() != 1 or seed.device != x.device):
        raise ValueError(f"{OP} ({op}): seed must be an int64 tensor with one element on x's device")
    check_device(x, f"{OP} ({op})")


def _check_bwd(grad, x, residual, weight, x_bias, mean, rstd, dropout_p, seed):
    _check(x, residual, weight, weight, 1.0, x_bias, dropout_p, seed, "triton backward")
    for t, name, shape, dtype in ((grad, "grad", x.shape, x.dtype), (mean, "mean", x.shape[:-1], torch.float32),
                                  (rstd, "rstd", x.shape[:-1], torch.float32)):
        if t.shape != shape or t.dtype != dtype or t.device != x.device:
            raise ValueError(f"{OP} backward: {name} must be {dtype} of shape {list(shape)} on {x.device}, "
                             f"got {t.dtype} of shape {list(t.shape)} on {t.device}")


def _fake_fwd(*args):
    _check(*args, "triton forward")
    return _ops_fake_fwd(*args)


def _fake_bwd(*args):
    _check_bwd(*args)
    return _ops_fake_bwd(*args)


def _dropout_args(dropout_p, seed):
    """(DROPOUT, threshold, scale) kernel arguments."""
    if dropout_active(dropout_p, seed):
        return True, philox.threshold(dropout_p), philox.scale(dropout_p)
    return False, 0, 1.0


@define("fastbert::layernorm_residual_fwd_triton", _fake_fwd)
def layernorm_residual_fwd_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor, eps: float, x_bias: Optional[torch.Tensor],
                                  dropout_p: float, seed: Optional[torch.Tensor]
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, residual, weight, bias, eps, x_bias, dropout_p, seed, "triton forward")
    x, residual = x.contiguous(), residual.contiguous()
    y = torch.empty_like(x)
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    rstd = torch.empty_like(mean)
    n, rows = x.shape[-1], mean.numel()
    if rows == 0 or n == 0:  # empty rows: mean 0 and rstd NaN, as torch.native_layer_norm gives them
        return y, mean.fill_(0.0), rstd.fill_(float("nan"))
    drop, threshold, scale = _dropout_args(dropout_p, seed)
    bm, bn, num_warps, looped = fwd_config(n, drop)
    # one tile per program (a fine-grained tail) up to _FWD_MAX_PROGRAMS programs
    per = bm * triton.cdiv(triton.cdiv(rows, bm), _FWD_MAX_PROGRAMS) if not looped else bm
    wrap_triton(_ln_fwd_kernel)[(triton.cdiv(rows, per),)](
        x, residual, weight.contiguous(), bias.contiguous(), x if x_bias is None else x_bias.contiguous(),
        seed if drop else x, y, mean, rstd, rows, n, per, float(eps), threshold, scale,
        HAS_XBIAS=x_bias is not None, DROPOUT=drop, GROUPED=n % 64 == 0, LOOPED=looped,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=num_warps)
    return y, mean, rstd


@define("fastbert::layernorm_residual_bwd_triton", _fake_bwd)
def layernorm_residual_bwd_triton(grad: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                                  weight: torch.Tensor, x_bias: Optional[torch.Tensor], mean: torch.Tensor,
                                  rstd: torch.Tensor, dropout_p: float, seed: Optional[torch.Tensor]
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_bwd(grad, x, residual, weight, x_bias, mean, rstd, dropout_p, seed)
    grad, x, residual = grad.contiguous(), x.contiguous(), residual.contiguous()
    mean, rstd, weight = mean.contiguous(), rstd.contiguous(), weight.contiguous()
    drop, threshold, scale = _dropout_args(dropout_p, seed)
    n, rows = x.shape[-1], mean.numel()
    dres = torch.empty_like(x)
    dx = torch.empty_like(x) if drop else x.new_empty((0,))
    if rows == 0 or n == 0:  # sums over no rows are 0
        dxb = torch.zeros_like(x_bias, memory_format=torch.contiguous_format) if x_bias is not None \
            else x.new_empty((0,))
        return dres, dx, torch.zeros_like(weight), torch.zeros_like(weight), dxb
    xb = x if x_bias is None else x_bias.contiguous()
    seed_arg = seed if drop else x
    flags = dict(HAS_XBIAS=x_bias is not None, DROPOUT=drop, GROUPED=n % 64 == 0)
    bm, bn, num_warps, looped = bwd_config(n, drop)
    stats = mean  # not read unless looped
    if looped:  # rows longer than a block: their sums mean(g), mean(g s_hat) first
        stats = mean.new_empty((rows, 2))
        wrap_triton(_ln_bwd_stats_kernel)[(rows,)](
            grad, x, residual, weight, xb, seed_arg, mean, rstd, stats, rows, n, threshold, scale,
            **flags, BLOCK_M=1, BLOCK_N=bn, num_warps=num_warps)
    per = rows_per_program(rows, bm)
    n_blocks = triton.cdiv(rows, per)
    k = 3 if x_bias is not None else 2
    partial = mean.new_empty((n_blocks, k, n))  # stage 1 workspace (fp32)
    wrap_triton(_ln_bwd_kernel)[(n_blocks, triton.cdiv(n, bn))](
        grad, x, residual, weight, xb, seed_arg, mean, rstd, stats, dres, dx if drop else x, partial,
        rows, n, per, threshold, scale, **flags, LOOPED=looped, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=num_warps)
    # stage 2: fixed-order sums of the row-block partials, cast to the parameters' dtypes
    dw, db = torch.empty_like(weight), torch.empty_like(weight)
    dxb = x_bias.new_empty((n,)) if x_bias is not None else x.new_empty((0,))
    block_r, block_nr, warps_r = reduce_config(n_blocks)
    wrap_triton(_ln_param_reduce_kernel)[(triton.cdiv(n, block_nr), k)](
        partial, dw, db, dxb if x_bias is not None else partial, n_blocks, n, HAS_XBIAS=x_bias is not None,
        BLOCK_R=block_r, BLOCK_N=block_nr, num_warps=warps_r)
    return dres, dx, dw, db, dxb


_library.register_autograd("fastbert::layernorm_residual_fwd_triton",
                           torch.ops.fastbert.layernorm_residual_bwd_triton.default, setup_context, backward)


# ------------------------------------------------------------------------ ahead-of-time compile list

def _aot_specs():
    """The specialisations to compile ahead of time (fastbert/triton/aot.py), as the launchers produce
    them for contiguous, 16-byte-aligned tensors. BERT's 768 and 1024 share one config per pass; on
    it: each x dtype with and without dropout (x_bias of x's dtype), bf16 x with fp32 parameters and
    x_bias (autocast master weights), fp16 without x_bias. Then where registers are tightest: the
    widest rows that fit, the looped kernels, per-element counters (n % 64 != 0), the reduction.
    """
    specs = []

    def add(kernel, label, sig, constexprs, num_warps, div16):
        blocks = "x".join(f"{v}" for k, v in constexprs.items() if k.startswith("BLOCK_"))
        specs.append(dict(name=f"{kernel.__name__.strip('_')}[{label},{blocks},w{num_warps}]",
                          kernel=kernel, signature=sig, constexprs=constexprs,
                          num_warps=num_warps, num_stages=1, divisible_by_16=div16))

    def common(n, x, w, xb, drop, names):
        ptrs = dict(x_ptr=x, res_ptr=x, dy_ptr=x, y_ptr=x, dres_ptr=x, dx_ptr=x, w_ptr=w, b_ptr=w,
                    xb_ptr=xb or x, seed_ptr="i64" if drop else x)
        sig = {a: f"*{ptrs.get(a, 'fp32')}" if a.endswith("_ptr") else
               ("fp32" if a in ("eps", "scale") else "i32") for a in names}
        div16 = tuple(a for a in names if a.endswith("_ptr")) + (("n",) if n % 16 == 0 else ())
        label = f"n={n},x={x},w={w},xb={xb},{'dropout' if drop else 'no-dropout'}"
        return label, sig, div16, dict(HAS_XBIAS=xb is not None, DROPOUT=drop, GROUPED=n % 64 == 0)

    def args(kernel):  # runtime arguments (the constexprs are the UPPER_CASE ones)
        return [a for a in kernel.arg_names if not a.isupper()]

    def fwd(n, x, w, xb, drop):
        bm, bn, nw, looped = fwd_config(n, drop)
        label, sig, div16, flags = common(n, x, w, xb, drop, args(_ln_fwd_kernel))
        add(_ln_fwd_kernel, label, sig, dict(flags, LOOPED=looped, BLOCK_M=bm, BLOCK_N=bn), nw, div16)

    def bwd(n, x, w, xb, drop):
        bm, bn, nw, looped = bwd_config(n, drop)
        if looped:
            label, sig, div16, flags = common(n, x, w, xb, drop, args(_ln_bwd_stats_kernel))
            add(_ln_bwd_stats_kernel, label, sig, dict(flags, BLOCK_M=1, BLOCK_N=bn), nw, div16)
        label, sig, div16, flags = common(n, x, w, xb, drop, args(_ln_bwd_kernel))
        add(_ln_bwd_kernel, label, sig, dict(flags, LOOPED=looped, BLOCK_M=bm, BLOCK_N=bn), nw,
            div16 + ("rows_per_prog",))

    for x in ("fp32", "fp16", "bf16"):
        for drop in (False, True):
            fwd(1024, x, x, x, drop)
            bwd(1024, x, x, x, drop)
    for drop in (False, True):
        fwd(1024, "bf16", "fp32", "fp32", drop)
        bwd(1024, "bf16", "fp32", "fp32", drop)
        fwd(1024, "fp16", "fp16", None, drop)
        bwd(1024, "fp16", "fp16", None, drop)
    for x in ("fp32", "bf16"):
        fwd(_FWD_MAX_N, x, x, x, True)
        bwd(2048, x, x, x, True)
        bwd(_BWD_MAX_N, x, x, x, True)
        fwd(4 * _FWD_MAX_N, x, x, x, True)  # looped
        bwd(4 * _FWD_MAX_N, x, x, x, True)  # stats + looped
    for n in (1000, _FWD_MAX_N // 2 - 1):   # per-element counters
        fwd(n, "bf16", "bf16", "bf16", True)
    for n in (1000, _BWD_MAX_N // 2 - 1):
        bwd(n, "fp32", "fp32", "fp32", True)
    for n_blocks in (1, _MAX_ROW_BLOCKS):
        br, bn, nw = reduce_config(n_blocks)
        for w in ("fp32", "fp16", "bf16"):
            for xb in (None, w):
                sig = {"partial_ptr": "*fp32", "dw_ptr": f"*{w}", "db_ptr": f"*{w}",
                       "dxb_ptr": f"*{xb or 'fp32'}", "n_blocks": "i32", "n": "i32"}
                add(_ln_param_reduce_kernel, f"w={w},xb={xb}", sig,
                    dict(HAS_XBIAS=xb is not None, BLOCK_R=br, BLOCK_N=bn), nw,
                    ("partial_ptr", "dw_ptr", "db_ptr", "dxb_ptr", "n"))
    return specs


AOT_SPECS = _aot_specs()
