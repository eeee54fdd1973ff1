"""Registration helpers: every op is a fwd/bwd pair of torch.library custom ops.

The C++ pair ``fastbert::<op>_fwd`` / ``fastbert::<op>_bwd`` is defined here (schemas live in
Python; csrc registers CPU and CUDA implementations). The Triton pair ``<op>_fwd_triton`` /
``<op>_bwd_triton`` is defined with ``torch.library.triton_op`` in fastbert/triton/<op>.py. Both
pairs get the same autograd formula: ``backward`` calls the pair's bwd op.
"""

import torch


def define(op, fwd_schema, bwd_schema, fake_fwd, fake_bwd):
    """Define ``fastbert::<op>_fwd`` and ``fastbert::<op>_bwd`` with their fake implementations."""
    for suffix, schema, fake in (("fwd", fwd_schema, fake_fwd), ("bwd", bwd_schema, fake_bwd)):
        name = f"fastbert::{op}_{suffix}"
        torch.library.define(name, schema)
        torch.library.register_fake(name, fake)


def register_autograd(fwd_name, bwd_op, setup_context, backward):
    """Autograd for ``fwd_name``: ``backward(ctx, bwd_op, *grads)`` computes the input gradients."""
    torch.library.register_autograd(
        fwd_name, lambda ctx, *grads: backward(ctx, bwd_op, *grads), setup_context=setup_context)
