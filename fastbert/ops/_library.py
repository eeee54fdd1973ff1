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
    for suffix, schema, fake, tags in (("fwd", fwd_schema, fake_fwd, tuple(fwd_tags)),
                                       ("bwd", bwd_schema, fake_bwd, ())):
        name = f"fastbert::{op}_{suffix}"
        torch.library.define(name, schema, tags=tags)
        torch.library.register_fake(name, fake)


def register_autograd(fwd_name, bwd_op, setup_context, backward):
    """Autograd for ``fwd_name``: ``backward(ctx, bwd_op, *grads)`` computes the input gradients."""
    torch.library.register_autograd(
        fwd_name, lambda ctx, *grads: backward(ctx, bwd_op, *grads), setup_context=setup_context)
