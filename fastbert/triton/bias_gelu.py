"""bias + GELU in Triton: ``fastbert::bias_gelu_fwd_triton`` / ``fastbert::bias_gelu_bwd_triton``.

Maths (fp32 whatever the storage dtype; ``z = x + bias``):

* exact    ``y = z Phi(z)``, ``Phi(z) = (1 + erf(z / sqrt 2)) / 2`` (computed from erfc, see _normal_cdf);
           ``gelu'(z) = Phi(z) + z phi(z)``, ``phi(z) = exp(-z^2 / 2) / sqrt(2 pi)``.
* tanh     ``y = z s``, ``s = (1 + tanh u) / 2 = sigmoid(2u)``, ``u = sqrt(2/pi) (z + 0.044715 z^3)``;
           ``gelu'(z) = s + 2 z s (1 - s) u'``, ``u' = sqrt(2/pi) (1 + 3 * 0.044715 z^2)``.
           With ``e = exp(-2|u|)`` (in (0, 1], never overflows) and ``r = 1 / (1 + e)``:
           ``s = r`` for ``u >= 0`` and ``e r`` for ``u < 0``, and ``s (1 - s) = e r^2`` -- no
           cancellation and no inf * 0 for large ``|z|`` (libdevice tanh is not available in the
           interpreter, so tanh is built from ``exp2``).

The arithmetic is the CUDA kernel's (csrc/cuda/bias_gelu_kernel.cu) operation for operation, so the
two GPU backends agree to the ulp: the same fitted rationals (exact GELU: Phi from an erfcx rational,
gelu' from one rational in ``z / sqrt 2``), the same expressions in the same order, and the same PTX
for the two non-IEEE steps: fp32 ``/`` is ``div.full.f32`` (2 ulp; the CUDA kernel emits it by inline
asm) and every exponential is ``tl.exp2`` of a pre-scaled argument, ``ex2.approx.ftz.f32`` (inline
asm there too). Not ``tl.div_rn``: IEEE ``div.rn.f32`` has a slow-path call that made the CUDA
elementwise kernel spill at its 32-register budget. NaN and +-inf ``z`` give a NaN gradient, as
torch's does.

Backward recomputes ``z`` from ``x`` and ``bias`` and writes ``dx = dy gelu'(z)``. ``dbias`` (the column
sums of ``dx``) is reduced deterministically in two stages and without atomics: the backward kernel
walks a fixed block of rows per program and writes that block's fp32 column sums to a workspace
``partial[n_row_blocks, n]``; a second kernel adds the row blocks up in order and casts to bias's
dtype. The row blocking depends on the shape only, so dbias is bitwise reproducible.

Tiles are ``[BLOCK_M rows, BLOCK_N columns]`` of ``_TILE`` elements over a 2-D grid
(row blocks x column blocks), so any ``n`` works: columns beyond one block go to further programs.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastbert.ops import _library
from fastbert.ops.bias_gelu import _fake_bwd as _ops_fake_bwd
from fastbert.ops.bias_gelu import _fake_fwd as _ops_fake_fwd
from fastbert.ops.bias_gelu import backward, check_args, setup_context
from fastbert.triton._common import aot_spec, check_device, check_dtypes, define, for_store, wrap_triton


@triton.jit
def _gelu(z, APPROX_TANH: tl.constexpr):
    """gelu(z) for fp32 z; the CUDA kernel's arithmetic (csrc/cuda/bias_gelu_kernel.cu gelu)."""
    if APPROX_TANH:
        u = 0.7978845608028654 * z * (1.0 + 0.044715 * z * z)
        e = tl.exp2(-2.8853900817779268 * tl.abs(u))  # exp(-2|u|) in (0, 1]: never overflows
        # z sigmoid(2u) = z / (1 + e) for u >= 0, z e / (1 + e) for u < 0
        return tl.where(u >= 0.0, z, z * e) / (1.0 + e)
    else:
        return z * _normal_cdf(z)


@triton.jit
def _normal_cdf(z):
    """Phi(z) without cancellation, as the CPU and CUDA kernels compute it: a = |z| / sqrt 2 (clamped
    at 9, erfc(a) / 2 taken as 0 beyond: the clamped value made z Phi(z) -62 for z = -3e38 where eager
    gives -0; -inf gives NaN = -inf * 0, as eager), erfc(a) = exp(-a^2) P(a) / Q(a) (erfcx fitted to
    7e-8 relative, scripts/fit_gelu.py), Phi = erfc(a) / 2 for z < 0 and 1 - erfc(a) / 2 otherwise
    (0.5 + erf / 2 cancels in the tail)."""
    a_raw = tl.abs(z) * 0.7071067811865476
    a = tl.minimum(a_raw, 9.0)
    e = tl.exp2(a * a * -1.4426950408889634)
    p = ((0.037916102900 * a + 0.206855456100) * a + 0.470344796950) * a + 0.499999964150
    q = (((0.1344987700 * a + 0.7316200554) * a + 1.748460695) * a + 2.069064260) * a + 1.0
    h = tl.where(a_raw > 9.0, 0.0, e * p / q)
    return tl.where(z < 0.0, h, 1.0 - h)


@triton.jit
def _gelu_grad(z, APPROX_TANH: tl.constexpr):
    """gelu'(z) for fp32 z; the CUDA kernel's arithmetic (csrc/cuda/bias_gelu_kernel.cu gelu_grad).
    NaN and +-inf z give NaN, as torch's gelu backward does: the clamps would make them finite, so
    ``z - z`` (0 for finite z, NaN otherwise) is added to the clamped argument."""
    if APPROX_TANH:
        # |z| >= 10 saturates (e < 1e-38); the clamp keeps z^2 finite, so 0 * inf cannot occur
        c = tl.minimum(tl.maximum(z, -10.0), 10.0) + (z - z)
        c2 = c * c
        u = 0.7978845608028654 * c * (1.0 + 0.044715 * c2)
        e = tl.exp2(-2.8853900817779268 * tl.abs(u))  # exp(-2|u|)
        r = 1.0 / (1.0 + e)
        s = tl.where(u >= 0.0, r, e * r)  # sigmoid(2u); s (1 - s) = e r^2
        du = 0.7978845608028654 * (1.0 + 0.134145 * c2)  # 0.134145 = 3 * 0.044715
        return s + 2.0 * c * (e * r * r) * du
    else:
        # h(x) = gelu'(z) - 1/2 with x = z / sqrt 2 is odd and tends to 0 like z phi(z): x P(x^2) /
        # Q(x^2) fits it to 6.3e-8 on |x| <= 4.3 (clamped beyond, where |h - 1/2| < 3e-8;
        # scripts/fit_gelu.py backward)
        x = tl.minimum(tl.maximum(z * 0.7071067811865476, -4.3), 4.3) + (z - z)
        x2 = x * x
        p = -2.202739187e-09 * x2 + 1.984200941e-07
        p = p * x2 + -1.614478798e-06
        p = p * x2 + 7.645411882e-04
        p = p * x2 + -1.271909522e-03
        p = p * x2 + 8.187313760e-02
        p = p * x2 + -1.109946955e-01
        p = p * x2 + 1.128379771e00
        q = 2.031874595e-04 * x2 + 2.551617771e-03
        q = q * x2 + 2.463029804e-02
        q = q * x2 + 1.513924648e-01
        q = q * x2 + 5.683082142e-01
        q = q * x2 + 1.0
        return x * p / q + 0.5


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr,  # [rows, n] contiguous, fp32/fp16/bf16
    bias_ptr,  # [n] any float dtype; not read when HAS_BIAS is False (then any valid pointer)
    y_ptr,  # [rows, n] contiguous, x's dtype (output)
    rows,  # number of rows (product of x's leading dims)
    n,  # row length = row stride of x and y, in elements
    HAS_BIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # program (pid_m, pid_n) owns rows [pid_m*BLOCK_M, +BLOCK_M) x columns [pid_n*BLOCK_N, +BLOCK_N)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = c < n
    mask = (r < rows)[:, None] & cmask[None, :]
    offs = r.to(tl.int64)[:, None] * n + c[None, :]  # int64: rows * n may pass 2^31
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        # loaded as a [BLOCK_M, BLOCK_N] broadcast so it lands in x's register layout (a 1-D load
        # gets its own layout and a shared-memory conversion when warps split the rows)
        bptr = bias_ptr + tl.broadcast_to(c[None, :], (BLOCK_M, BLOCK_N))
        z += tl.load(bptr, mask=mask, other=0.0).to(tl.float32)
    y = _gelu(z, APPROX_TANH)
    tl.store(y_ptr + offs, for_store(y, y_ptr), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    dy_ptr,  # [rows, n] contiguous, x's dtype: incoming gradient
    x_ptr,  # [rows, n] contiguous, fp32/fp16/bf16: saved input
    bias_ptr,  # [n] any float dtype; not read when HAS_BIAS is False
    dx_ptr,  # [rows, n] contiguous, x's dtype (output): dx = dy * gelu'(x + bias)
    partial_ptr,  # [cdiv(rows, rows_per_prog), n] fp32 (output, NEED_DBIAS only): per-row-block
    # column sums of dx; not touched when NEED_DBIAS is False
    rows,
    n,  # row length = row stride of dy, x, dx and partial
    rows_per_prog,  # rows each program walks (a multiple of BLOCK_M)
    HAS_BIAS: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # program (pid_m, pid_n): rows [pid_m*rows_per_prog, +rows_per_prog) in steps of BLOCK_M,
    # columns [pid_n*BLOCK_N, +BLOCK_N)
    pid_m = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = c < n
    if HAS_BIAS:  # [BLOCK_M, BLOCK_N] broadcast: x's register layout, no conversion (see forward)
        bptr = bias_ptr + tl.broadcast_to(c[None, :], (BLOCK_M, BLOCK_N))
        b = tl.load(bptr, mask=tl.broadcast_to(cmask[None, :], (BLOCK_M, BLOCK_N)), other=0.0)
        b = b.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row0 = pid_m * rows_per_prog
    row1 = tl.minimum(row0 + rows_per_prog, rows)
    for start in range(row0, row1, BLOCK_M):
        r = start + tl.arange(0, BLOCK_M)
        mask = (r < row1)[:, None] & cmask[None, :]
        offs = r.to(tl.int64)[:, None] * n + c[None, :]
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += b
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = dy * _gelu_grad(z, APPROX_TANH)  # masked lanes: dy = 0, gelu' finite -> dz = 0
        tl.store(dx_ptr + offs, for_store(dz, dx_ptr), mask=mask)
        if NEED_DBIAS:
            acc += dz
    if NEED_DBIAS:
        # stage 1: this row block's column sums (fixed-order tree over the tile's rows)
        tl.store(partial_ptr + pid_m.to(tl.int64) * n + c, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _dbias_reduce_kernel(
    partial_ptr,  # [n_blocks, n] fp32: per-row-block column sums from the backward kernel
    dbias_ptr,  # [n] bias's dtype (output): sum of partial over its rows
    n_blocks,
    n,  # row length = row stride of partial
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # stage 2: program pid sums columns [pid*BLOCK_N, +BLOCK_N) over all row blocks, in a fixed
    # order (BLOCK_R rows at a time, then a tree over the tile's rows)
    c = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = c < n
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_blocks, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        mask = (r < n_blocks)[:, None] & cmask[None, :]
        acc += tl.load(partial_ptr + r.to(tl.int64)[:, None] * n + c[None, :], mask=mask, other=0.0)
    tl.store(dbias_ptr + c, for_store(tl.sum(acc, axis=0), dbias_ptr), mask=cmask)


# ----------------------------------------------------------------------------- launch configuration

# Elementwise tiles: 2048 elements over 4 warps = 16 per thread (two 16-byte loads of fp16/bf16,
# four of fp32); enough bytes in flight per SM on sm_80/sm_90 with several programs resident.
_TILE = 2048
_NUM_WARPS = 4
# the backward's gelu' (a rational of degree 14/10 and a divide per element) over 16 elements per
# thread spilled on sm_90 (80 registers); 8 warps: 8 per thread, ~50 registers
_BWD_WARPS = 8
_MAX_BLOCK_N = 1024
# dbias: at most this many row blocks (fp32 workspace <= _MAX_ROW_BLOCKS * n * 4 bytes). 256 row
# blocks x (n / BLOCK_N) column blocks keeps every SM busy for BERT shapes (e.g. 768 programs of
# 64 rows for 16384 x 3072); the blocking depends on the shape only (reproducible dbias).
_MAX_ROW_BLOCKS = 256
_REDUCE_WARPS = 4


def block_config(n):
    """``(BLOCK_M, BLOCK_N, num_warps)`` for rows of length ``n`` (``BLOCK_M * BLOCK_N == _TILE``).

    ``BLOCK_N`` is the largest of 1024/512/256 that divides ``n`` (no masked lanes: 768 -> 256,
    3072 and 4096 -> 1024), else the next power of two of ``n`` capped at 1024 (127 -> 128,
    1023 -> 1024; longer rows take several column blocks).
    """
    for bn in (1024, 512, 256):
        if n % bn == 0:
            block_n = bn
            break
    else:
        block_n = min(triton.next_power_of_2(max(n, 1)), _MAX_BLOCK_N)
    return _TILE // block_n, block_n, _NUM_WARPS


def reduce_config(n_blocks):
    """``(BLOCK_R, BLOCK_N, num_warps)`` for summing ``n_blocks`` dbias partials (2048-element tiles).

    Few partials (small inputs): one pass over wide column blocks. Many: 32 partials per step over
    64 columns, so a program's serial loop stays short (8 steps for 256) and more programs share n.
    """
    return (8, 256, _REDUCE_WARPS) if n_blocks <= 8 else (32, 64, _REDUCE_WARPS)


def rows_per_program(rows, block_m):
    """Rows each backward program reduces into one dbias partial: a multiple of ``block_m``."""
    per = triton.cdiv(triton.cdiv(rows, _MAX_ROW_BLOCKS), block_m) * block_m
    return max(per, block_m)


# ------------------------------------------------------------------------------------------- ops


def _check(x, bias, approximate, op):
    check_args(x, bias, approximate)
    check_dtypes(f"bias_gelu ({op})", x=x, bias=bias)
    check_device(x, f"bias_gelu ({op})")


def _check_bwd(grad, x, bias, approximate):
    _check(x, bias, approximate, "triton backward")
    if grad.shape != x.shape:
        raise ValueError(f"bias_gelu backward: grad has shape {list(grad.shape)} but x has shape {list(x.shape)}")
    if grad.dtype != x.dtype:
        raise ValueError(f"bias_gelu backward: grad dtype {grad.dtype} differs from x dtype {x.dtype}")
    if grad.device != x.device:
        raise ValueError(f"bias_gelu backward: grad is on {grad.device} but x is on {x.device}")


def _fake_fwd(x, bias, approximate):
    _check(x, bias, approximate, "triton forward")
    return _ops_fake_fwd(x, bias, approximate)


def _fake_bwd(grad, x, bias, approximate, need_dbias):
    _check_bwd(grad, x, bias, approximate)
    return _ops_fake_bwd(grad, x, bias, approximate, need_dbias)


@define("fastbert::bias_gelu_fwd_triton", _fake_fwd)
def bias_gelu_fwd_triton(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    _check(x, bias, approximate, "triton forward")
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.shape[-1]
    if x.numel() == 0:
        return y
    rows = x.numel() // n
    block_m, block_n, num_warps = block_config(n)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n))
    wrap_triton(_bias_gelu_fwd_kernel)[grid](
        x,
        x if bias is None else bias.contiguous(),
        y,
        rows,
        n,
        HAS_BIAS=bias is not None,
        APPROX_TANH=approximate == "tanh",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y


@define("fastbert::bias_gelu_bwd_triton", _fake_bwd)
def bias_gelu_bwd_triton(
    grad: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str, need_dbias: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_bwd(grad, x, bias, approximate)
    x, grad = x.contiguous(), grad.contiguous()
    want_db = need_dbias and bias is not None
    dx = torch.empty_like(x)
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    if rows == 0 or n == 0:  # nothing to launch; the sum over no rows is 0
        dbias = torch.zeros_like(bias, memory_format=torch.contiguous_format) if want_db else x.new_empty((0,))
        return dx, dbias
    block_m, block_n, _ = block_config(n)
    per = rows_per_program(rows, block_m) if want_db else block_m
    n_blocks = triton.cdiv(rows, per)
    # stage 1 workspace; without dbias the kernel never touches it (x stands in as the pointer:
    # not dx, so no output is passed twice to a kernel that torch.compile sees mutate it)
    partial = x.new_empty((n_blocks, n), dtype=torch.float32) if want_db else x
    wrap_triton(_bias_gelu_bwd_kernel)[(n_blocks, triton.cdiv(n, block_n))](
        grad,
        x,
        x if bias is None else bias.contiguous(),
        dx,
        partial,
        rows,
        n,
        per,
        HAS_BIAS=bias is not None,
        NEED_DBIAS=want_db,
        APPROX_TANH=approximate == "tanh",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=_BWD_WARPS,
    )
    if not want_db:
        return dx, x.new_empty((0,))
    # stage 2: fixed-order sum of the row-block partials, cast to bias's dtype
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format)
    block_r, block_nr, warps_r = reduce_config(n_blocks)
    wrap_triton(_dbias_reduce_kernel)[(triton.cdiv(n, block_nr),)](
        partial, dbias, n_blocks, n, BLOCK_R=block_r, BLOCK_N=block_nr, num_warps=warps_r
    )
    return dx, dbias


_library.register_autograd(
    "fastbert::bias_gelu_fwd_triton", torch.ops.fastbert.bias_gelu_bwd_triton.default, setup_context, backward
)


# ------------------------------------------------------------------------ ahead-of-time compile list


def _aot_specs():
    """The specialisations to compile ahead of time (fastbert/triton/aot.py), as the launchers
    above produce them for contiguous, 16-byte-aligned tensors with BERT's row lengths (768, 1024,
    3072, 4096: two distinct tile configs). ``divisible_by_16`` names the arguments Triton's launcher
    sees as multiples of 16 there, so the code compiled matches what runs.

    Per tile config: every x dtype x approximation, forward with a bias of x's dtype and backward
    with dbias (the hot paths). On the 3072 config: no bias, an fp32 bias with bf16 x (autocast
    master weights) and backward without dbias. dbias reduction: both configs x dbias dtypes.
    """
    specs = []

    def add(*args):
        specs.append(aot_spec(*args))

    def fwd(n, x, b, tanh):
        bm, bn, nw = block_config(n)
        sig = {"x_ptr": f"*{x}", "bias_ptr": f"*{b or x}", "y_ptr": f"*{x}", "rows": "i32", "n": "i32"}
        add(
            _bias_gelu_fwd_kernel,
            f"x={x},bias={b},{'tanh' if tanh else 'erf'}",
            sig,
            dict(HAS_BIAS=b is not None, APPROX_TANH=tanh, BLOCK_M=bm, BLOCK_N=bn),
            nw,
            ("x_ptr", "bias_ptr", "y_ptr", "n"),
        )

    def bwd(n, x, b, need_db, tanh):
        bm, bn, _ = block_config(n)
        nw = _BWD_WARPS
        sig = {
            "dy_ptr": f"*{x}",
            "x_ptr": f"*{x}",
            "bias_ptr": f"*{b or x}",
            "dx_ptr": f"*{x}",
            "partial_ptr": "*fp32" if need_db else f"*{x}",
            "rows": "i32",
            "n": "i32",
            "rows_per_prog": "i32",
        }
        add(
            _bias_gelu_bwd_kernel,
            f"x={x},bias={b},{'dbias' if need_db else 'no-dbias'},{'tanh' if tanh else 'erf'}",
            sig,
            dict(HAS_BIAS=b is not None, NEED_DBIAS=need_db, APPROX_TANH=tanh, BLOCK_M=bm, BLOCK_N=bn),
            nw,
            ("dy_ptr", "x_ptr", "bias_ptr", "dx_ptr", "partial_ptr", "n") + (("rows_per_prog",) if need_db else ()),
        )  # without dbias it is BLOCK_M

    configs = {}
    for n in (768, 1024, 3072, 4096):
        configs.setdefault(block_config(n), n)
    for tanh in (False, True):
        for n in configs.values():
            for x in ("fp32", "fp16", "bf16"):
                fwd(n, x, x, tanh)
                bwd(n, x, x, True, tanh)
        fwd(3072, "bf16", None, tanh)
        fwd(3072, "bf16", "fp32", tanh)
        bwd(3072, "bf16", None, False, tanh)
        bwd(3072, "bf16", "bf16", False, tanh)
        bwd(3072, "bf16", "fp32", True, tanh)
    for n_blocks in (1, _MAX_ROW_BLOCKS):
        br, bn, nw = reduce_config(n_blocks)
        for t in ("fp32", "fp16", "bf16"):
            add(
                _dbias_reduce_kernel,
                f"dbias={t}",
                {"partial_ptr": "*fp32", "dbias_ptr": f"*{t}", "n_blocks": "i32", "n": "i32"},
                dict(BLOCK_R=br, BLOCK_N=bn),
                nw,
                ("partial_ptr", "dbias_ptr", "n"),
            )
    return specs


AOT_SPECS = _aot_specs()
