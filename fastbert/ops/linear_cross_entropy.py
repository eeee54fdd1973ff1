"""Fused linear + cross-entropy: ``F.cross_entropy(rows @ weight.T + bias, targets)`` chunk by chunk.

The MLM decoder projection and its loss without ever holding the ``[M, vocab]`` logits: the rows are
taken ``chunk_size`` at a time; each chunk's logits go into one reused ``[chunk, vocab]`` buffer
(a torch matmul), a fused kernel turns them into the per-row loss and, in place, into the gradient
of the logits, and two more torch matmuls add that chunk's share of the gradients of ``rows``,
``weight`` and ``bias`` (accumulated in fp32). So the forward already holds the gradients (as
Liger-Kernel's fused linear cross-entropy does): the backward only scales them by the incoming
gradient. With ``reduction="none"`` the incoming gradient differs per row, so the backward instead
recomputes each chunk's logits and runs the fused kernel with that row's scale.

The fused kernel pair (one per backend), over a ``[c, V]`` logits chunk and int64 targets ``[c]``:

* ``fastbert::linear_cross_entropy_fwd(logits, targets, ignore_index) -> (loss[c], lse[c])``:
  ``lse = log(sum(exp(logits)))`` in fp32 (fp64 for fp64 logits), ``loss = lse - logits[target]``,
  0 where ``target == ignore_index``.
* ``fastbert::linear_cross_entropy_bwd(logits!, targets, row_scale, ignore_index) -> (loss, lse)``:
  the same, and overwrites ``logits`` with ``(softmax(logits) - onehot(target)) * row_scale[i]``
  (zeros on ignored rows).

Edge cases: no rows (``M = 0``) or every target ignored: the loss is 0 for every reduction (not
NaN, unlike ``F.cross_entropy``'s mean), with zero gradients. Targets outside ``[0, V)`` other than
``ignore_index`` raise ``ValueError`` on CPU; on CUDA they fail an asynchronous device-side assert
(``torch._assert_async``): the op does not read anything back to the host, so it is
cudagraph-safe and never stalls the launch queue.

NaN and inf propagate as in eager PyTorch on every backend: a NaN logit (e.g. from a NaN in the
weight, the rows or the bias) makes that row's loss and gradients NaN, and so the mean/sum loss.
(Ignored rows keep a zero gradient whatever their logits.) ``ignore_index`` and ``chunk_size`` must fit
in int64. Double backward (differentiating the gradients, ``create_graph=True``) is not implemented
and raises ``RuntimeError`` when attempted.
"""

import math
from typing import Optional, Tuple

import torch

from fastbert import backends, reference
from fastbert.ops import _checks, _library

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
TARGET_DTYPES = (torch.int64, torch.int32)
CHUNK_BYTES = 24 << 20  # default chunk: a [chunk, V] block of about 24 MiB (BERT-base batch 8: one chunk)


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(logits, targets, ignore_index):
    stats = logits.new_empty(logits.shape[:1], dtype=_stats_dtype(logits.dtype))
    return stats, torch.empty_like(stats)


def _fake_bwd(logits, targets, row_scale, ignore_index):
    return _fake_fwd(logits, targets, ignore_index)


_library.define(
    OP,
    "(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor)",
    "(Tensor(a!) logits, Tensor targets, Tensor row_scale, int ignore_index) -> (Tensor, Tensor)",
    _fake_fwd,
    _fake_bwd,
)
backends.register_op(OP)


# backend -> (fwd, bwd) kernels, looked up at call time (the Triton ops load after this module)
_KERNELS = {
    "reference": lambda: (reference.cross_entropy_fwd, reference.cross_entropy_bwd_),
    "cpu": lambda: (torch.ops.fastbert.linear_cross_entropy_fwd, torch.ops.fastbert.linear_cross_entropy_bwd),
    "cuda": lambda: (torch.ops.fastbert.linear_cross_entropy_fwd, torch.ops.fastbert.linear_cross_entropy_bwd),
    "triton": lambda: (
        torch.ops.fastbert.linear_cross_entropy_fwd_triton,
        torch.ops.fastbert.linear_cross_entropy_bwd_triton,
    ),
}


def default_chunk_size(vocab, dtype):
    """Rows per chunk: a ``[chunk, vocab]`` block of about ``CHUNK_BYTES`` (at least 16 rows)."""
    return max(16, CHUNK_BYTES // (max(vocab, 1) * dtype.itemsize) // 16 * 16)


def _check_targets(targets, vocab, ignore_index):
    """Targets outside ``[0, vocab)`` other than ``ignore_index`` are an error. CPU tensors, where
    reading them costs nothing: a ``ValueError`` naming the first. Other devices: an asynchronous
    device-side assertion (``torch._assert_async``), so the op never waits for the GPU and CUDA
    graphs can capture it; a bad target then fails the next synchronising call with a CUDA
    device-side assert carrying this message (as ``F.cross_entropy`` on CUDA)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if targets.device.type != "cpu":
        torch._assert_async(
            ~bad.any(),
            f"{OP}: targets must be in [0, {vocab}) (the vocabulary size, "
            f"weight.shape[0]) or ignore_index={ignore_index}",
        )
        return
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(
            f"{OP}: targets must be in [0, {vocab}) (the vocabulary size, weight.shape[0]) "
            f"or ignore_index={ignore_index}; got {first}"
        )


def _accumulate_mm(acc, a, b, first):
    """``acc += a @ b`` (``acc = a @ b`` when ``first``: no zero-fill pass) with fp32 ``acc``: in
    one matmul where torch allows a half-input, fp32-output product (CUDA), else with the operands
    upcast."""
    beta = 0 if first else 1
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, beta=beta, out=acc)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, beta=beta, out_dtype=acc.dtype, out=acc)
    else:
        torch.addmm(acc, a.to(acc.dtype), b.to(acc.dtype), beta=beta, out=acc)


def _matmul_dtype(rows):
    """The dtype of the chunk matmuls: the rows' own, except fp16/bf16 rows on a CPU without
    instructions for them (fp16 on any CPU, bf16 without AVX512-BF16), where torch's half
    ``mm(..., out=)`` falls back to a single-threaded reference gemm (minutes for BERT-base's MLM
    head): fp32 there."""
    if rows.device.type != "cpu" or rows.dtype not in (torch.float16, torch.bfloat16):
        return rows.dtype
    return rows.dtype if rows.dtype == torch.bfloat16 and backends.cpu_has_bf16() else torch.float32


def _chunks(m, chunk):
    return [(s, min(m, s + chunk)) for s in range(0, m, chunk)]


def _logits_into(buf, r, weight, bias):
    out = buf[: r.shape[0]]
    if bias is None:
        return torch.mm(r, weight.t(), out=out)
    return torch.addmm(bias, r, weight.t(), out=out)


def _grads_of_chunks(rows, weight, bias, targets, row_scale, ignore_index, chunk, bwd, loss_rows):
    """The gradients of ``sum_i row_scale[i] * loss_i`` (and the per-row losses into ``loss_rows``)."""
    m, v = rows.shape[0], weight.shape[0]
    acc = _stats_dtype(rows.dtype)
    grad_rows = torch.empty_like(rows, memory_format=torch.contiguous_format)
    new = torch.empty if m else torch.zeros  # the first chunk writes the sums (nothing to write when M = 0)
    gw = new(weight.shape, dtype=acc, device=weight.device)
    # the bias gradient adds one [V] sum per chunk: in float64, so that many small chunks do not add
    # fp32 rounding per chunk (40 chunks of 1 row measured 5x eager's error); a [V] buffer costs nothing
    gb = new(v, dtype=torch.float64, device=weight.device) if bias is not None else None
    buf = rows.new_empty((min(chunk, m), v))
    for s, e in _chunks(m, chunk):
        r = rows[s:e]
        logits = _logits_into(buf, r, weight, bias)
        loss, _ = bwd(logits, targets[s:e], row_scale[s:e], ignore_index)  # logits <- dlogits
        loss_rows[s:e] = loss
        torch.mm(logits, weight, out=grad_rows[s:e])
        _accumulate_mm(gw, logits.t(), r, first=s == 0)
        if gb is not None:
            chunk_sum = logits.sum(0, dtype=acc)
            gb.copy_(chunk_sum) if s == 0 else gb.add_(chunk_sum)
    return (grad_rows, gw.to(weight.dtype), gb.to(bias.dtype) if gb is not None else rows.new_empty((0,)))


def _reduce(loss_rows, n_valid, reduction, dtype):
    if reduction == "none":
        return loss_rows.to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / n_valid.clamp(min=1)
    return total.to(dtype)


@torch.library.custom_op("fastbert::linear_cross_entropy_chunked", mutates_args=())
def linear_cross_entropy_chunked(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    compute_grad: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad_rows, grad_weight, grad_bias)``; the gradients (of the loss itself) only when
    ``compute_grad`` (else empty), with fused kernels of ``backend``."""
    mm = _matmul_dtype(rows)
    if mm != rows.dtype:  # the chunk matmuls in fp32 (the gradients go back to the inputs' dtypes)
        grads = linear_cross_entropy_chunked(
            rows.to(mm),
            weight.to(mm),
            bias.to(mm) if bias is not None else None,
            targets,
            ignore_index,
            reduction,
            chunk_size,
            compute_grad,
            backend,
        )
        loss = grads[0].to(rows.dtype)
        if not compute_grad:
            return (loss,) + tuple(rows.new_empty((0,)) for _ in range(3))
        gb = grads[3].to(bias.dtype) if bias is not None else grads[3].to(rows.dtype)
        return loss, grads[1].to(rows.dtype), grads[2].to(weight.dtype), gb
    m = rows.shape[0]
    targets = targets.contiguous()
    _check_targets(targets, weight.shape[0], ignore_index)
    fwd, bwd = _KERNELS[backend]()
    acc = _stats_dtype(rows.dtype)
    loss_rows = torch.zeros(m, dtype=acc, device=rows.device)
    valid = targets != ignore_index
    n_valid = valid.sum()
    if compute_grad:
        scale = (
            1.0 / n_valid.clamp(min=1).to(acc) if reduction == "mean" else torch.ones((), dtype=acc, device=rows.device)
        )
        row_scale = scale.expand(m).contiguous()
        grads = _grads_of_chunks(rows, weight, bias, targets, row_scale, ignore_index, chunk_size, bwd, loss_rows)
        return (_reduce(loss_rows, n_valid, reduction, rows.dtype),) + grads
    buf = rows.new_empty((min(chunk_size, m), weight.shape[0]))
    for s, e in _chunks(m, chunk_size):
        loss_rows[s:e] = fwd(_logits_into(buf, rows[s:e], weight, bias), targets[s:e], ignore_index)[0]
    return (_reduce(loss_rows, n_valid, reduction, rows.dtype),) + tuple(rows.new_empty((0,)) for _ in range(3))


@linear_cross_entropy_chunked.register_fake
def _(rows, weight, bias, targets, ignore_index, reduction, chunk_size, compute_grad, backend):
    loss = rows.new_empty((rows.shape[0],) if reduction == "none" else ())
    if not compute_grad:
        return loss, rows.new_empty((0,)), rows.new_empty((0,)), rows.new_empty((0,))
    return (
        loss,
        torch.empty_like(rows, memory_format=torch.contiguous_format),
        torch.empty_like(weight),
        torch.empty_like(bias) if bias is not None else rows.new_empty((0,)),
    )


@torch.library.custom_op("fastbert::linear_cross_entropy_chunked_bwd", mutates_args=())
def linear_cross_entropy_chunked_bwd(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    grad_loss: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_i grad_loss[i] * loss_i`` (``reduction="none"``), logits recomputed."""
    _, bwd = _KERNELS[backend]()
    loss_rows = torch.empty(rows.shape[0], dtype=_stats_dtype(rows.dtype), device=rows.device)
    row_scale = grad_loss.to(loss_rows.dtype).contiguous()
    return _grads_of_chunks(
        rows, weight, bias, targets.contiguous(), row_scale, ignore_index, chunk_size, bwd, loss_rows
    )


@linear_cross_entropy_chunked_bwd.register_fake
def _(rows, weight, bias, targets, grad_loss, ignore_index, chunk_size, backend):
    return (
        torch.empty_like(rows, memory_format=torch.contiguous_format),
        torch.empty_like(weight),
        torch.empty_like(bias) if bias is not None else rows.new_empty((0,)),
    )


def _traced(*tensors):
    """Whether this runs under torch.compile / AOT tracing (fake or functional tensor subclasses)."""
    return torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors)


def _setup_context(ctx, inputs, output):
    rows, weight, bias, targets, ignore_index, reduction, chunk_size, compute_grad, backend = inputs
    _, grad_rows, grad_weight, grad_bias = output
    ctx.has_bias, ctx.reduction, ctx.compute_grad = bias is not None, reduction, compute_grad
    ctx.ignore_index, ctx.chunk_size, ctx.backend = ignore_index, chunk_size, backend
    ctx.consumed = False
    # the gradient outputs are not differentiable: without this autograd would hand the backward a
    # zero-filled [vocab, H] gradient for grad_weight
    ctx.mark_non_differentiable(grad_rows, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)
    # the inputs are alive anyway (parameters, activations): saving them costs nothing and lets any
    # backward recompute; the forward's gradients are used by the first backward
    ctx.save_for_backward(rows, weight, bias, targets, grad_rows, grad_weight, grad_bias)


def _finished_scale(grad_loss, targets, ignore_index):
    """The factor for the forward's finished gradients: ``grad_loss``, or 0 when no target is valid
    (the gradients are then exact zeros, as eager's whatever ``grad_loss``, even inf or NaN). On the
    device, without reading anything back (CUDA, compiled graphs)."""
    return torch.where((targets != ignore_index).any(), grad_loss, torch.zeros_like(grad_loss))


def _backward(ctx, grad_loss, *_unused):
    """The gradients: recomputed chunk by chunk for ``reduction="none"`` (a per-row incoming
    gradient); otherwise the forward's gradients times the scalar ``grad_loss``. The first eager
    backward scales them in place (no second ``[vocab, H]`` buffer); a compiled one multiplies out
    of place (traced once, it cannot know whether it runs again); a later backward through the same
    graph (``retain_graph=True``, gradcheck) recomputes, since the first one handed its buffers out."""
    if grad_loss is None:  # the loss did not reach what is being differentiated
        return (None,) * 9
    rows, weight, bias, targets, *grads = ctx.saved_tensors
    # An inf or NaN incoming gradient (read where that costs nothing: a CPU scalar) is applied per
    # element, as eager's (softmax - onehot) * grad_loss before the matmuls: the finished gradients
    # times it would turn their exact zeros (no rows, ignored rows) into NaN (0 * inf) where eager has 0.
    nonfinite = (
        grad_loss.device.type == "cpu"
        and ctx.reduction != "none"
        and not _traced(grad_loss)
        and not math.isfinite(grad_loss.item())
    )
    if ctx.reduction == "none" or not ctx.compute_grad or ctx.consumed or nonfinite:
        scale = grad_loss
        if ctx.reduction != "none":
            n_valid = (targets != ctx.ignore_index).sum().clamp(min=1)
            scale = (grad_loss / n_valid if ctx.reduction == "mean" else grad_loss).expand(rows.shape[0])
        gr, gw, gb = torch.ops.fastbert.linear_cross_entropy_chunked_bwd(
            rows, weight, bias, targets, scale, ctx.ignore_index, ctx.chunk_size, ctx.backend
        )
    elif _traced(grad_loss, *grads):
        scale = _finished_scale(grad_loss, targets, ctx.ignore_index)
        gr, gw, gb = (g * scale for g in grads)
    else:
        ctx.consumed = True
        # .data: an in-place update autograd does not track (the saved inputs stay unpackable)
        if not (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):  # loss.backward(): nothing to do
            scale = _finished_scale(grad_loss, targets, ctx.ignore_index)
            for g in grads:
                g.data.mul_(scale)
        gr, gw, gb = grads
    return gr, gw, (gb if ctx.has_bias else None), None, None, None, None, None, None


# once differentiable: the gradients come from fused kernels with no derivative of their own, so
# differentiating them (create_graph=True, double backward) raises instead of seeing a constant
linear_cross_entropy_chunked.register_autograd(
    _library.once_differentiable(OP, _backward), setup_context=_setup_context
)


def check_args(rows, weight, bias, targets, ignore_index, reduction, chunk_size):
    for t, name in ((rows, "rows"), (weight, "weight"), (targets, "targets")):
        _checks.tensor(t, OP, name)
    _checks.tensor(bias, OP, "bias", optional=True)
    _checks.floating(rows, OP, "rows")
    _checks.floating(weight, OP, "weight")
    if rows.dim() != 2 or weight.dim() != 2 or weight.shape[1] != rows.shape[1]:
        raise ValueError(
            f"{OP}: rows must be [M, H] and weight [vocab, H]; got rows {list(rows.shape)} "
            f"and weight {list(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{OP}: weight has no rows (a vocabulary of size 0)")
    if bias is not None:
        _checks.floating(bias, OP, "bias")
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{OP}: bias must have shape [{weight.shape[0]}] (weight.shape[0]), got {list(bias.shape)}"
            )
        _checks.same_device(rows, bias, OP, "bias", "rows")
    if targets.dtype not in TARGET_DTYPES:
        raise ValueError(f"{OP}: targets must be int64 (or int32) class indices, got {targets.dtype}")
    if targets.shape != rows.shape[:1]:
        raise ValueError(f"{OP}: targets must have shape [{rows.shape[0]}] (one per row), got {list(targets.shape)}")
    _checks.same_device(rows, weight, OP, "weight", "rows")
    _checks.same_device(rows, targets, OP, "targets", "rows")
    _checks.choice(reduction, OP, "reduction", REDUCTIONS)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"{OP}: ignore_index must be an int, got {ignore_index!r}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"{OP}: ignore_index must fit in int64 ([-2**63, 2**63)), got {ignore_index!r}")
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not 1 <= chunk_size < 2**63
    ):
        raise ValueError(f"{OP}: chunk_size must be a positive int below 2**63 or None, got {chunk_size!r}")


def linear_cross_entropy(rows, weight, targets, bias=None, *, ignore_index=-100, reduction="mean", chunk_size=None):
    """``F.cross_entropy(rows @ weight.T + bias, targets, ignore_index=..., reduction=...)`` without
    the ``[M, vocab]`` logits: peak extra memory is one ``[chunk_size, vocab]`` block.

    Args:
        rows: ``[M, H]`` (e.g. the transformed masked-token rows of :func:`gather_masked`).
        weight: ``[vocab, H]`` decoder weight (BERT ties it to the word embeddings); cast to rows'
            dtype if it differs (autocast-style master weights), likewise ``bias``.
        targets: ``[M]`` int64 (or int32) class indices; ``ignore_index`` rows add nothing.
        bias: optional ``[vocab]`` decoder bias (None: no bias, the same as zeros).
    Keyword-only options:
        ignore_index: the target value of rows that add nothing (default -100).
        reduction: ``"mean"`` over the non-ignored rows (0 when there are none), ``"sum"`` or ``"none"``.
        chunk_size: rows per chunk (default: a ~24 MiB ``[chunk, vocab]`` block).
    Returns the loss in rows' dtype (computed in fp32).
    """
    check_args(rows, weight, bias, targets, ignore_index, reduction, chunk_size)
    weight = weight.to(rows.dtype)
    bias = bias.to(rows.dtype) if bias is not None else None
    name = backends.select(OP, rows, weight, bias)
    chunk = chunk_size or default_chunk_size(weight.shape[0], rows.dtype)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, weight, bias))
    loss, *_ = torch.ops.fastbert.linear_cross_entropy_chunked(
        rows, weight, bias, targets, ignore_index, reduction, chunk, needs_grad and reduction != "none", name
    )
    return loss
