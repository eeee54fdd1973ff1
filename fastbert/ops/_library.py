"""Registration helpers: every op is a fwd/bwd pair of torch.library custom ops.

The C++ pair ``fastbert::<op>_fwd`` / ``fastbert::<op>_bwd`` is defined here (schemas live in
Python; csrc registers CPU and CUDA implementations). The Triton pair ``<op>_fwd_triton`` /
``<op>_bwd_triton`` is defined with ``torch.library.triton_op`` in fastbert/triton/<op>.py. Both
pairs get the same autograd formula: ``backward`` calls the pair's bwd op.

Host synchronisation: no op reads a CUDA tensor back to the host, except the ones whose output
size depends on the data (the gather's row count ``M``). Those carry :data:`SYNC_TAGS`
(``torch.Tag.cudagraph_unsafe``), so Inductor splits CUDA graphs around them
(``torch.compile(mode="reduce-overhead")``) instead of capturing a host read.
"""

import inspect

import torch

# Tags of the ops that read a device value back to the host (empty on a torch without the tag).
SYNC_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def sync_tags_kwargs():
    """``{"tags": SYNC_TAGS}`` for ``torch.library.custom_op`` where it takes ``tags``, else ``{}``."""
    takes_tags = "tags" in inspect.signature(torch.library.custom_op).parameters
    return {"tags": SYNC_TAGS} if SYNC_TAGS and takes_tags else {}


def define(op, fwd_schema, bwd_schema, fake_fwd, fake_bwd, fwd_tags=()):
    """Define ``fastbert::<op>_fwd`` and ``fastbert::<op>_bwd`` with their fake implementations
    (``fwd_tags``: the forward's ``torch.Tag`` s, e.g. :data:`SYNC_TAGS`)."""
    for suffix, schema, fake, tags in (
        ("fwd", fwd_schema, fake_fwd, tuple(fwd_tags)),
        ("bwd", bwd_schema, fake_bwd, ()),
    ):
        name = f"fastbert::{op}_{suffix}"
        torch.library.define(name, schema, tags=tags)
        torch.library.register_fake(name, fake)


def _plain(t):
    return not isinstance(t, torch.Tensor) or type(t) is torch.Tensor


def once_differentiable(op, backward):
    """``backward(ctx, *args)`` made once-differentiable with a clear error, as
    ``torch.autograd.function.once_differentiable``: when the gradient is itself being recorded
    (``create_graph=True``) and depends on something that requires grad (the incoming gradient or a
    saved tensor), the backward runs without recording and its outputs carry a node that raises
    ``RuntimeError`` naming the op if anything differentiates through them (double backward), where
    the backward kernels' outputs would otherwise be silently constant (a zero second derivative).
    Plain ``backward()`` / ``create_graph=False`` and traced backwards (torch.compile) are unaffected."""
    message = (
        f"fastbert.{op}: double backward (differentiating its gradient, e.g. through "
        f"torch.autograd.grad(..., create_graph=True)) is not supported: its backward is a fused "
        f"kernel without a derivative of its own; use the reference backend "
        f"(fastbert.backend('reference')) or eager PyTorch for higher-order gradients"
    )

    def wrapped(ctx, *args):
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return backward(ctx, *args)
        saved = tuple(getattr(ctx, "saved_tensors", ()))
        tensors = [t for t in (*args, *saved) if isinstance(t, torch.Tensor)]
        if not any(t.requires_grad for t in tensors) or not all(_plain(t) for t in tensors):
            return backward(ctx, *args)
        with torch.no_grad():
            out = backward(ctx, *args)
        single = not isinstance(out, tuple)
        outs = (out,) if single else out
        idx = [i for i, t in enumerate(outs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not idx:
            return out
        # the error node's inputs: the gradients (detached) and one element of each tensor the
        # backward depended on that requires grad, so that any differentiation reaching those tensors
        # (torch.autograd.grad(..., inputs=x) included, which skips nodes not on a path to x) runs it
        links = [t.reshape(-1)[:1] for t in tensors if t.requires_grad and t.numel()]
        if not links:
            return out
        err = torch._C._functions.DelayedError(message, len(idx) + len(links))
        wrapped_outs = err(*(outs[i].detach() for i in idx), *links)[: len(idx)]
        res = list(outs)
        for i, t in zip(idx, wrapped_outs):
            res[i] = t
        return res[0] if single else tuple(res)

    return wrapped


def register_autograd(fwd_name, bwd_op, setup_context, backward, double_backward=False):
    """Autograd for ``fwd_name``: ``backward(ctx, bwd_op, *grads)`` computes the input gradients.
    Unless ``double_backward`` (``bwd_op`` has an autograd formula of its own), the backward is
    :func:`once_differentiable`: differentiating the gradient raises a clear error."""
    op = fwd_name.split("::")[-1]
    for suffix in ("_fwd_triton", "_fwd"):
        if op.endswith(suffix):
            op = op[: -len(suffix)]
            break

    def run(ctx, *grads):
        return backward(ctx, bwd_op, *grads)

    torch.library.register_autograd(
        fwd_name, run if double_backward else once_differentiable(op, run), setup_context=setup_context
    )
