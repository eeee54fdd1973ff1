"""Attention over packed (variable-length) sequences, as flash-attention's varlen API.

``q, k, v`` are ``[T, heads, D]``: the real tokens of a batch, one sequence after another, sequence
``b`` in rows ``cu_seqlens[b] : cu_seqlens[b + 1]`` (``cu_seqlens`` int32 ``[B + 1]``, starting at 0,
non-decreasing, ending at ``T``; ``max_seqlen`` at least the longest sequence). Every query attends to
the keys of its own sequence only: ``out = dropout(softmax(q k^T * scale)) v``, computed per sequence
and head, so no padded ``[B, heads, S, S]`` scores ever exist.

Forward returns ``out [T, heads, D]`` (q's dtype, contiguous) and ``lse [heads, T]`` (fp32; fp64 for
fp64 inputs): each query row's log-sum-exp of its scaled scores, which is what the backward needs to
rebuild the probabilities ``p = exp(s - lse)`` without storing them. Backward (``D_i = sum(dO_i * O_i)``):
``dP = dO v^T`` (times the dropout mask and ``1/(1-p)``), ``dS = p (dP - D_i)``, ``dq = scale dS k``,
``dk = scale dS^T q``, ``dv = P_dropped^T dO``.

Dropout: element (head ``h``, query row ``t``, key ``j`` counted from the start of ``t``'s sequence) is
element ``(h * T + t) * max_seqlen + j`` of the shared Philox stream (:mod:`fastbert.philox`), so every
backend drops the same probabilities for the same seed. As every fastbert dropout op (and ``F.dropout``),
``dropout_p > 0`` means dropout unless ``training=False``.

NaN and inf propagate as in eager PyTorch (a NaN or +inf score makes its query row NaN). Double
backward (differentiating the gradients, ``create_graph=True``) is not implemented by the fused
backends and raises ``RuntimeError`` when attempted.
"""

import math

import torch

from fastbert import backends, philox, reference
from fastbert.ops import _checks, _library

OP = "varlen_attention"


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=_acc(q.dtype))


def _fake_bwd(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


_library.define(
    OP,
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale, float dropout_p, "
    "Tensor? seed) -> (Tensor, Tensor)",
    "(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens, int max_seqlen, "
    "float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)",
    _fake_fwd,
    _fake_bwd,
)


def setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed)
    ctx.max_seqlen, ctx.scale, ctx.dropout_p = max_seqlen, scale, dropout_p
    ctx.mark_non_differentiable(lse)


def backward(ctx, bwd_op, grad, _grad_lse=None):
    q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = bwd_op(
        grad.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.dropout_p, seed
    )
    return dq, dk, dv, None, None, None, None, None


_library.register_autograd(
    f"fastbert::{OP}_fwd", torch.ops.fastbert.varlen_attention_bwd.default, setup_context, backward
)
backends.register_op(OP)


def _fused(op_name):
    def run(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed):
        return getattr(torch.ops.fastbert, op_name)(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed)[0]

    return run


_IMPLS = {
    "reference": lambda *a: reference.varlen_attention(*a)[0],
    "cpu": _fused("varlen_attention_fwd"),
    "cuda": _fused("varlen_attention_fwd"),
    "triton": _fused("varlen_attention_fwd_triton"),
}


def check_args(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p):
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        _checks.tensor(t, OP, name)
    _checks.floating(q, OP, "q")
    if q.dim() != 3:
        raise ValueError(f"{OP}: q must be 3-D [total_tokens, heads, head_dim], got shape {list(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{OP}: {name} must have q's shape {list(q.shape)}, got {list(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{OP}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        _checks.same_device(q, t, OP, name, "q")
    _checks.same_device(q, cu_seqlens, OP, "cu_seqlens", "q")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"{OP}: cu_seqlens must be a 1-D int32 tensor [batch + 1], got {cu_seqlens.dtype} {list(cu_seqlens.shape)}"
        )
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise ValueError(f"{OP}: max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"{OP}: scale must be a number, got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)


def check_cu_seqlens(cu_seqlens, total, max_seqlen):
    """The values of ``cu_seqlens`` (read on the host: done for CPU tensors, where it is free)."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"{OP}: cu_seqlens must start at 0, got {cu[0]}")
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{OP}: cu_seqlens must be non-decreasing, got {cu}")
    if cu[-1] != total:
        raise ValueError(f"{OP}: cu_seqlens must end at the number of rows of q ({total}), got {cu[-1]}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{OP}: max_seqlen {max_seqlen} is smaller than the longest sequence ({max(lengths)})")


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, scale=None, dropout_p=0.0, training=True):
    """Self-attention within each packed sequence (see the module docstring).

    Args:
        q, k, v: ``[total_tokens, heads, head_dim]`` float tensors (views of a packed QKV are fine).
        cu_seqlens: int32 ``[batch + 1]`` cumulative sequence lengths (0, len0, len0 + len1, ...).
        max_seqlen: the longest sequence (an upper bound is fine).
    Keyword-only options:
        scale: multiplies ``q k^T``; default ``1 / sqrt(head_dim)``.
        dropout_p: dropout on the attention probabilities, in [0, 1).
        training: apply dropout (default True, as ``F.dropout``); ``training=False`` (evaluation)
            skips it whatever ``dropout_p``.
    Returns:
        ``[total_tokens, heads, head_dim]`` in q's dtype.
    """
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 3:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    check_args(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p)
    seed = philox.draw_seed(q.device) if training and dropout_p > 0 else None
    name = backends.select(OP, q)
    return _IMPLS[name](q, k, v, cu_seqlens, int(max_seqlen), float(scale), float(dropout_p), seed)
