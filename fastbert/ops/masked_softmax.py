"""Attention softmax: ``probs = dropout(softmax(scores * scale + mask))`` over the keys.

``scores`` is ``[batch, heads, queries, keys]``. ``mask`` is None, a bool key-padding mask
``[batch, keys]`` (True = attend), or any mask broadcastable to the scores (4-D): bool (True = attend)
or additive float, e.g. Hugging Face's ``[B, 1, 1, Sk]`` / ``[B, 1, Sq, Sk]`` with
``torch.finfo(dtype).min`` at padded keys (computed in fp32, so it cannot overflow in fp16/bf16).
A row whose every key is excluded (bool False or additive -inf) gives zeros, never NaN; a row whose
every key carries the same finite large negative value gets what softmax gives (uniform), as eager
(a float64 mask's finite values are clamped to float32's range, so ``torch.finfo(torch.float64).min``
stays finite instead of becoming -inf).

NaN and inf propagate as in eager PyTorch on every backend: a NaN score, scale or additive mask value
(or a +inf score) makes its row NaN; a bool mask excludes its keys whatever their scores
(``masked_fill`` semantics, so a NaN score at an excluded key weighs nothing). Two documented
exceptions: dropout is a select (a dropped element is 0 even where it is NaN or inf; eager's
``x * mask`` gives NaN there), on every backend and in every dropout op; and the backward does not
read the mask, so where a row's incoming gradient is not finite a bool-excluded key's gradient is
``0 * (g - sum(g p))`` = NaN (eager's ``masked_fill`` backward gives 0 there).

Gradients: ``scores`` and an additive float ``mask`` that requires grad (``d/dmask = p (g - sum(g p))``,
summed over the mask's broadcast dimensions). Double backward (differentiating the gradient, e.g.
with ``create_graph=True``) is not implemented and raises ``RuntimeError`` when attempted.

Dropout draws from the shared Philox stream (:mod:`fastbert.philox`); with dropout the forward also
returns the pre-dropout softmax, which the backward needs (the mask itself is regenerated):
``dscores = scale * p * (g - sum(g * p))``, ``g`` = dropout backward of the incoming gradient.
"""

import torch

from fastbert import backends, philox, reference
from fastbert.ops import _checks, _library

OP = "masked_softmax"
MASK_DTYPES = (torch.bool, torch.float32, torch.float16, torch.bfloat16, torch.float64)


def dropout_active(dropout_p, seed):
    return seed is not None and dropout_p > 0


def _fake_fwd(scores, mask, scale, dropout_p, seed):
    probs = torch.empty_like(scores, memory_format=torch.contiguous_format)
    soft = torch.empty_like(probs) if dropout_active(dropout_p, seed) else scores.new_empty((0,))
    return probs, soft


def _fake_bwd(grad, softmax, scale, dropout_p, seed):
    return torch.empty_like(softmax, memory_format=torch.contiguous_format)


_library.define(
    OP,
    "(Tensor scores, Tensor? mask, float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)",
    "(Tensor grad, Tensor softmax, float scale, float dropout_p, Tensor? seed) -> Tensor",
    _fake_fwd,
    _fake_bwd,
)


def setup_context(ctx, inputs, output):
    scores, mask, scale, dropout_p, seed = inputs
    probs, soft = output
    # without dropout the output is the softmax; with it, the pre-dropout softmax was returned too
    ctx.save_for_backward(soft if dropout_active(dropout_p, seed) else probs, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    # an additive float mask that requires grad gets d/dmask = p (g - sum(g p)) (dscores / scale),
    # summed over its broadcast dimensions
    ctx.mask_shape = tuple(mask.shape) if mask is not None else None
    ctx.mask_dtype = mask.dtype if mask is not None else None
    ctx.mark_non_differentiable(soft)


def backward(ctx, bwd_op, grad, _grad_soft=None):
    soft, seed = ctx.saved_tensors
    dscores = bwd_op(grad, soft, ctx.scale, ctx.dropout_p, seed) if ctx.needs_input_grad[0] else None
    dmask = None
    if ctx.needs_input_grad[1]:
        # scale 1: p (g - sum(g p)) itself (not dscores / scale: scale may be 0)
        full = bwd_op(grad, soft, 1.0, ctx.dropout_p, seed)
        acc = torch.float64 if full.dtype == torch.float64 else torch.float32
        dmask = full.to(acc).sum_to_size(ctx.mask_shape).to(ctx.mask_dtype)
    return dscores, dmask, None, None, None


_library.register_autograd(
    f"fastbert::{OP}_fwd", torch.ops.fastbert.masked_softmax_bwd.default, setup_context, backward
)
backends.register_op(OP)


def _fused(op_name):
    def run(scores, mask, scale, dropout_p, seed):
        return getattr(torch.ops.fastbert, op_name)(scores, mask, scale, dropout_p, seed)[0]

    return run


_IMPLS = {
    "reference": reference.masked_softmax,
    "cpu": _fused("masked_softmax_fwd"),
    "cuda": _fused("masked_softmax_fwd"),
    "triton": _fused("masked_softmax_fwd_triton"),
}


def canonical_mask(scores, mask):
    """The mask as the kernels take it: None, or a 4-D tensor broadcastable to ``scores`` (a bool
    ``[B, Sk]`` key-padding mask becomes a ``[B, 1, 1, Sk]`` view). Raises naming what is wrong."""
    if mask is None:
        return None
    _checks.tensor(mask, OP, "mask")
    if mask.dtype not in MASK_DTYPES:
        raise ValueError(f"{OP}: mask must be bool (True = attend) or a float dtype, got {mask.dtype}")
    _checks.same_device(scores, mask, OP, "mask", "scores")
    b, _, _, k = scores.shape
    if mask.dtype == torch.bool and mask.dim() == 2:
        if tuple(mask.shape) != (b, k):
            raise ValueError(
                f"{OP}: a 2-D bool key-padding mask must have shape [batch, keys] = [{b}, {k}], got {list(mask.shape)}"
            )
        return mask[:, None, None, :]
    if mask.dim() > 4 or any(m not in (1, s) for m, s in zip(mask.shape[::-1], scores.shape[::-1])):
        raise ValueError(
            f"{OP}: mask of shape {list(mask.shape)} does not broadcast to scores of shape {list(scores.shape)}"
        )
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def check_args(scores, scale, dropout_p):
    _checks.tensor(scores, OP, "scores")
    _checks.floating(scores, OP, "scores")
    if scores.dim() != 4:
        raise ValueError(f"{OP}: scores must be 4-D [batch, heads, queries, keys], got shape {list(scores.shape)}")
    if not isinstance(scale, (int, float)):
        raise ValueError(f"{OP}: scale must be a number, got {type(scale).__name__}")
    if not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1), got {dropout_p!r}")


def masked_softmax(scores, mask=None, *, scale=1.0, dropout_p=0.0, training=True):
    """``dropout(softmax(scores * scale + mask))`` over the last dimension of 4-D ``scores``.

    Args:
        scores: ``[batch, heads, queries, keys]`` attention scores (e.g. ``q @ k.transpose(-1, -2)``).
        mask: None; bool ``[batch, keys]`` (True = attend); or a mask broadcastable to ``scores``,
            bool or additive float (``-inf`` or ``torch.finfo(dtype).min`` at excluded keys).
    Keyword-only options:
        scale: multiplies the scores before the mask is added (``1 / sqrt(head_dim)``).
        dropout_p: dropout probability in [0, 1).
        training: apply dropout (default True, as ``F.dropout``); ``training=False`` (evaluation)
            skips it whatever ``dropout_p``.
    """
    check_args(scores, scale, dropout_p)
    mask = canonical_mask(scores, mask)
    seed = philox.draw_seed(scores.device) if training and dropout_p > 0 else None
    # the glue converts a float mask (float64 included, backends.CONVERTED); a bool mask has no float dtype
    name = backends.select(OP, scores, converted=(mask,) if mask is not None and mask.dtype != torch.bool else ())
    return _IMPLS[name](scores, mask, float(scale), float(dropout_p), seed)
