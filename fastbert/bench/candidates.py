"""The timed candidates of an op benchmark case: eager PyTorch, ``torch.compile`` of it, and every
fastbert backend that can run the inputs here."""

import torch

import fastbert
from fastbert.bench.harness import COMPILE, EAGER


def backend_candidates(device, op, tensors, make_fn):
    """fastbert backends that can run ``op`` on these tensors here, as ``{candidate name: fn}``
    (``make_fn(backend)`` builds the callable). Skipped: triton on CPU (its interpreter is not a
    benchmark) and the reference backend (the test oracle; eager PyTorch is the baseline anyway)."""
    out = {}
    for name in fastbert.backends.BACKENDS:
        if name == "reference" or (name == "triton" and device == "cpu"):
            continue
        if not fastbert.backends.not_supported_reasons(name, op, *tensors):
            out[f"fastbert-{name}"] = make_fn(name)
    return out


def timed_candidates(op, device, eager_fn, make_fn, args, dy=None, leaves=(), use_compile=True):
    """``{name: zero-arg callable}`` calling each candidate as ``fn(*args)``: the forward under
    no_grad when ``dy`` is None, else forward and backward from ``dy`` (the ``leaves``' grads set
    to None after each call, so every call allocates them afresh). ``torch.compile`` of ``eager_fn``
    is compiled and warmed here, outside the timed region, once per case."""
    fns = {EAGER: eager_fn}
    if use_compile:
        torch._dynamo.reset()  # one compilation per case; never hit the recompile limit
        fns[COMPILE] = torch.compile(eager_fn, dynamic=False)
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]  # not labels
    fns.update(backend_candidates(device, op, tensors, make_fn))

    def wrap(fn):
        if dy is None:

            def fwd():
                with torch.no_grad():
                    return fn(*args)

            return fwd

        def fwd_bwd():
            fn(*args).backward(dy)
            for t in leaves:
                t.grad = None

        return fwd_bwd

    candidates = {name: wrap(fn) for name, fn in fns.items()}
    if use_compile:
        for _ in range(2):
            candidates[COMPILE]()
    return candidates
