"""Unpadded execution: select a padded batch's real tokens once, run token-wise layers on them, pad back.

``packing(attention_mask)`` reads the mask once (as flash-attention's ``unpad_input``) and returns a
:class:`Packing`: ``indices[T]`` (int64 flat positions of the real tokens in ``[B * S]``, row-major),
``cu_seqlens[B + 1]`` (int32, starts at 0), ``max_seqlen`` (int), ``slot[B * S]`` (int64: the packed row
of each position, -1 for padding) and the padded shape. Any mask layout is valid: right or left
padding, holes, rows with no real token (length 0: nothing of them is computed, and :func:`pad`
gives them zeros).

``unpad(x, packing)`` -> ``x[B, S, ...]`` as ``[T, ...]`` and ``pad(rows, packing)`` -> ``[B, S, ...]``
(zeros at padding) are one row-copy op, ``fastbert::unpad_rows(x, index, inverse, backend)``: output row
``i`` is ``x[index[i]]``, zeros where ``index[i] < 0``, every row written once by the backend's kernel
(the one-pass backward kernel of :mod:`fastbert.ops.gather_masked`, ``out[n] = x[slot[n]]``). ``unpad``
copies with ``index = indices``, ``pad`` with ``index = slot``; the gradient of each is the copy with
the other index, so both are differentiable in one pass (and so are their gradients). Integer
tensors (token ids) are indexed directly.

Host reads (CUDA): ``packing`` reads the number of real tokens ``T`` (``nonzero``) and ``max_seqlen``
back to the host, once per batch: they size everything after it (flash-attention's ``unpad_input``
does the same). ``unpad`` and ``pad`` have static output shapes (``T`` is known) and read nothing
back, forward or backward, so they can run inside CUDA graphs.
"""

import math
from typing import NamedTuple

import torch

from fastbert import backends, reference
from fastbert.ops import _checks
from fastbert.ops.gather_masked import OP as GATHER

OP = "unpad"


class Packing(NamedTuple):
    indices: torch.Tensor  # [T] int64: flat positions of the real tokens in [B * S]
    cu_seqlens: torch.Tensor  # [B + 1] int32: sequence b is packed rows cu_seqlens[b] : cu_seqlens[b + 1]
    max_seqlen: int  # the longest sequence
    slot: torch.Tensor  # [B * S] int64: packed row of each position, -1 for padding
    batch: int
    seqlen: int

    @property
    def total(self):
        return self.indices.shape[0]


def packing(attention_mask):
    """The :class:`Packing` of a ``[batch, seq]`` mask (bool, integer or float; nonzero = real token)."""
    _checks.tensor(attention_mask, OP, "attention_mask")
    if attention_mask.dim() != 2:
        raise ValueError(
            f"{OP}: attention_mask must be 2-D [batch, seq] (1 = token, 0 = padding), got shape "
            f"{list(attention_mask.shape)}"
        )
    if attention_mask.is_complex():
        raise ValueError(f"{OP}: attention_mask must be bool, integer or float, got {attention_mask.dtype}")
    b, s = attention_mask.shape
    real = attention_mask.reshape(-1) != 0
    indices = real.nonzero().reshape(-1)
    seqlens = real.view(b, s).sum(1, dtype=torch.int32)
    cu_seqlens = torch.zeros(b + 1, dtype=torch.int32, device=real.device)
    torch.cumsum(seqlens, 0, out=cu_seqlens[1:])
    max_seqlen = int(seqlens.max()) if b else 0
    slot = torch.where(real, torch.cumsum(real, 0) - 1, -1)
    return Packing(indices, cu_seqlens, max_seqlen, slot, b, s)


_ROW_COPY = {
    "reference": reference.gather_masked_bwd,
    "cpu": lambda x, index: torch.ops.fastbert.gather_masked_bwd(x, index),
    "cuda": lambda x, index: torch.ops.fastbert.gather_masked_bwd(x, index),
    "triton": lambda x, index: torch.ops.fastbert.gather_masked_bwd_triton(x, index),
}


@torch.library.custom_op("fastbert::unpad_rows", mutates_args=())
def unpad_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, backend: str) -> torch.Tensor:
    """``[len(index), H]``: row ``i`` is ``x[index[i]]``, zeros where ``index[i] < 0``, with ``backend``'s
    kernel. ``inverse`` is the index of the opposite copy (``slot`` for ``indices`` and vice versa):
    the gradient is ``unpad_rows(grad, inverse, index)``."""
    return _ROW_COPY[backend](x, index)


@unpad_rows.register_fake
def _(x, index, inverse, backend):
    return x.new_empty((index.shape[0], x.shape[1]))


def _setup_context(ctx, inputs, output):
    _, index, inverse, backend = inputs
    ctx.save_for_backward(index, inverse)
    ctx.backend = backend


def _backward(ctx, grad):
    index, inverse = ctx.saved_tensors
    return torch.ops.fastbert.unpad_rows(grad, inverse, index, ctx.backend), None, None, None


unpad_rows.register_autograd(_backward, setup_context=_setup_context)


def _check_packing(p):
    if not isinstance(p, Packing):
        raise TypeError(
            f"{OP}: packing must be a fastbert.ops.Packing (from fastbert.ops.packing), got {type(p).__name__}"
        )


def _check(t, p, name, lead):
    _checks.tensor(t, OP, name)
    if tuple(t.shape[: len(lead)]) != lead:
        raise ValueError(f"{OP}: {name} must start with {list(lead)}, got shape {list(t.shape)}")
    _checks.same_device(p.slot, t, OP, name, "the packing")


def unpad(x, p):
    """``x[B, S, ...]`` -> its real tokens ``[T, ...]`` (see the module docstring)."""
    _check_packing(p)
    _check(x, p, "x", (p.batch, p.seqlen))
    rest = tuple(x.shape[2:])
    if not x.is_floating_point():
        return x.reshape((-1,) + rest)[p.indices]
    x2 = x.reshape(p.batch * p.seqlen, math.prod(rest))
    rows = torch.ops.fastbert.unpad_rows(x2, p.indices, p.slot, backends.select(GATHER, x2))
    return rows.reshape((p.total,) + rest)


def pad(rows, p):
    """``rows[T, ...]`` -> ``[B, S, ...]`` with zeros at padding (see the module docstring)."""
    _check_packing(p)
    _check(rows, p, "rows", (p.total,))
    rest = tuple(rows.shape[1:])
    if not rows.is_floating_point():
        out = rows.new_zeros((p.batch * p.seqlen,) + rest)
        out[p.indices] = rows
        return out.reshape((p.batch, p.seqlen) + rest)
    r2 = rows.reshape(p.total, math.prod(rest))
    out = torch.ops.fastbert.unpad_rows(r2, p.slot, p.indices, backends.select(GATHER, r2))
    return out.reshape((p.batch, p.seqlen) + rest)
