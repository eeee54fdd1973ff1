"""Cross-entropy over logits chunks in Triton: ``fastbert::linear_cross_entropy_fwd_triton`` /
``_bwd_triton``, the fused step of fastbert/ops/linear_cross_entropy.py.

Per row ``i`` of the ``[c, V]`` logits ``x`` (fp32 maths whatever the storage dtype), target ``t``:

* ``lse = m + log(s)``, ``m = max_j x_j``, ``s = sum_j exp(x_j - m)``; rows longer than one block are
  streamed in ``BLOCK_V`` chunks with an online max and a sum rescaled by ``exp(m_old - m_new)``
  whenever the max grows (an all ``-inf`` prefix keeps ``s = 0``).
* ``loss = (m - x_t) + log(s)``, 0 when ``t == ignore_index``; a target outside ``[0, V)`` is never read
  (its loss is NaN). The forward loads ``x_t`` directly; the backward picks it out of the tiles
  it already loaded (a per-lane ``where(j == t, x, 0)`` summed once per row) instead: it
  overwrites the logits, and no thread may read an element another thread has already rewritten.
* backward, in place: ``x_j <- (exp((x_j - m) - log s) - [j == t]) * row_scale[i]`` (the gradient of
  ``sum_i row_scale[i] loss_i``), rounded to the logits' dtype; zeros on ignored rows. A streamed
  row takes a second pass over its chunks, each thread rewriting the elements it reads.

Launch: rows up to ``_MAX_BLOCK_V`` logits are one power-of-two block in registers (16 elements per
thread over 4 to 8 warps, several rows per program when ``V`` is small: V = 7 -> 256 rows,
129 -> 8, 8000 -> 1 row over 8 warps, 32 per thread); longer rows (BERT's 30522) stream in chunks of
``_STREAM_BLOCK_V``, one row per program (the backward in ``_STREAM_BWD_BLOCK_V``). The grid is
``cdiv(c, BLOCK_M)`` programs.

Waves: a streamed chunk of ``c`` rows is ``c`` programs of 8 warps, and the default chunk of BERT's
vocabulary (fastbert/ops/linear_cross_entropy.py, ~24 MiB: 400 fp16/bf16 rows, 192 fp32) should run
in one wave on an A100 (108 SMs) and an H100 (132). The forward (32 registers: 8 programs an SM by
threads) takes 864 / 1056 rows a wave. The backward with 4096-column chunks took 74-96 registers
(2-3 programs an SM: 216-324 / 264-396 rows), so 400 rows made two waves, the second of 4 to 184
rows; with 2048-column chunks it takes 40-48 registers (AOT, sm_80 / sm_90: 5-6 programs an SM, 540+
rows a wave) and keeps about the same bytes in flight per SM (5-6 x 8 instead of 2-3 x 16 elements
a thread).
"""

from typing import Tuple

import torch
import triton

from fastbert.ops.linear_cross_entropy import OP, TARGET_DTYPES
from fastbert.ops.linear_cross_entropy import _fake_bwd as _ops_fake_bwd
from fastbert.ops.linear_cross_entropy import _fake_fwd as _ops_fake_fwd
from fastbert.triton._common import aot_spec, check_device, check_dtypes, define, wrap_triton
from fastbert.triton._linear_cross_entropy_kernels import _ce_bwd_kernel, _ce_fwd_kernel

_MAX_BLOCK_V = 8192  # longer rows: streamed
_STREAM_BLOCK_V = 4096  # streaming chunk: 16 elements per thread over 8 warps
_STREAM_BWD_BLOCK_V = 2048  # the backward's: 8 per thread, <= 48 registers (see Waves above)


def block_config(v, backward=False):
    """``(BLOCK_M, BLOCK_V, num_warps, one_block)`` for rows of ``v`` logits: one power-of-two block
    with 16 elements per thread (32 at 8192) over 4 to 8 warps and as many rows as fill it, or one
    row per program streamed in ``_STREAM_BLOCK_V`` chunks (``_STREAM_BWD_BLOCK_V`` for the
    ``backward``)."""
    if v > _MAX_BLOCK_V:
        return 1, _STREAM_BWD_BLOCK_V if backward else _STREAM_BLOCK_V, 8, False
    bv = triton.next_power_of_2(max(v, 1))
    num_warps = min(8, max(4, bv // 512))
    bm = min(256, max(1, num_warps * 32 * 16 // bv))
    if backward and v % 16:  # unaligned rows: half the rows (4 rows of 512 spilled on sm_90)
        bm = max(1, bm // 2)
    return bm, bv, num_warps, True


# ------------------------------------------------------------------------------------------- ops


def _check(logits, targets, row_scale, ignore_index, op):
    what = f"{OP} ({op})"
    check_dtypes(what, logits=logits)
    if logits.dim() != 2:
        raise ValueError(f"{what}: logits must be [rows, vocab], got {list(logits.shape)}")
    if targets.dtype not in TARGET_DTYPES or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"{what}: targets must be int64 or int32 of shape [{logits.shape[0]}], got "
            f"{targets.dtype} of shape {list(targets.shape)}"
        )
    if row_scale is not None and (row_scale.shape != logits.shape[:1] or not row_scale.is_floating_point()):
        raise ValueError(
            f"{what}: row_scale must be a float tensor of shape [{logits.shape[0]}], got "
            f"{row_scale.dtype} of shape {list(row_scale.shape)}"
        )
    for name, t in (("targets", targets), ("row_scale", row_scale)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{what}: {name} is on {t.device}, logits on {logits.device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"{what}: ignore_index must be an int, got {ignore_index!r}")
    check_device(logits, what)


def _fake_fwd(logits, targets, ignore_index):
    _check(logits, targets, None, ignore_index, "triton forward")
    return _ops_fake_fwd(logits, targets, ignore_index)


def _fake_bwd(logits, targets, row_scale, ignore_index):
    _check(logits, targets, row_scale, ignore_index, "triton backward")
    return _ops_fake_bwd(logits, targets, row_scale, ignore_index)


def _stats(logits):
    return (
        torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device),
        torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device),
    )


@define(
    "fastbert::linear_cross_entropy_fwd_triton",
    _fake_fwd,
    schema="(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor)",
)
def linear_cross_entropy_fwd_triton(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    _check(logits, targets, None, ignore_index, "triton forward")
    logits, targets = logits.contiguous(), targets.contiguous()
    loss, lse = _stats(logits)
    rows, v = logits.shape
    if rows == 0:
        return loss, lse
    bm, bv, num_warps, _ = block_config(v)
    wrap_triton(_ce_fwd_kernel)[(triton.cdiv(rows, bm),)](
        logits, targets, loss, lse, rows, v, ignore_index, BLOCK_M=bm, BLOCK_V=bv, num_warps=num_warps
    )
    return loss, lse


@define(
    "fastbert::linear_cross_entropy_bwd_triton",
    _fake_bwd,
    mutates_args=("logits",),
    schema="(Tensor(a!) logits, Tensor targets, Tensor row_scale, int ignore_index) -> (Tensor, Tensor)",
)
def linear_cross_entropy_bwd_triton(
    logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    _check(logits, targets, row_scale, ignore_index, "triton backward")
    targets, row_scale = targets.contiguous(), row_scale.to(torch.float32).contiguous()
    loss, lse = _stats(logits)
    rows, v = logits.shape
    if rows == 0:
        return loss, lse
    work = logits if logits.is_contiguous() else logits.contiguous()  # written in place, then copied back
    bm, bv, num_warps, one_block = block_config(v, backward=True)
    wrap_triton(_ce_bwd_kernel)[(triton.cdiv(rows, bm),)](
        work,
        targets,
        row_scale,
        loss,
        lse,
        rows,
        v,
        ignore_index,
        ONE_BLOCK=one_block,
        BLOCK_M=bm,
        BLOCK_V=bv,
        num_warps=num_warps,
    )
    if work is not logits:
        logits.copy_(work)
    return loss, lse


# ------------------------------------------------------------------------ ahead-of-time compile list


def _aot_specs():
    """BERT's vocabularies, 30522 (streamed) and 8000 (one block of 8192, the widest in registers),
    for every logits dtype with int64 targets, forward and backward, as the launchers produce them
    for contiguous 16-byte-aligned chunks (ignore_index -100 is an i32); plus int32 targets and a
    small vocabulary (many rows per program)."""
    specs = []

    def add(v, s, tgt="i64"):
        bm, bv, nw, _ = block_config(v)
        div16 = ("logits_ptr", "targets_ptr", "loss_ptr", "lse_ptr") + (("V",) if v % 16 == 0 else ())
        base = {
            "logits_ptr": f"*{s}",
            "targets_ptr": f"*{tgt}",
            "loss_ptr": "*fp32",
            "lse_ptr": "*fp32",
            "rows": "i32",
            "V": "i32",
            "ignore_index": "i32",
        }
        label = f"V={v},{s},targets={tgt}"
        specs.append(aot_spec(_ce_fwd_kernel, label, base, dict(BLOCK_M=bm, BLOCK_V=bv), nw, div16))
        bm, bv, nw, one = block_config(v, backward=True)
        specs.append(
            aot_spec(
                _ce_bwd_kernel,
                label,
                {**base, "scale_ptr": "*fp32"},
                dict(ONE_BLOCK=one, BLOCK_M=bm, BLOCK_V=bv),
                nw,
                div16 + ("scale_ptr",),
            )
        )

    for v in (30522, 8000):
        for s in ("fp32", "fp16", "bf16"):
            add(v, s)
    add(30522, "bf16", "i32")
    add(129, "bf16")
    return specs


AOT_SPECS = _aot_specs()
