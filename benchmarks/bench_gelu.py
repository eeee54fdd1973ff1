"""bias + GELU: eager ``F.gelu(x + b)``, ``torch.compile`` of it, and every fastbert backend that
can run on the device (triton is skipped on CPU: its interpreter is not a benchmark).

Passes: ``fwd`` under no_grad; ``fwd+bwd`` with x and b requiring grad, ``backward`` from a
preallocated ``dy``, grads set to None at the end of each call. Minimum bytes: fwd reads x and
writes y (2N elements); fwd+bwd adds reading dy and x and writing dx (5N; bias traffic ignored).
"""

import torch
import torch.nn.functional as F

import fastbert
from benchmarks.harness import COMPILE, DTYPES, EAGER, Case, numel

OP = "bias_gelu"
SHAPES = [(4096, 3072), (4096, 4096)]  # B*S = 4096 tokens; BERT-base / BERT-large FFN width
DTYPE_NAMES = ["float32", "bfloat16"]


def eager_bias_gelu(x, b, approximate="none"):
    return F.gelu(x + b, approximate=approximate)


def fastbert_fn(backend):
    def fn(x, b, approximate="none"):
        with fastbert.backend(backend):
            return fastbert.bias_gelu(x, b, approximate)
    return fn


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


def _wrap(fn, x, b, dy, approximate, backward):
    """The zero-arg callable the harness times."""
    if not backward:
        def fwd():
            with torch.no_grad():
                return fn(x, b, approximate)
        return fwd

    def fwd_bwd():
        fn(x, b, approximate).backward(dy)
        x.grad = b.grad = None  # free the grads now so the next call allocates them afresh
    return fwd_bwd


def make_setup(shape, dtype, device, approximate, backward, use_compile=True):
    def setup():
        torch.manual_seed(0)
        dt = DTYPES[dtype]
        x = torch.randn(shape, dtype=dt, device=device, requires_grad=backward)
        b = torch.randn(shape[-1], dtype=dt, device=device, requires_grad=backward)
        dy = torch.randn(shape, dtype=dt, device=device) if backward else None
        fns = {EAGER: eager_bias_gelu}
        if use_compile:
            torch._dynamo.reset()  # one compilation per case; never hit the recompile limit
            fns[COMPILE] = torch.compile(eager_bias_gelu, dynamic=False)
        fns.update(backend_candidates(device, OP, (x, b), fastbert_fn))
        candidates = {name: _wrap(fn, x, b, dy, approximate, backward) for name, fn in fns.items()}
        if use_compile:  # compile (and warm) here, outside the timed region
            for _ in range(2):
                candidates[COMPILE]()
        return candidates
    return setup


def cases(device="cpu", mode="quick", dtypes=None, shapes=None, use_compile=True):
    """The bias+GELU cases; ``--full`` adds the tanh approximation."""
    approx = ["none", "tanh"] if mode == "full" else ["none"]
    out = []
    for shape in shapes or SHAPES:
        for dtype in dtypes or DTYPE_NAMES:
            size = numel(shape) * DTYPES[dtype].itemsize
            for approximate in approx:
                for pass_, elems, backward in (("fwd", 2, False), ("fwd+bwd", 5, True)):
                    out.append(Case(OP, tuple(shape), dtype, pass_, elems * size,
                                    make_setup(tuple(shape), dtype, device, approximate, backward,
                                               use_compile),
                                    params={"approximate": approximate}))
    return out
