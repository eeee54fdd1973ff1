"""Masked-token gather in Triton: ``fastbert::gather_masked_fwd_triton`` / ``_bwd_triton``.

Forward, ``hidden[N, H]``, ``labels[N]`` (any integer dtype; ``ignore_index`` is first
converted to it, wrapping, as torch's ``labels != ignore_index`` does: -100 is 156 for uint8):

1. ``_gather_scan_kernel``, one program: walks the labels in blocks of ``_SCAN_BLOCK`` with a running
   count ``carry``; per block ``sel = label != ignore_index``, the exclusive prefix sum
   ``pos = carry + cumsum(sel) - sel`` gives each selected token its output row. It writes
   ``slot[n] = pos`` (-1 when not selected), ``ws[pos] = n`` and finally ``ws[N] = M``, the count,
   into an int64 workspace ``ws[N + 1]``. One program is enough for BERT's ``N = B * S`` (a few
   thousand to ~100k tokens: a few dozen blocks).
2. The host reads ``M = ws[N]`` (the op's one device-to-host copy) and allocates the outputs.
3. ``_gather_rows_kernel``, a 2-D grid over ``[BLOCK_M rows x BLOCK_N columns]`` tiles of the output:
   ``rows[m] = hidden[ws[m]]``; the first column block also writes ``index[m] = ws[m]`` and
   ``targets[m] = labels[ws[m]]`` (int64).

Backward (``_gather_bwd_kernel``, 2-D tiles over the ``[N, H]`` output): ``out[n] = grad[slot[n]]`` or
zeros when ``slot[n] < 0`` -- every element written once, no separate zero fill.

Why the forward is a plain ``torch.library.custom_op`` and not a ``triton_op``: ``M`` depends on the
labels, so the body must read a count back to the host before it can allocate. torch.compile traces
a ``triton_op``'s body, and there that read is a data-dependent ``.item()`` on a fake tensor (a graph
break, or an unbacked size it would have to guard on), and the launches would be traced with an
unknown grid. As an opaque custom op, compiled graphs call it eagerly, and its ``register_fake``
(``_fake_fwd`` of fastbert/ops/gather_masked.py) gives ``M`` as a fresh data-dependent size from
``torch.library.get_ctx().new_dynamic_size()``, so one graph serves every batch. The backward has
static shapes and is an ordinary ``triton_op`` (``define`` in _common.py).
"""

from typing import Tuple

import torch
import triton
import triton.language as tl

from fastbert.ops import _library
from fastbert.ops.gather_masked import OP, backward, bwd_backward, bwd_setup_context, check_args, setup_context
from fastbert.ops.gather_masked import _fake_bwd as _ops_fake_bwd
from fastbert.ops.gather_masked import _fake_fwd as _ops_fake_fwd
from fastbert.triton._common import aot_spec, check_device, check_dtypes, define, wrap_triton

_SCAN_BLOCK = 4096  # labels per step of the scan: 16 per thread over 8 warps
_TILE = 4096  # elements per copy tile (4 warps: 32 per thread)


@triton.jit
def _gather_scan_kernel(
    labels_ptr,  # [N] contiguous labels, int64/int32/int16/int8/uint8
    slot_ptr,  # [N] int64 (output): row of token n in `rows`, -1 if not selected
    ws_ptr,  # [N + 1] int64 (output): ws[m] = n of output row m (m < M); ws[N] = M
    N,
    ignore_index,
    BLOCK: tl.constexpr,
):
    carry = tl.zeros([], dtype=tl.int64)  # selected tokens before this block
    for start in range(0, N, BLOCK):
        n = start + tl.arange(0, BLOCK)
        inb = n < N
        lab = tl.load(labels_ptr + n, mask=inb, other=0).to(tl.int64)
        sel = inb & (lab != ignore_index)
        f = sel.to(tl.int32)
        pos = carry + (tl.cumsum(f, 0) - f).to(tl.int64)  # exclusive prefix sum
        tl.store(slot_ptr + n, tl.where(sel, pos, -1), mask=inb)
        tl.store(ws_ptr + pos, n.to(tl.int64), mask=sel)
        carry += tl.sum(f, 0).to(tl.int64)
    tl.store(ws_ptr + N, carry)


@triton.jit
def _gather_rows_kernel(
    hidden_ptr,  # [N, H] contiguous, any float dtype
    labels_ptr,  # [N] contiguous labels (any integer dtype)
    ws_ptr,  # [>= M] int64: source token of each output row (from the scan)
    rows_ptr,  # [M, H] contiguous, hidden's dtype (output)
    targets_ptr,  # [M] int64 (output): labels[ws[m]]
    index_ptr,  # [M] int64 (output): ws[m]
    M,
    H,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # program (pid_m, pid_n): output rows [pid_m*BLOCK_M, +BLOCK_M) x columns [pid_n*BLOCK_N, +BLOCK_N)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < M
    src = tl.load(ws_ptr + r, mask=rmask, other=0)
    if tl.program_id(1) == 0:
        tl.store(index_ptr + r, src, mask=rmask)
        lab = tl.load(labels_ptr + src, mask=rmask, other=0).to(tl.int64)
        tl.store(targets_ptr + r, lab, mask=rmask)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inb = rmask[:, None] & (c < H)[None, :]
    x = tl.load(hidden_ptr + (src[:, None] * H + c[None, :]), mask=inb)
    tl.store(rows_ptr + (r.to(tl.int64)[:, None] * H + c[None, :]), x, mask=inb)


@triton.jit
def _gather_bwd_kernel(
    grad_ptr,  # [M, H] contiguous: gradient of rows
    slot_ptr,  # [N] int64: row of token n in grad, -1 if not selected
    out_ptr,  # [N, H] contiguous, grad's dtype (output): gradient of hidden
    N,
    H,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # out[n, c] = grad[slot[n], c] if slot[n] >= 0 else 0 (the transpose of the gather)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < N
    s = tl.load(slot_ptr + r, mask=rmask, other=-1)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = (c < H)[None, :]
    g = tl.load(grad_ptr + (s[:, None] * H + c[None, :]), mask=(s >= 0)[:, None] & cmask, other=0.0)
    tl.store(out_ptr + (r.to(tl.int64)[:, None] * H + c[None, :]), g, mask=rmask[:, None] & cmask)


def tile_config(h):
    """``(BLOCK_M, BLOCK_N, num_warps)`` of the copy tiles for rows of ``h`` elements: up to 256
    columns (768 and 1024 split exactly), rows to fill ``_TILE`` elements."""
    bn = min(256, triton.next_power_of_2(max(h, 1)))
    return max(1, _TILE // bn), bn, 4


def _grid(rows, h, bm, bn):
    return (triton.cdiv(rows, bm), max(1, triton.cdiv(h, bn)))


# ------------------------------------------------------------------------------------------- ops


def _check(hidden, labels, ignore_index):
    check_args(hidden, labels, ignore_index)
    if hidden.dim() != 2:
        raise ValueError(
            f"{OP} (triton forward): hidden must be [N, H] with labels [N], got hidden {list(hidden.shape)}"
        )
    check_dtypes(f"{OP} (triton forward)", hidden=hidden)
    check_device(hidden, f"{OP} (triton forward)")


def _check_bwd(grad, slot):
    check_dtypes(f"{OP} (triton backward)", grad=grad)
    if grad.dim() != 2 or slot.dim() != 1 or slot.dtype != torch.int64 or slot.device != grad.device:
        raise ValueError(
            f"{OP} backward: grad must be [M, H] and slot [N] int64 on grad's device, got grad "
            f"{list(grad.shape)} on {grad.device}, slot {slot.dtype} {list(slot.shape)} on "
            f"{slot.device}"
        )
    check_device(grad, f"{OP} (triton backward)")


def _fake_fwd(hidden, labels, ignore_index):
    _check(hidden, labels, ignore_index)
    return _ops_fake_fwd(hidden, labels, ignore_index)


def _fake_bwd(grad, slot):
    _check_bwd(grad, slot)
    return _ops_fake_bwd(grad, slot)


@torch.library.custom_op(
    "fastbert::gather_masked_fwd_triton",
    mutates_args=(),
    schema="(Tensor hidden, Tensor labels, int ignore_index) -> (Tensor, Tensor, Tensor, Tensor)",
    **_library.sync_tags_kwargs(),
)  # reads M back: torch.Tag.cudagraph_unsafe
def gather_masked_fwd_triton(
    hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(hidden, labels, ignore_index)
    hidden, labels = hidden.contiguous(), labels.contiguous()
    n, h = hidden.shape
    slot = torch.empty(n, dtype=torch.int64, device=hidden.device)
    m = 0
    if n:
        ws = torch.empty(n + 1, dtype=torch.int64, device=hidden.device)
        ignore = int(torch.tensor(ignore_index).to(labels.dtype))  # in the labels' type, as torch compares
        _gather_scan_kernel[(1,)](labels, slot, ws, n, ignore, BLOCK=_SCAN_BLOCK, num_warps=8)
        m = int(ws[n])  # the one device-to-host copy: M sizes the outputs
    rows = hidden.new_empty((m, h))
    targets = torch.empty(m, dtype=torch.int64, device=hidden.device)
    index = torch.empty_like(targets)
    if m:
        bm, bn, num_warps = tile_config(h)
        _gather_rows_kernel[_grid(m, h, bm, bn)](
            hidden, labels, ws, rows, targets, index, m, h, BLOCK_M=bm, BLOCK_N=bn, num_warps=num_warps
        )
    return rows, targets, index, slot


gather_masked_fwd_triton.register_fake(_fake_fwd)


@define("fastbert::gather_masked_bwd_triton", _fake_bwd)
def gather_masked_bwd_triton(grad: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    _check_bwd(grad, slot)
    grad, slot = grad.contiguous(), slot.contiguous()
    n, h = slot.shape[0], grad.shape[1]
    out = grad.new_empty((n, h))
    if n == 0 or h == 0:
        return out
    bm, bn, num_warps = tile_config(h)
    wrap_triton(_gather_bwd_kernel)[_grid(n, h, bm, bn)](
        grad, slot, out, n, h, BLOCK_M=bm, BLOCK_N=bn, num_warps=num_warps
    )
    return out


_library.register_autograd(
    "fastbert::gather_masked_fwd_triton",
    torch.ops.fastbert.gather_masked_bwd_triton.default,
    setup_context,
    backward,
    double_backward=True,
)
_library.register_autograd(
    "fastbert::gather_masked_bwd_triton",
    torch.ops.fastbert.gather_masked_fwd_triton.default,
    bwd_setup_context,
    bwd_backward,
    double_backward=True,
)


# ------------------------------------------------------------------------ ahead-of-time compile list


def _aot_specs():
    """BERT's N = B * S = 4096 tokens with H = 768 (base) and 1024 (large): the scan for int64 and
    int32 labels, the row copy and the backward for every hidden dtype, as the launchers produce
    them for contiguous 16-byte-aligned tensors (M is data dependent: any value, so not a multiple
    of 16; ignore_index -100 is an i32)."""
    specs = []
    for lab in ("i64", "i32"):
        specs.append(
            aot_spec(
                _gather_scan_kernel,
                f"N=4096,labels={lab}",
                {"labels_ptr": f"*{lab}", "slot_ptr": "*i64", "ws_ptr": "*i64", "N": "i32", "ignore_index": "i32"},
                dict(BLOCK=_SCAN_BLOCK),
                8,
                ("labels_ptr", "slot_ptr", "ws_ptr", "N"),
            )
        )
    for h in (768, 1024):
        bm, bn, nw = tile_config(h)
        for s in ("fp32", "fp16", "bf16"):
            specs.append(
                aot_spec(
                    _gather_rows_kernel,
                    f"H={h},{s}",
                    {
                        "hidden_ptr": f"*{s}",
                        "labels_ptr": "*i64",
                        "ws_ptr": "*i64",
                        "rows_ptr": f"*{s}",
                        "targets_ptr": "*i64",
                        "index_ptr": "*i64",
                        "M": "i32",
                        "H": "i32",
                    },
                    dict(BLOCK_M=bm, BLOCK_N=bn),
                    nw,
                    ("hidden_ptr", "labels_ptr", "ws_ptr", "rows_ptr", "targets_ptr", "index_ptr", "H"),
                )
            )
            specs.append(
                aot_spec(
                    _gather_bwd_kernel,
                    f"N=4096,H={h},{s}",
                    {"grad_ptr": f"*{s}", "slot_ptr": "*i64", "out_ptr": f"*{s}", "N": "i32", "H": "i32"},
                    dict(BLOCK_M=bm, BLOCK_N=bn),
                    nw,
                    ("grad_ptr", "slot_ptr", "out_ptr", "N", "H"),
                )
            )
    return specs


AOT_SPECS = _aot_specs()
