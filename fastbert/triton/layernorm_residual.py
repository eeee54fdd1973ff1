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
without atomics: each program walks a fixed block of rows and keeps its fp32 column partials in
registers, writes them to ``partial[n_row_blocks, K, n]``; a second kernel adds the row blocks up in
order. The row blocking is fixed by the shape and the GPU model (one resident wave of programs, see
``wave_programs``), so the sums are bitwise reproducible on a given model of GPU.

Dropout draws from the shared Philox stream (fastbert/philox.py): element ``e`` (flat index into
[rows, n]) takes output ``(e % 64) // 16`` of counter ``16 (e // 64) + e % 16``. When ``n % 64 == 0``
(BERT widths) a tile's counters are generated once per 4 elements and the four outputs interleaved
back into element order (``GROUPED``); otherwise two counters per 4 elements (tiles of 64 columns or
more: a row's columns ``c + 16 k`` span at most two 64-element groups), or one per element under 64.
"""

import functools
from typing import Optional, Tuple

import torch
import triton

from fastbert import philox
from fastbert.ops import _library
from fastbert.ops.layernorm_residual import OP, backward, check_args, dropout_active, setup_context
from fastbert.ops.layernorm_residual import _fake_bwd as _ops_fake_bwd
from fastbert.ops.layernorm_residual import _fake_fwd as _ops_fake_fwd
from fastbert.triton._common import INTERPRET, aot_spec, check_device, check_dtypes, define, wrap_triton
from fastbert.triton._layernorm_residual_kernels import (
    _ln_bwd_kernel,
    _ln_bwd_stats_kernel,
    _ln_fwd_kernel,
    _ln_param_reduce_kernel,
)

# ----------------------------------------------------------------------------- launch configuration

_FWD_MAX_N = 8192  # longer rows: the looped forward (chunks of _LOOP_BLOCK_N)
_BWD_MAX_N = 4096  # longer rows: _ln_bwd_stats_kernel + a 2-D grid of column blocks
_LOOP_BLOCK_N = 2048
_MAX_ROW_BLOCKS = 256  # backward row blocks without a device to size them (interpreter, no CUDA)
_FWD_MAX_PROGRAMS = 32768


def _per_element(n, dropout):
    """Per-element Philox counters (dropout with ``n % 64 != 0``): four times the random numbers,
    so half the elements per thread and half the row length before the looped kernels."""
    return dropout and n % 64 != 0


def fwd_config(n, dropout):
    """``(BLOCK_M, BLOCK_N, num_warps, looped)`` of the forward for rows of length ``n``.

    A row that fits is one power-of-two block of columns; the tile takes enough rows for 16 elements
    per thread (4 with paired or per-element dropout counters) over 4 to 8 warps: 768/1024 -> 2 rows x 1024 over 4
    warps (a thread: one 16-byte vector of x and of residual per row, ~80 registers, 6 programs per
    SM), 8192 -> 1 row over 8 warps (32 per thread).
    """
    # 4 with paired/per-element counters: 8 spilled 4 bytes on sm_80 with triton 3.6 (8 x 128 tile)
    per_thread = 4 if _per_element(n, dropout) else 16
    if n > _FWD_MAX_N * per_thread // 16:
        return 1, _LOOP_BLOCK_N, 8, True
    bn = triton.next_power_of_2(max(n, 1))
    num_warps = min(8, max(4, bn // (32 * per_thread)))
    return max(1, num_warps * 32 * per_thread // bn), bn, num_warps, False


_BWD_MAX_ROWS = 1024


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
    if n % 16:  # unaligned rows: per-element addresses, half the elements (32 a thread spilled)
        per_thread //= 2
    # very short rows: at most _BWD_MAX_ROWS rows a tile (the per-row statistics would spill)
    return max(1, min(_BWD_MAX_ROWS, num_warps * 32 * per_thread // bn)), bn, num_warps, False


def reduce_config(n_blocks):
    """``(BLOCK_R, BLOCK_N, num_warps)`` for summing ``n_blocks`` partials."""
    return (8, 256, 4) if n_blocks <= 8 else (32, 64, 4)


def rows_per_program(rows, block_m, max_blocks=_MAX_ROW_BLOCKS):
    """Rows per backward program (one dweight/dbias/dx_bias partial each): a multiple of ``block_m``
    giving at most ``max_blocks`` row blocks; fixed by its arguments (reproducible sums)."""
    per = triton.cdiv(triton.cdiv(rows, max_blocks), block_m) * block_m
    return max(per, block_m)


def wave_programs(sms, regs_per_sm, threads_per_sm, num_warps):
    """Backward programs of ``num_warps`` warps that a GPU runs at once (one wave).

    programs = SMs x programs per SM; an SM holds as many programs as both its thread slots
    (``threads_per_sm // (32 num_warps)``) and its registers allow. Triton sets no register cap, so
    ptxas may give the backward kernel up to 255 registers a thread, allocated 256 per thread (8192
    a warp): ``regs_per_sm // (256 * 32 num_warps)`` programs fit whatever the compiler chose. That
    bound is the occupancy of the training configs, with dropout and x_bias (196-242 registers on
    sm_80/sm_90 in the AOT table: 2 programs of 4 warps or 1 of 8 per SM on 64K registers), so an
    A100 (108 SMs) runs 216 programs of the BERT config in one wave where 256 made a second, mostly
    idle one; configs that need fewer registers (no dropout: ~150-170, 3 per SM) keep a third of
    their slots free rather than risk a second wave (as 256 programs on an H100, 132 SMs, did).
    """
    threads = 32 * num_warps
    per_sm = min(threads_per_sm // threads, regs_per_sm // (256 * threads))
    return sms * max(1, per_sm)


@functools.lru_cache(maxsize=None)
def _device_wave(index, num_warps):
    """``wave_programs`` of CUDA device ``index``: its properties are queried once per device."""
    p = torch.cuda.get_device_properties(index)
    return wave_programs(
        p.multi_processor_count, p.regs_per_multiprocessor, p.max_threads_per_multi_processor, num_warps
    )


def max_row_blocks(device, num_warps, col_blocks):
    """Backward row blocks for a grid of ``col_blocks`` column blocks: one wave of programs on
    ``device`` (at least one row block), or _MAX_ROW_BLOCKS where no device is queried (the
    interpreter's CPU tensors; CUDA tensors traced without a GPU, e.g. fake tensors)."""
    if INTERPRET or device.type != "cuda" or not torch.cuda.is_available():
        return _MAX_ROW_BLOCKS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, _device_wave(index, num_warps) // col_blocks)


# ------------------------------------------------------------------------------------------- ops


def _check(x, residual, weight, bias, eps, x_bias, dropout_p, seed, op):
    check_args(x, residual, weight, bias, eps, x_bias, dropout_p)
    check_dtypes(f"{OP} ({op})", x=x, weight=weight, x_bias=x_bias)
    if seed is not None and (
        not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device
    ):
        raise ValueError(f"{OP} ({op}): seed must be an int64 tensor with one element on x's device")
    check_device(x, f"{OP} ({op})")


def _check_bwd(grad, x, residual, weight, x_bias, mean, rstd, dropout_p, seed):
    _check(x, residual, weight, weight, 1.0, x_bias, dropout_p, seed, "triton backward")
    for t, name, shape, dtype in (
        (grad, "grad", x.shape, x.dtype),
        (mean, "mean", x.shape[:-1], torch.float32),
        (rstd, "rstd", x.shape[:-1], torch.float32),
    ):
        if t.shape != shape or t.dtype != dtype or t.device != x.device:
            raise ValueError(
                f"{OP} backward: {name} must be {dtype} of shape {list(shape)} on {x.device}, "
                f"got {t.dtype} of shape {list(t.shape)} on {t.device}"
            )


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
def layernorm_residual_fwd_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    x_bias: Optional[torch.Tensor],
    dropout_p: float,
    seed: Optional[torch.Tensor],
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
        x,
        residual,
        weight.contiguous(),
        bias.contiguous(),
        x if x_bias is None else x_bias.contiguous(),
        seed if drop else x,
        y,
        mean,
        rstd,
        rows,
        n,
        per,
        float(eps),
        threshold,
        scale,
        HAS_XBIAS=x_bias is not None,
        DROPOUT=drop,
        GROUPED=n % 64 == 0,
        LOOPED=looped,
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=num_warps,
    )
    return y, mean, rstd


@define("fastbert::layernorm_residual_bwd_triton", _fake_bwd)
def layernorm_residual_bwd_triton(
    grad: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    x_bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dropout_p: float,
    seed: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_bwd(grad, x, residual, weight, x_bias, mean, rstd, dropout_p, seed)
    grad, x, residual = grad.contiguous(), x.contiguous(), residual.contiguous()
    mean, rstd, weight = mean.contiguous(), rstd.contiguous(), weight.contiguous()
    drop, threshold, scale = _dropout_args(dropout_p, seed)
    n, rows = x.shape[-1], mean.numel()
    dres = torch.empty_like(x)
    dx = torch.empty_like(x) if drop else x.new_empty((0,))
    if rows == 0 or n == 0:  # sums over no rows are 0
        dxb = (
            torch.zeros_like(x_bias, memory_format=torch.contiguous_format) if x_bias is not None else x.new_empty((0,))
        )
        return dres, dx, torch.zeros_like(weight), torch.zeros_like(weight), dxb
    xb = x if x_bias is None else x_bias.contiguous()
    seed_arg = seed if drop else x
    flags = dict(HAS_XBIAS=x_bias is not None, DROPOUT=drop, GROUPED=n % 64 == 0)
    bm, bn, num_warps, looped = bwd_config(n, drop)
    stats = mean  # not read unless looped
    if looped:  # rows longer than a block: their sums mean(g), mean(g s_hat) first
        stats = mean.new_empty((rows, 2))
        wrap_triton(_ln_bwd_stats_kernel)[(rows,)](
            grad,
            x,
            residual,
            weight,
            xb,
            seed_arg,
            mean,
            rstd,
            stats,
            rows,
            n,
            threshold,
            scale,
            **flags,
            BLOCK_M=1,
            BLOCK_N=bn,
            num_warps=num_warps,
        )
    per = rows_per_program(rows, bm, max_row_blocks(x.device, num_warps, triton.cdiv(n, bn)))
    n_blocks = triton.cdiv(rows, per)
    k = 3 if x_bias is not None else 2
    partial = mean.new_empty((n_blocks, k, n))  # stage 1 workspace (fp32)
    wrap_triton(_ln_bwd_kernel)[(n_blocks, triton.cdiv(n, bn))](
        grad,
        x,
        residual,
        weight,
        xb,
        seed_arg,
        mean,
        rstd,
        stats,
        dres,
        dx if drop else x,
        partial,
        rows,
        n,
        per,
        threshold,
        scale,
        **flags,
        LOOPED=looped,
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=num_warps,
    )
    # stage 2: fixed-order sums of the row-block partials, cast to the parameters' dtypes
    dw, db = torch.empty_like(weight), torch.empty_like(weight)
    dxb = x_bias.new_empty((n,)) if x_bias is not None else x.new_empty((0,))
    block_r, block_nr, warps_r = reduce_config(n_blocks)
    wrap_triton(_ln_param_reduce_kernel)[(triton.cdiv(n, block_nr), k)](
        partial,
        dw,
        db,
        dxb if x_bias is not None else partial,
        n_blocks,
        n,
        HAS_XBIAS=x_bias is not None,
        BLOCK_R=block_r,
        BLOCK_N=block_nr,
        num_warps=warps_r,
    )
    return dres, dx, dw, db, dxb


_library.register_autograd(
    "fastbert::layernorm_residual_fwd_triton",
    torch.ops.fastbert.layernorm_residual_bwd_triton.default,
    setup_context,
    backward,
)


# ------------------------------------------------------------------------ ahead-of-time compile list


def _aot_specs():
    """The specialisations to compile ahead of time (fastbert/triton/aot.py), as the launchers produce
    them for contiguous, 16-byte-aligned tensors. BERT's 768 and 1024 share one config per pass; on
    it: each x dtype with and without dropout (x_bias of x's dtype), bf16 x with fp32 parameters and
    x_bias (autocast master weights), fp16 without x_bias. Then where registers are tightest: the
    widest rows that fit, the looped kernels, per-element counters (n % 64 != 0), the reduction.
    """
    specs = []

    def add(*args):
        specs.append(aot_spec(*args))

    def common(n, x, w, xb, drop, names):
        ptrs = dict(
            x_ptr=x,
            res_ptr=x,
            dy_ptr=x,
            y_ptr=x,
            dres_ptr=x,
            dx_ptr=x,
            w_ptr=w,
            b_ptr=w,
            xb_ptr=xb or x,
            seed_ptr="i64" if drop else x,
        )
        sig = {
            a: f"*{ptrs.get(a, 'fp32')}" if a.endswith("_ptr") else ("fp32" if a in ("eps", "scale") else "i32")
            for a in names
        }
        div16 = tuple(a for a in names if a.endswith("_ptr")) + (("n",) if n % 16 == 0 else ())
        label = f"n={n},x={x},w={w},xb={xb},{'dropout' if drop else 'no-dropout'}"
        flags = dict(HAS_XBIAS=xb is not None, DROPOUT=drop, GROUPED=n % 64 == 0)
        if n == 1:  # a GPU launch turns an int argument equal to 1 into a constant, as here
            del sig["n"]
            flags["n"] = 1
        return label, sig, div16, flags

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
        add(
            _ln_bwd_kernel,
            label,
            sig,
            dict(flags, LOOPED=looped, BLOCK_M=bm, BLOCK_N=bn),
            nw,
            div16 + ("rows_per_prog",),
        )

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
    for drop in (False, True):  # rows of one element: n == 1 is specialised to a constant
        fwd(1, "fp32", "fp32", "fp32", drop)
        bwd(1, "fp32", "fp32", "fp32", drop)
    for n in (1000, _FWD_MAX_N // 2 - 1):  # per-element counters
        fwd(n, "bf16", "bf16", "bf16", True)
    for n in (1000, _BWD_MAX_N // 2 - 1):
        bwd(n, "fp32", "fp32", "fp32", True)
    for n_blocks in (1, _MAX_ROW_BLOCKS):
        br, bn, nw = reduce_config(n_blocks)
        for w in ("fp32", "fp16", "bf16"):
            for xb in (None, w):
                sig = {
                    "partial_ptr": "*fp32",
                    "dw_ptr": f"*{w}",
                    "db_ptr": f"*{w}",
                    "dxb_ptr": f"*{xb or 'fp32'}",
                    "n_blocks": "i32",
                    "n": "i32",
                }
                add(
                    _ln_param_reduce_kernel,
                    f"w={w},xb={xb}",
                    sig,
                    dict(HAS_XBIAS=xb is not None, BLOCK_R=br, BLOCK_N=bn),
                    nw,
                    ("partial_ptr", "dw_ptr", "db_ptr", "dxb_ptr", "n"),
                )
    return specs


AOT_SPECS = _aot_specs()
