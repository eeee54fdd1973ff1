"""Masked-token gather: the rows of ``hidden`` whose label is not ``ignore_index``, in row-major order.

BERT's MLM head needs only the ~15% of tokens that carry a label; gathering them first means the
transform and the vocabulary projection run on those rows alone. Forward returns
``(rows[M, H], targets[M], index[M])``: ``index`` holds the flat positions (into ``B * S``) of the
selected tokens and ``targets = labels.flatten()[index]`` (int64). ``M`` depends on the data, so the
forward reads the labels before it allocates (on CUDA: one device-to-host copy of a count, the
documented data-dependent gather size: the one host synchronisation of fastbert's ops), and under
``torch.compile`` ``M`` is a data-dependent size. The forward ops (``fastbert::gather_masked_fwd``,
``fastbert::gather_masked_fwd_triton``) are therefore tagged ``torch.Tag.cudagraph_unsafe``
(``_library.SYNC_TAGS``): CUDA graphs are split around them. The backward has static shapes and
no host read.

Backward writes the whole ``[B, S, H]`` gradient in one pass over its rows: row ``n`` is the
incoming gradient row ``slot[n]`` when the token was selected, zeros otherwise (no separate
zero-fill). ``slot[N]`` (int64, -1 for unselected tokens) comes out of the forward kernel.

Rows are copied bit for bit (NaN and inf included). The backward is itself differentiable (its
gradient is the gather again), so double backward works. ``hidden`` must have a non-empty last
dimension, and ``ignore_index`` must fit in int64.
"""

import torch

from fastbert import backends, reference
from fastbert.ops import _checks, _library

OP = "gather_masked"
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _fake_fwd(hidden, labels, ignore_index):
    m = torch.library.get_ctx().new_dynamic_size()
    rows = hidden.new_empty((m, hidden.shape[1]))
    index = labels.new_empty((m,), dtype=torch.int64)
    return rows, torch.empty_like(index), index, labels.new_empty(labels.shape, dtype=torch.int64)


def _fake_bwd(grad, slot):
    return grad.new_empty((slot.shape[0], grad.shape[1]))


_library.define(
    OP,
    "(Tensor hidden, Tensor labels, int ignore_index) -> (Tensor, Tensor, Tensor, Tensor)",
    "(Tensor grad, Tensor slot) -> Tensor",
    _fake_fwd,
    _fake_bwd,
    fwd_tags=_library.SYNC_TAGS,
)  # the forward reads M back: cudagraph_unsafe


def setup_context(ctx, inputs, output):
    _, targets, index, slot = output
    ctx.save_for_backward(slot)
    ctx.mark_non_differentiable(targets, index, slot)


def backward(ctx, bwd_op, grad, _grad_targets=None, _grad_index=None, _grad_slot=None):
    (slot,) = ctx.saved_tensors
    return bwd_op(grad.contiguous(), slot), None, None


_library.register_autograd(
    f"fastbert::{OP}_fwd", torch.ops.fastbert.gather_masked_bwd.default, setup_context, backward, double_backward=True
)


def bwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def bwd_backward(ctx, fwd_op, grad):
    """The backward's own gradient (double backward): the gather of the selected rows."""
    (slot,) = ctx.saved_tensors
    return fwd_op(grad.contiguous(), slot, -1)[0], None


_library.register_autograd(
    f"fastbert::{OP}_bwd",
    torch.ops.fastbert.gather_masked_fwd.default,
    bwd_setup_context,
    bwd_backward,
    double_backward=True,
)
backends.register_op(OP)


def _fused(op_name):
    def run(hidden, labels, ignore_index):
        return getattr(torch.ops.fastbert, op_name)(hidden, labels, ignore_index)[:3]

    return run


_IMPLS = {
    "reference": lambda hidden, labels, ignore_index: reference.gather_masked(hidden, labels, ignore_index)[:3],
    "cpu": _fused("gather_masked_fwd"),
    "cuda": _fused("gather_masked_fwd"),
    "triton": _fused("gather_masked_fwd_triton"),
}


def check_args(hidden, labels, ignore_index):
    """Validate and flatten: returns ``hidden`` as ``[N, H]`` and ``labels`` as ``[N]``."""
    _checks.tensor(hidden, OP, "hidden")
    _checks.tensor(labels, OP, "labels")
    _checks.floating(hidden, OP, "hidden")
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(
            f"{OP}: labels must be an integer tensor (int64 token ids, ignore_index where "
            f"unlabelled), got {labels.dtype}"
        )
    if hidden.dim() not in (2, 3) or labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{OP}: hidden must be [batch, seq, hidden] with labels [batch, seq], or "
            f"[N, hidden] with labels [N]; got hidden {list(hidden.shape)} and labels "
            f"{list(labels.shape)}"
        )
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"{OP}: ignore_index must be an int, got {ignore_index!r}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"{OP}: ignore_index must fit in int64 ([-2**63, 2**63)), got {ignore_index!r}")
    _checks.same_device(hidden, labels, OP, "labels", "hidden")
    if hidden.shape[-1] == 0:
        raise ValueError(
            f"{OP}: hidden must have a non-empty last (hidden size) dimension, got shape {list(hidden.shape)}"
        )
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


def gather_masked(hidden, labels, *, ignore_index=-100):
    """The labelled rows of ``hidden``: ``(rows, targets, index)``.

    Args:
        hidden: ``[batch, seq, H]`` (or ``[N, H]``) float tensor, e.g. the encoder output.
        labels: ``[batch, seq]`` (or ``[N]``) integer tensor; ``ignore_index`` (keyword-only) marks
            unlabelled tokens.
    Returns:
        rows ``[M, H]`` (hidden's dtype, differentiable), targets ``[M]`` int64 (the labels of those
        rows), index ``[M]`` int64 (their flat positions in ``labels``), in row-major order.
    """
    hidden2d, labels1d = check_args(hidden, labels, ignore_index)
    name = backends.select(OP, hidden2d)
    return _IMPLS[name](hidden2d, labels1d, ignore_index)
