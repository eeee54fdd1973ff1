"""bias + dropout + residual + LayerNorm: ``y = LayerNorm(dropout(x + x_bias) + residual) * weight + bias``.

BERT's post-LN sub-layer output. Forward saves fp32 ``mean``/``rstd`` per row (fp64 for fp64
inputs); dropout draws from the shared Philox stream (:mod:`fastbert.philox`) with a seed taken
from torch's generator for the device, and backward regenerates the mask instead of storing it.
Backward recomputes the pre-norm sum from ``x``, ``x_bias`` and ``residual`` and returns
``dx, dresidual, dweight, dbias, dx_bias``; the parameter gradients reduce in two deterministic stages.

Dtypes: ``x`` and ``residual`` share one (fp32/fp16/bf16; fp64 on the cpu and reference backends);
``weight``/``bias`` share one, possibly fp32 with half ``x`` (autocast master weights); ``x_bias`` any
float dtype. ``y`` has x's dtype; each parameter gradient its parameter's dtype.

``eps`` must be a finite positive number (``bool`` is rejected, not read as 1). NaN and inf in the
inputs propagate as in eager PyTorch (a NaN or inf in a row makes that row's output NaN). Rows of huge
finite values (e.g. one -1e30 element, or +-3e38) do not overflow the fp32 statistics on the cpu and
triton backends: their statistics are computed with a power-of-two scaling (triton) or in fp64 (cpu),
so they match the float64 reference where eager's fp32 layer_norm gives NaN.

Double backward (differentiating the gradient, ``create_graph=True``) is not implemented by the fused
backends and raises ``RuntimeError`` when attempted.
"""

import torch

from fastbert import backends, philox, reference
from fastbert.ops import _checks, _library

OP = "layernorm_residual"
_EPS_MAX = torch.finfo(torch.float32).max  # kernels add eps in fp32: beyond this it is inf


def stats_dtype(dtype):
    """mean/rstd are fp32 (fp64 for fp64 inputs, so that gradcheck sees exact statistics)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(x, residual, weight, bias, eps, x_bias, dropout_p, seed):
    stats = x.new_empty(x.shape[:-1], dtype=stats_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _fake_bwd(grad, x, residual, weight, x_bias, mean, rstd, dropout_p, seed):
    dres = torch.empty_like(x, memory_format=torch.contiguous_format)
    dx = torch.empty_like(dres) if dropout_active(dropout_p, seed) else x.new_empty((0,))
    dxb = x_bias.new_empty(x_bias.shape) if x_bias is not None else x.new_empty((0,))
    return dres, dx, weight.new_empty(weight.shape), weight.new_empty(weight.shape), dxb


_library.define(
    OP,
    "(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps, Tensor? x_bias, "
    "float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)",
    "(Tensor grad, Tensor x, Tensor residual, Tensor weight, Tensor? x_bias, Tensor mean, "
    "Tensor rstd, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fake_fwd,
    _fake_bwd,
)


def dropout_active(dropout_p, seed):
    return seed is not None and dropout_p > 0


def setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, x_bias, dropout_p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, x_bias, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(mean, rstd)


def backward(ctx, bwd_op, grad, _grad_mean=None, _grad_rstd=None):
    x, residual, weight, x_bias, mean, rstd, seed = ctx.saved_tensors
    dres, dx, dw, db, dxb = bwd_op(grad, x, residual, weight, x_bias, mean, rstd, ctx.dropout_p, seed)
    if not dropout_active(ctx.dropout_p, seed):
        dx = dres  # no dropout: d/dx = d/dresidual (one tensor for both, as autograd does for a + b)
    return dx, dres, dw, db, None, (dxb if x_bias is not None else None), None, None


_library.register_autograd(
    f"fastbert::{OP}_fwd", torch.ops.fastbert.layernorm_residual_bwd.default, setup_context, backward
)
backends.register_op(OP)


def _fused(op_name):
    def run(x, residual, weight, bias, eps, x_bias, dropout_p, seed):
        return getattr(torch.ops.fastbert, op_name)(x, residual, weight, bias, eps, x_bias, dropout_p, seed)[0]

    return run


_IMPLS = {
    "reference": reference.layernorm_residual,
    "cpu": _fused("layernorm_residual_fwd"),
    "cuda": _fused("layernorm_residual_fwd"),
    "triton": _fused("layernorm_residual_fwd_triton"),
}


def check_args(x, residual, weight, bias, eps, x_bias, dropout_p):
    """Validate the arguments (every backend's entry point calls this); errors name the argument."""
    for t, name in ((x, "x"), (residual, "residual"), (weight, "weight"), (bias, "bias")):
        _checks.tensor(t, OP, name)
        _checks.floating(t, OP, name)
    _checks.tensor(x_bias, OP, "x_bias", optional=True)
    if x.dim() == 0:
        raise ValueError(f"{OP}: x must have at least one dimension")
    if residual.shape != x.shape:
        raise ValueError(f"{OP}: residual has shape {list(residual.shape)} but x has shape {list(x.shape)}")
    if residual.dtype != x.dtype:
        raise ValueError(f"{OP}: residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    n = x.shape[-1]
    for t, name in ((weight, "weight"), (bias, "bias"), (x_bias, "x_bias")):
        if t is None:
            continue
        _checks.floating(t, OP, name)
        _checks.same_device(x, t, OP, name)
        if t.shape != (n,):
            raise ValueError(f"{OP}: {name} must have shape [{n}] (the last dimension of x), got {list(t.shape)}")
    _checks.same_device(x, residual, OP, "residual")
    if bias.dtype != weight.dtype:
        raise ValueError(f"{OP}: bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    if (x.dtype == torch.float64) != (weight.dtype == torch.float64):
        raise ValueError(f"{OP}: float64 x needs float64 weight and bias and vice versa")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{OP}: eps must be a number (int or float, not bool), got {type(eps).__name__} {eps!r}")
    if not 0 < eps <= _EPS_MAX:  # also rejects NaN and inf (inf made every output bias)
        raise ValueError(f"{OP}: eps must be a positive number (finite, at most float32's max), got {eps!r}")
    if not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1), got {dropout_p!r}")


def layernorm_residual(x, residual, weight, bias, x_bias=None, *, eps=1e-12, dropout_p=0.0, training=True):
    """``LayerNorm(dropout(x + x_bias) + residual) * weight + bias`` over the last dimension of ``x``.

    Args:
        x: the sub-layer output (e.g. a Linear's output without its bias), any leading shape.
        residual: the sub-layer input, same shape and dtype as ``x``.
        weight, bias: LayerNorm parameters of shape ``[x.shape[-1]]`` (one dtype for both).
        x_bias: optional bias added to ``x`` before dropout (the Linear's bias, folded in).
    Keyword-only options:
        eps: added to the variance (BERT uses 1e-12).
        dropout_p: dropout probability in [0, 1).
        training: apply dropout (default True, as ``F.dropout``); ``training=False`` (evaluation)
            skips it whatever ``dropout_p``.
    """
    check_args(x, residual, weight, bias, eps, x_bias, dropout_p)
    seed = philox.draw_seed(x.device) if training and dropout_p > 0 else None
    name = backends.select(OP, x, residual, weight, bias, converted=(x_bias,))  # x_bias: any float dtype
    return _IMPLS[name](x, residual, weight, bias, float(eps), x_bias, float(dropout_p), seed)
