"""bias + GELU: ``y = gelu(x + bias)``, exact (erf) or tanh approximation.

Backward recomputes ``z = x + bias`` from the saved inputs (nothing extra is stored) and returns
``dx`` and ``dbias = sum(dz over rows)``. ``bias`` may be fp32 while ``x`` is fp16/bf16 (autocast
master weights): the result has x's dtype and dbias has bias's dtype.

NaN and inf propagate as in eager PyTorch on every backend: NaN ``z`` gives NaN in ``y``, ``dx`` and
``dbias``'s column; ``gelu(+inf) = inf``, ``gelu(-inf) = NaN`` (eager's ``-inf * 0``), and their
gradients NaN. Finite ``z`` of any size gives the float64 reference's value (``gelu(-3e38) = -0``; the
gradient saturates to 0 or 1 where eager's fp32 formula overflows to NaN).

Double backward (differentiating the gradient, ``create_graph=True``) is not implemented by the fused
backends and raises ``RuntimeError`` when attempted (the reference backend is eager and supports it).
"""

import torch

from fastbert import backends, reference
from fastbert.ops import _checks, _library

OP = "bias_gelu"
APPROXIMATE = ("none", "tanh")


def _fake_fwd(x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_bwd(grad, x, bias, approximate, need_dbias):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dbias = bias.new_empty(bias.shape) if need_dbias and bias is not None else x.new_empty((0,))
    return dx, dbias


_library.define(
    OP,
    "(Tensor x, Tensor? bias, str approximate) -> Tensor",
    "(Tensor grad, Tensor x, Tensor? bias, str approximate, bool need_dbias) -> (Tensor, Tensor)",
    _fake_fwd,
    _fake_bwd,
)


def setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def backward(ctx, bwd_op, grad):
    x, bias = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[1]
    dx, dbias = bwd_op(grad, x, bias, ctx.approximate, need_dbias)
    return dx, (dbias if need_dbias else None), None


_library.register_autograd(f"fastbert::{OP}_fwd", torch.ops.fastbert.bias_gelu_bwd.default, setup_context, backward)
backends.register_op(OP)

_IMPLS = {
    "reference": reference.bias_gelu,
    "cpu": lambda x, bias, approximate: torch.ops.fastbert.bias_gelu_fwd(x, bias, approximate),
    "cuda": lambda x, bias, approximate: torch.ops.fastbert.bias_gelu_fwd(x, bias, approximate),
    "triton": lambda x, bias, approximate: torch.ops.fastbert.bias_gelu_fwd_triton(x, bias, approximate),
}


def check_args(x, bias, approximate):
    """Validate bias_gelu's arguments; every backend's entry point calls this."""
    _checks.tensor(x, OP, "x")
    _checks.tensor(bias, OP, "bias", optional=True)
    _checks.floating(x, OP, "x")
    _checks.choice(approximate, OP, "approximate", APPROXIMATE)
    if x.dim() == 0:
        raise ValueError(f"{OP}: x must have at least one dimension")
    if bias is not None:
        _checks.floating(bias, OP, "bias")
        _checks.same_device(x, bias, OP, "bias")
        if bias.shape != (x.shape[-1],):
            raise ValueError(
                f"{OP}: bias must have shape [{x.shape[-1]}] (the last dimension of x), got {list(bias.shape)}"
            )
        if (x.dtype == torch.float64) != (bias.dtype == torch.float64):
            raise ValueError(
                f"{OP}: float64 x needs a float64 bias and vice versa, got x {x.dtype} and bias {bias.dtype}"
            )


def bias_gelu(x, bias=None, *, approximate="none"):
    """``gelu(x + bias)`` over the last dimension of ``x`` (``bias`` has shape ``[x.shape[-1]]``).

    Args:
        x: float32/float16/bfloat16 tensor of any shape (float64 on the cpu and reference backends).
        bias: optional 1-D tensor of size ``x.shape[-1]`` on x's device; any float dtype.
        approximate: ``"none"`` (exact, erf) or ``"tanh"``, as in ``torch.nn.functional.gelu`` (keyword-only).
    """
    check_args(x, bias, approximate)
    return _IMPLS[backends.select(OP, x, bias)](x, bias, approximate)
